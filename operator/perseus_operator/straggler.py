"""Straggler detection from each pipeline's stage-0 span.

The gradient all-reduce makes every pipeline's wall-clock iteration equal, and clocks differ
across nodes, so neither says which pipeline is slow. Stage 0 runs both the first and the last
instruction of a 1F1B iteration on one node's clock: its span (first begin to last end) is the
pipeline's own compute time. A pipeline whose span exceeds the span *its current plan* predicts by
`threshold` for `iterations` fresh samples in a row is a straggler; it recovers after as many
samples within half the threshold (hysteresis). Because each pipeline is compared with its own
plan, the pipelines the operator slows down on purpose (their plan now predicts the straggler's
pace) never look slow, so the detection does not flap.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

__all__ = ["Sample", "StragglerState", "Verdict", "update"]


@dataclass(frozen=True)
class Sample:
    """One fresh stage-0 span of pipeline `data_rank` and the span its current plan predicts."""

    data_rank: int
    span_s: float
    predicted_span_s: float

    @property
    def slowdown(self) -> float:
        return self.span_s / self.predicted_span_s - 1.0


@dataclass(frozen=True)
class StragglerState:
    """Per-pipeline run lengths and the straggler being followed (None: none)."""

    slow_runs: Mapping[int, int] = field(default_factory=dict)
    ok_runs: Mapping[int, int] = field(default_factory=dict)
    recent_spans_s: Mapping[int, tuple[float, ...]] = field(default_factory=dict)
    straggler: int | None = None
    pace_s: float | None = None


@dataclass(frozen=True)
class Verdict:
    state: StragglerState
    changed: bool
    """True when the straggler or its pace changed enough to re-plan the others."""


def update(
    state: StragglerState,
    samples: list[Sample],
    *,
    threshold: float,
    iterations: int,
) -> Verdict:
    """Fold fresh samples into the state. `threshold` is a fraction (0.05 = 5% slower)."""
    if threshold <= 0 or iterations < 1:
        raise ValueError("threshold must be > 0 and iterations >= 1")
    slow = dict(state.slow_runs)
    ok = dict(state.ok_runs)
    spans = dict(state.recent_spans_s)
    for s in samples:
        if not (s.span_s > 0 and s.predicted_span_s > 0):
            continue
        spans[s.data_rank] = (*spans.get(s.data_rank, ()), s.span_s)[-iterations:]
        if s.slowdown > threshold:
            slow[s.data_rank] = slow.get(s.data_rank, 0) + 1
            ok[s.data_rank] = 0
        elif s.slowdown <= threshold / 2:
            ok[s.data_rank] = ok.get(s.data_rank, 0) + 1
            slow[s.data_rank] = 0
        else:  # between the two thresholds: neither a new straggler nor a recovery
            ok[s.data_rank] = 0
    new = replace(state, slow_runs=slow, ok_runs=ok, recent_spans_s=spans)
    current = state.straggler
    if current is not None and ok.get(current, 0) >= iterations:
        current = None
    confirmed = [d for d, n in slow.items() if n >= iterations]
    if confirmed:
        # Follow the slowest confirmed pipeline: the all-reduce waits for it.
        current = max(confirmed, key=lambda d: _mean(spans[d]))
    if current is None:
        changed = state.straggler is not None
        return Verdict(replace(new, straggler=None, pace_s=None), changed)
    if current == state.straggler and state.pace_s is not None and slow.get(current, 0) == 0:
        # Recovering (or within the hysteresis band): keep following the known pace.
        return Verdict(replace(new, straggler=current, pace_s=state.pace_s), False)
    pace_s = _mean(spans[current])
    moved = state.pace_s is None or abs(pace_s / state.pace_s - 1.0) > threshold / 2
    if current == state.straggler and not moved:
        return Verdict(replace(new, straggler=current, pace_s=state.pace_s), False)
    return Verdict(replace(new, straggler=current, pace_s=pace_s), True)


def _mean(values: tuple[float, ...]) -> float:
    return sum(values) / len(values)
