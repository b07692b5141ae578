"""Timings of a job's ranks over a recent window, from the iteration records the hot path keeps:
per rank, per stage (pooled over its ranks) and per pipeline (its stage-0 compute span, which
the operator compares across pipelines to find a straggler).

`snapshot` copies what a rank holds (on the event loop: a few microseconds per rank), and
`job_timings` works on the copies, so the node runs it in a worker thread: a large history
never stalls the loop that serves probes and locks clocks."""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from perseus_sidecar.api import (
    InstructionTiming,
    PipelineTimings,
    RankTimings,
    StageTimings,
    TimingsOut,
)
from perseus_sidecar.ranks import IterationRecord, Rank

__all__ = ["RankSnapshot", "job_timings", "snapshot"]


@dataclass(frozen=True, slots=True)
class RankSnapshot:
    rank_id: str
    pod: str
    rank: int
    pipeline_rank: int
    data_rank: int
    tensor_rank: int
    gpu_uuid: str
    history: tuple[IterationRecord, ...]
    seconds_since_last_event: float
    controlled: bool
    stale: bool
    events_dropped: int


def snapshot(rank: Rank) -> RankSnapshot:
    return RankSnapshot(
        rank_id=rank.rank_id,
        pod=rank.pod,
        rank=rank.rank,
        pipeline_rank=rank.pipeline_rank,
        data_rank=rank.data_rank,
        tensor_rank=rank.tensor_rank,
        gpu_uuid=rank.gpu_uuid,
        history=tuple(rank.history),
        seconds_since_last_event=time.monotonic() - rank.last_event_mono,
        controlled=rank.controlled,
        stale=rank.stale,
        events_dropped=rank.events_dropped,
    )


def job_timings(
    namespace: str, name: str, ranks: Iterable[RankSnapshot], window_s: float
) -> TimingsOut:
    since_ns = time.time_ns() - int(window_s * 1e9)
    ranks_out: list[RankTimings] = []
    by_stage: dict[int, list[tuple[RankSnapshot, list[IterationRecord]]]] = defaultdict(list)
    for rank in sorted(ranks, key=lambda r: r.rank):
        records = [rec for rec in rank.history if rec.end_ns >= since_ns]
        by_stage[rank.pipeline_rank].append((rank, records))
        ranks_out.append(
            RankTimings(
                rank_id=rank.rank_id,
                pod=rank.pod,
                rank=rank.rank,
                pipeline_rank=rank.pipeline_rank,
                data_rank=rank.data_rank,
                tensor_rank=rank.tensor_rank,
                gpu_uuid=rank.gpu_uuid,
                iterations=len(records),
                instructions=_instructions(records),
                iteration_time_mean_s=_mean_of(r.iteration_s for r in records),
                compute_span_mean_s=_mean_of(r.span_s for r in records),
                energy_per_iteration_mean_j=_mean_of(r.energy_j for r in records),
                seconds_since_last_event=rank.seconds_since_last_event,
                schedule_active=rank.controlled,
                stale=rank.stale,
                events_dropped=rank.events_dropped,
            )
        )
    stages = [
        StageTimings(
            pipeline_rank=stage,
            ranks=len(members),
            instructions=_instructions([rec for _, recs in members for rec in recs]),
            energy_per_iteration_mean_j=_mean_of(
                _mean_of(rec.energy_j for rec in recs) for _, recs in members
            ),
        )
        for stage, members in sorted(by_stage.items())
    ]
    pipelines_records: dict[int, list[IterationRecord]] = defaultdict(list)
    for rank, records in by_stage.get(0, []):
        pipelines_records[rank.data_rank].extend(records)
    pipelines = []
    for data_rank, records in sorted(pipelines_records.items()):
        records.sort(key=lambda r: r.end_ns)
        spans = [r.span_s for r in records if r.span_s is not None]
        stats = _mean_std(spans) if spans else None
        pipelines.append(
            PipelineTimings(
                data_rank=data_rank,
                iterations=len(records),
                stage0_span_mean_s=stats[0] if stats else None,
                stage0_span_std_s=stats[1] if stats else None,
                stage0_span_last_s=spans[-1] if spans else None,
                iteration_time_mean_s=_mean_of(r.iteration_s for r in records),
            )
        )
    return TimingsOut(
        namespace=namespace,
        name=name,
        window_s=window_s,
        ranks=ranks_out,
        stages=stages,
        pipelines=pipelines,
    )


def _instructions(records: list[IterationRecord]) -> list[InstructionTiming]:
    out = []
    for label, durations in (
        ("forward", [d for rec in records for d in rec.forward_s]),
        ("backward", [d for rec in records for d in rec.backward_s]),
    ):
        if durations:
            mean, std = _mean_std(durations)
            out.append(
                InstructionTiming(instruction=label, count=len(durations), mean_s=mean, std_s=std)
            )
    return out


def _mean_std(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def _mean_of(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None
