"""A registered training rank and its hot path: each event updates the current iteration's
timings and, when clock control is active, locks the planned clock (looked up in precomputed
per-microbatch tables) as an instruction begins and the maximum clock at iteration end.

What a rank keeps is bounded whatever a token holder sends: per iteration at most one open and
one finished forward and backward per microbatch of the announced pipeline shape, and completed
iterations up to a count and an instruction budget. Events beyond that are dropped and counted.

Everything runs on the sidecar's single event loop, so there are no locks here."""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from perseus_hooks.wire import (
    BACKWARD_BEGIN,
    BACKWARD_END,
    EVENT_CODES,
    FORWARD_BEGIN,
    FORWARD_END,
    ITERATION_END,
    MAX_CHUNKS,
)
from perseus_sidecar.gpu.base import GpuError

if TYPE_CHECKING:
    from perseus_sidecar.clocks import ClockController
    from perseus_sidecar.metrics import Metrics
    from perseus_sidecar.profiling import RankProfiling

__all__ = [
    "BACKWARD_BEGIN",
    "BACKWARD_END",
    "EVENT_CODES",
    "FORWARD_BEGIN",
    "FORWARD_END",
    "HISTORY_INSTRUCTIONS",
    "ITERATION_END",
    "IterationRecord",
    "Listener",
    "Rank",
]

log = logging.getLogger(__name__)

HISTORY_INSTRUCTIONS = 100_000
"""Instruction durations kept per rank across its completed iterations (about 3 MB)."""


class Listener(Protocol):
    """An event connection of the rank, told when clock control starts/stops or the rank goes."""

    def notify(self, active: bool) -> None: ...

    def close(self, reason: str) -> None: ...


@dataclass(frozen=True, slots=True)
class IterationRecord:
    """One completed iteration of one rank; durations in simulated (= real, on GPUs) seconds."""

    end_ns: int
    iteration_s: float | None
    span_s: float | None
    forward_s: tuple[float, ...]
    backward_s: tuple[float, ...]
    energy_j: float | None


class Rank:
    __slots__ = (
        "_clocks",
        "_energy_mj",
        "_error_logged",
        "_history_instructions",
        "_metrics",
        "backward_mhz",
        "chunks",
        "cur_backward",
        "cur_forward",
        "data_rank",
        "events_dropped",
        "first_begin_ns",
        "forward_mhz",
        "gpu_uuid",
        "history",
        "job_key",
        "last_end_ns",
        "last_event_mono",
        "last_ie_ns",
        "listeners",
        "max_mhz",
        "microbatches",
        "namespace",
        "open_backward",
        "open_forward",
        "pipeline_rank",
        "pod",
        "profiling",
        "rank",
        "rank_id",
        "received_ns",
        "seconds_per_ns",
        "stale",
        "tensor_rank",
    )

    def __init__(
        self,
        *,
        rank_id: str,
        job_key: tuple[str, str],
        namespace: str,
        pod: str,
        rank: int,
        pipeline_rank: int,
        data_rank: int,
        tensor_rank: int,
        gpu_uuid: str,
        max_mhz: int,
        clocks: ClockController,
        metrics: Metrics,
        time_scale: float,
        history: int,
        microbatches: int = 4096,
    ) -> None:
        self.rank_id = rank_id
        self.job_key = job_key
        self.namespace = namespace
        self.pod = pod
        self.rank = rank
        self.pipeline_rank = pipeline_rank
        self.data_rank = data_rank
        self.tensor_rank = tensor_rank
        self.gpu_uuid = gpu_uuid
        self.max_mhz = max_mhz
        self._clocks = clocks
        self._metrics = metrics
        self.seconds_per_ns = 1e-9 / time_scale
        self.forward_mhz: tuple[int, ...] | None = None
        self.backward_mhz: tuple[int, ...] | None = None
        self.chunks = 1
        """Model chunks per stage of the schedule: its tables hold microbatch * chunks + chunk."""
        self.profiling: RankProfiling | None = None
        self.listeners: set[Listener] = set()
        self.last_event_mono = time.monotonic()
        self.received_ns = 0
        """When the transport got the bytes of the events being applied (set per batch)."""
        self.stale = False
        self._error_logged = False
        self.history: deque[IterationRecord] = deque(maxlen=history)
        self._history_instructions = 0
        self.microbatches = microbatches
        """Microbatches per iteration: the bound of every per-iteration buffer."""
        self.events_dropped = 0
        self.open_forward: dict[int, int] = {}
        self.open_backward: dict[int, int] = {}
        self.cur_forward: list[float] = []
        self.cur_backward: list[float] = []
        self.first_begin_ns: int | None = None
        self.last_end_ns: int | None = None
        self.last_ie_ns: int | None = None
        self._energy_mj: int | None = None

    # ---- clock control state ----------------------------------------------------------------

    @property
    def controlled(self) -> bool:
        """True while this sidecar steers the rank's clock (a schedule or a profiling session)."""
        return self.forward_mhz is not None or self.profiling is not None

    def set_schedule(
        self,
        forward_mhz: tuple[int, ...] | None,
        backward_mhz: tuple[int, ...] | None,
        chunks: int = 1,
    ) -> None:
        before = self.controlled
        self.forward_mhz = forward_mhz
        self.backward_mhz = backward_mhz
        self.chunks = chunks
        self._notify_if_changed(before)

    def set_profiling(self, profiling: RankProfiling | None) -> None:
        before = self.controlled
        self.profiling = profiling
        self._notify_if_changed(before)

    def _notify_if_changed(self, before: bool) -> None:
        after = self.controlled
        if after != before:
            for listener in list(self.listeners):
                listener.notify(after)

    # ---- hot path ---------------------------------------------------------------------------

    def on_event(self, code: int, microbatch: int, t_ns: int, chunk: int = 0) -> None:
        """Apply one event (`chunk`: the model chunk, in an interleaved pipeline). Raises
        nothing: GPU errors are counted and logged once."""
        self.last_event_mono = time.monotonic()
        if self.stale:
            self.stale = False
            log.info("rank events resumed", extra={"rank_id": self.rank_id})
        if microbatch >= self.microbatches:  # IE's microbatch is -1
            self._drop("microbatch-out-of-range")
            return
        # Open instructions are keyed per (microbatch, chunk); the schedule's tables hold
        # microbatch * chunks + chunk, and a chunk beyond the schedule's has no clock.
        key = microbatch * MAX_CHUNKS + chunk
        slot = microbatch * self.chunks + chunk if chunk < self.chunks else -1
        if code in (FORWARD_BEGIN, BACKWARD_BEGIN):
            opened = self.open_forward if code == FORWARD_BEGIN else self.open_backward
            if key not in opened and len(opened) >= self.microbatches:
                self._drop("too-many-open")
                return
        if code == FORWARD_BEGIN:
            self.open_forward[key] = t_ns
            if self.first_begin_ns is None:
                self.first_begin_ns = t_ns
            table = self.forward_mhz
        elif code == BACKWARD_BEGIN:
            self.open_backward[key] = t_ns
            if self.first_begin_ns is None:
                self.first_begin_ns = t_ns
            table = self.backward_mhz
        elif code in (FORWARD_END, BACKWARD_END):
            self._end_instruction(code == FORWARD_END, key, t_ns)
            return
        else:
            self._end_iteration(t_ns)
            return
        profiling = self.profiling
        if profiling is not None:
            self._apply(profiling.clock_mhz, t_ns)
        elif table is not None and 0 <= slot < len(table):
            self._apply(table[slot], t_ns)

    def _drop(self, reason: str) -> None:
        self.events_dropped += 1
        self._metrics.events_dropped.labels(reason=reason).inc()

    def _apply(self, clock_mhz: int, t_ns: int) -> None:
        try:
            self._clocks.apply(self.gpu_uuid, clock_mhz)
        except (GpuError, OSError, RuntimeError) as exc:
            self._metrics.gpu_errors.labels(error=type(exc).__name__).inc()
            if not self._error_logged:
                self._error_logged = True
                log.error("cannot lock clock", extra={"gpu": self.gpu_uuid, "error": str(exc)})
            return
        now_ns = time.time_ns()
        self._metrics.event_latency.observe((now_ns - t_ns) * 1e-9)
        self._metrics.event_processing.observe((now_ns - self.received_ns) * 1e-9)

    def _reset(self, reason: str) -> None:
        try:
            self._clocks.reset(self.gpu_uuid, reason)
        except (GpuError, OSError, RuntimeError) as exc:
            self._metrics.gpu_errors.labels(error=type(exc).__name__).inc()
            log.error("cannot reset clock", extra={"gpu": self.gpu_uuid, "error": str(exc)})

    def _end_instruction(self, forward: bool, key: int, t_ns: int) -> None:
        begin = (self.open_forward if forward else self.open_backward).pop(key, None)
        if begin is None or t_ns < begin:
            return
        done = self.cur_forward if forward else self.cur_backward
        if len(done) >= self.microbatches:
            self._drop("iteration-overflow")
            return
        done.append((t_ns - begin) * self.seconds_per_ns)
        self.last_end_ns = t_ns
        if self.profiling is not None:
            self.profiling.record_instruction(forward, begin, t_ns)

    def _end_iteration(self, t_ns: int) -> None:
        energy_j: float | None = None
        try:
            energy_mj = self._clocks.backend.total_energy_mj(self.gpu_uuid)
        except GpuError:
            energy_mj = None
        if energy_mj is not None and self._energy_mj is not None:
            energy_j = (energy_mj - self._energy_mj) / 1000.0
        self._energy_mj = energy_mj
        iteration_s = None
        if self.last_ie_ns is not None and t_ns > self.last_ie_ns:
            iteration_s = (t_ns - self.last_ie_ns) * self.seconds_per_ns
            self._metrics.iteration_seconds.observe(iteration_s)
        span_s = None
        if self.first_begin_ns is not None and self.last_end_ns is not None:
            span_s = max(0, self.last_end_ns - self.first_begin_ns) * self.seconds_per_ns
        self._remember(
            IterationRecord(
                end_ns=t_ns,
                iteration_s=iteration_s,
                span_s=span_s,
                forward_s=tuple(self.cur_forward),
                backward_s=tuple(self.cur_backward),
                energy_j=energy_j,
            )
        )
        self.last_ie_ns = t_ns
        self.first_begin_ns = None
        self.last_end_ns = None
        self.open_forward.clear()
        self.open_backward.clear()
        self.cur_forward = []
        self.cur_backward = []
        profiling = self.profiling
        if profiling is not None:
            next_mhz = profiling.end_iteration(t_ns)
            if next_mhz is None:
                self.set_profiling(None)
                if self.forward_mhz is None:
                    self._reset("profiling-done")
                else:
                    self._apply(self.max_mhz, t_ns)
            else:
                self._apply(next_mhz, t_ns)
        elif self.forward_mhz is not None:
            self._apply(self.max_mhz, t_ns)

    def _remember(self, record: IterationRecord) -> None:
        """Keep the record; the oldest go when the count or the instruction budget is over."""
        history = self.history
        if len(history) == history.maxlen:
            old = history[0]
            self._history_instructions -= len(old.forward_s) + len(old.backward_s)
        history.append(record)
        self._history_instructions += len(record.forward_s) + len(record.backward_s)
        while self._history_instructions > HISTORY_INSTRUCTIONS and len(history) > 1:
            old = history.popleft()
            self._history_instructions -= len(old.forward_s) + len(old.backward_s)
