"""Pure energy accounting of one policy: the all-max-clock baseline, the saving measured under a
plan (fair under a straggler) and the fresh straggler samples fed to `straggler.update`.

Plain data in, plain data out, like `reconcile.decide`: the controller owns the state, the time
windows (regimes) and the sidecar calls, and stores what these functions return.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from perseus_operator.reconcile import saving_percent
from perseus_operator.straggler import Sample

__all__ = [
    "Baseline",
    "PipelineSpan",
    "RankFigures",
    "enough_samples",
    "mean_present",
    "measure_baseline",
    "measured_saving_percent",
    "straggler_samples",
]


class RankFigures(Protocol):
    """What accounting reads of a rank's timings (`perseus_sidecar.api.RankTimings`)."""

    @property
    def data_rank(self) -> int: ...
    @property
    def iterations(self) -> int: ...
    @property
    def schedule_active(self) -> bool: ...
    @property
    def energy_per_iteration_mean_j(self) -> float | None: ...
    @property
    def iteration_time_mean_s(self) -> float | None: ...


class PipelineSpan(Protocol):
    """What straggler tracking reads of a pipeline's timings (`PipelineTimings`)."""

    @property
    def data_rank(self) -> int: ...
    @property
    def stage0_span_last_s(self) -> float | None: ...


@dataclass(frozen=True)
class Baseline:
    """All-max-clock energy per iteration of the job's counted ranks (`gpus` of them)."""

    energy_j: float
    iteration_s: float | None
    gpus: int


def enough_samples(ranks: Sequence[RankFigures], iterations: int) -> bool:
    return all(r.iterations >= iterations and r.energy_per_iteration_mean_j for r in ranks)


def mean_present(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def measure_baseline(
    ranks: Sequence[RankFigures], *, expected_ranks: int, iterations: int
) -> Baseline | None:
    """The baseline from a window with no schedule, once every rank of the job has counted
    `iterations` iterations; None until then."""
    if len(ranks) < expected_ranks or any(r.schedule_active for r in ranks):
        return None
    if not enough_samples(ranks, iterations):
        return None
    return Baseline(
        energy_j=sum(r.energy_per_iteration_mean_j or 0.0 for r in ranks),
        iteration_s=mean_present(r.iteration_time_mean_s for r in ranks),
        gpus=len(ranks),
    )


def measured_saving_percent(
    ranks: Sequence[RankFigures],
    baseline: Baseline,
    *,
    expected_ranks: int,
    iterations: int,
    straggler: int | None,
    blocking_w: float,
) -> float | None:
    """Energy per iteration under the plan against the baseline, over the ranks the plan slows
    on purpose (a followed `straggler` pipeline runs the plain plan and is left out). Fair under
    a straggler: the others' baseline also pays blocking power while waiting for it. None until
    every rank runs the schedule for `iterations` iterations."""
    if len(ranks) < expected_ranks or baseline.iteration_s is None:
        return None
    if not all(r.schedule_active for r in ranks) or not enough_samples(ranks, iterations):
        return None
    counted = [r for r in ranks if r.data_rank != straggler]
    if not counted:
        return None
    energy_j = sum(r.energy_per_iteration_mean_j or 0.0 for r in counted)
    iteration_s = mean_present(r.iteration_time_mean_s for r in counted)
    base_j = baseline.energy_j * len(counted) / max(baseline.gpus, 1)
    if straggler is not None:
        wait_s = max(0.0, (iteration_s or 0.0) - baseline.iteration_s)
        base_j += blocking_w * len(counted) * wait_s
    return saving_percent(energy_j, base_j)


def straggler_samples(
    pipelines: Iterable[PipelineSpan],
    last_spans_s: Mapping[int, float],
    *,
    plan_span_s: float,
    straggler: int | None,
    follower_span_s: float | None,
) -> tuple[list[Sample], dict[int, float]]:
    """Each pipeline's fresh stage-0 span (one not seen in `last_spans_s`) with the span its
    current plan predicts: the followers of a `straggler` run the plan at its pace
    (`follower_span_s`), everyone else the plain plan. Returns the samples and the spans seen."""
    seen = dict(last_spans_s)
    samples = []
    for p in pipelines:
        span_s = p.stage0_span_last_s
        if span_s is None or seen.get(p.data_rank) == span_s:
            continue
        seen[p.data_rank] = span_s
        follows = straggler not in (None, p.data_rank) and follower_span_s is not None
        predicted_s = follower_span_s if follows and follower_span_s is not None else plan_span_s
        samples.append(Sample(p.data_rank, span_s, predicted_s))
    return samples, seen
