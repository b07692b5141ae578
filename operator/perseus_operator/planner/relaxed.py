"""The LP relaxation's path along the deadline axis: relaxed plans from the fastest deadline to a
little past the relaxation's least energy, and the relaxed plan at any deadline in between.

The LP is solved every `lp_step` of T0 (the knobs are `config.SearchConfig`'s), densely
(`dense_step`) from the fastest deadline to just past T0, where the frontier is steep and the
no-slowdown plan is chosen, and further apart the further from T0 (`far_step_ratio`), where the
frontier flattens; each solve is warm-started from the last. HiGHS's work grows with the number
of instructions times the length of the path (every instruction crossing a hull breakpoint is a
pivot), so long pipelines solve at full size only from T0 to `dense_above_t0` past it, where the
no-slowdown plan is chosen. Everywhere else they solve a short copy of the pipeline
(`short_microbatches`) and stretch its
steady state: the middle microbatch's durations stand for
every microbatch of the long pipeline's steady state, and the fill and drain map one to one.
Stretched plans are exact relaxed plans of the long pipeline (their deadline is their own
longest path) and, measured on the real profiles at 8 x 96, usually cost what the full LP
would at that deadline, at most about 1% more.

Between solved points, a deadline gets the convex combination of the two solved plans around it:
it meets that deadline (the longest path is convex in the durations) and costs at most the
interpolated cost.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from perseus_operator.planner.config import DEFAULT_SEARCH, SearchConfig
from perseus_operator.planner.evaluate import makespan
from perseus_operator.planner.lp import LpRelaxation
from perseus_operator.planner.model import OptionTable, build_options, option_classes
from perseus_operator.planner.pipeline import PipelineDag, PipelineShape, build_dag
from perseus_profiles import StageProfile

__all__ = ["RelaxedPath", "ShortCopy", "relaxed_path", "short_copy", "short_pipeline"]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class RelaxedPath:
    deadline_s: FloatArray
    """Sorted deadlines of the solved relaxed plans."""
    duration_s: FloatArray
    """Their durations, nodes x points."""
    energy_j: FloatArray
    """Their energies: for plans solved at full size, a lower bound on any discrete plan that
    meets the same deadline; stretched ones can cost a little more than that bound."""
    near_t0: tuple[tuple[float, FloatArray], ...]
    """The plans solved at full size from T0 to `dense_above_t0` past it, worth more roundings."""

    @property
    def t_star_s(self) -> float:
        """The deadline of the least-energy relaxed plan."""
        return float(self.deadline_s[int(np.argmin(self.energy_j))])

    def at(self, deadline_s: FloatArray) -> FloatArray:
        """Relaxed durations (nodes x deadlines), interpolated between the solved plans
        (deadlines outside the path get its nearest end)."""
        at = self.deadline_s
        if len(at) == 1:
            return np.repeat(self.duration_s[:, :1], len(deadline_s), axis=1)
        hi = np.clip(np.searchsorted(at, deadline_s), 1, len(at) - 1)
        w = np.clip((deadline_s - at[hi - 1]) / (at[hi] - at[hi - 1]), 0.0, 1.0)
        out: FloatArray = self.duration_s[:, hi - 1] * (1 - w) + self.duration_s[:, hi] * w
        return out


def relaxed_path(
    dag: PipelineDag,
    table: OptionTable,
    t0: float,
    fastest_t: float,
    slowest_t: float,
    *,
    short: ShortCopy | None = None,
    config: SearchConfig = DEFAULT_SEARCH,
) -> RelaxedPath | None:
    """The relaxation's path (see the module doc), or None if no deadline could be solved.
    `short` (see `short_copy`) makes a long pipeline stretch it beyond the dense part."""
    idle_w = dag.shape.stages * table.blocking_power_w
    stretch = short is not None
    # A long pipeline solves at full size only from T0 to just past it (the no-slowdown plan);
    # faster and slower deadlines come from the stretched copy.
    start = max(fastest_t, t0) if stretch else fastest_t
    stop = min(slowest_t, t0 * (1 + config.dense_above_t0)) if stretch else slowest_t
    points = _sweep(
        LpRelaxation(dag, table),
        start=start,
        stop=stop,
        t0=t0,
        slowest_t=slowest_t,
        idle_w=idle_w,
        config=config,
    )
    near = tuple((t, d) for t, d, _ in points if t0 <= t <= t0 * (1 + config.dense_above_t0))
    if short is not None:
        points += _stretched(dag, table, short, outside=(start, stop), config=config)
    if not points:
        return None
    points.sort(key=lambda p: p[0])
    return RelaxedPath(
        deadline_s=np.asarray([p[0] for p in points]),
        duration_s=np.stack([p[1] for p in points], axis=1),
        energy_j=np.asarray([p[2] for p in points]),
        near_t0=near,
    )


class ShortCopy(NamedTuple):
    """The short pipeline a long one stretches, and its option table (same profile)."""

    dag: PipelineDag
    table: OptionTable


def short_copy(
    profile: StageProfile,
    shape: PipelineShape,
    blocking_power_w: float,
    config: SearchConfig = DEFAULT_SEARCH,
) -> ShortCopy | None:
    """The short copy of a long pipeline, built once, or None if the pipeline is not long."""
    short = short_pipeline(shape, config)
    if short is None:
        return None
    dag = build_dag(short)
    return ShortCopy(dag, build_options(profile, dag, blocking_power_w))


def short_pipeline(
    shape: PipelineShape, config: SearchConfig = DEFAULT_SEARCH
) -> PipelineShape | None:
    """The short copy a long pipeline stretches, or None if the pipeline is not long."""
    short = max(config.short_microbatches, config.short_min_stage_multiple * shape.stages)
    short = -(-short // _period(shape)) * _period(shape)
    if shape.microbatches <= short:
        return None
    return replace(shape, microbatches=short)


def _period(shape: PipelineShape) -> int:
    """Microbatches per repeat of the steady state: interleaved 1F1B takes them in groups of S."""
    return 1 if shape.schedule == "1f1b" else shape.stages


def _sweep(
    lp: LpRelaxation,
    *,
    start: float,
    stop: float,
    t0: float,
    slowest_t: float,
    idle_w: float,
    config: SearchConfig,
) -> list[tuple[float, FloatArray, float]]:
    """(deadline, durations, energy) solved from `start` to `stop`, warm-started in order."""
    step = max(config.lp_step * t0, (slowest_t - start) / config.max_lp_solves)
    out: list[tuple[float, FloatArray, float]] = []
    deadline, best = start, 0
    while True:
        solution = lp.solve(deadline)
        if solution is not None:
            out.append((deadline, solution.duration_s, solution.cost_j + idle_w * deadline))
            best = best if out[best][2] <= out[-1][2] else len(out) - 1
        past = bool(out) and deadline > out[best][0] + 2 * step
        if deadline >= stop or (past and deadline > out[best][0] + config.past_t_star * t0):
            return out
        dense = deadline < t0 * (1 + config.dense_above_t0) and step > config.dense_step * t0
        wide = max(step, config.far_step_ratio * abs(deadline - t0))
        following = deadline + (
            config.dense_step * t0 if dense else config.coarse_steps * wide if past else wide
        )
        if deadline < t0 < following:
            following = t0
        deadline = min(following, stop)


def _stretched(
    dag: PipelineDag,
    table: OptionTable,
    copy: ShortCopy,
    outside: tuple[float, float],
    config: SearchConfig,
) -> list[tuple[float, FloatArray, float]]:
    """Relaxed plans of the long pipeline stretched from the short one's path, for deadlines
    outside the span solved at full size."""
    short, short_table = copy
    short_cls = option_classes(short)
    cheapest_s = short_table.time_s[np.arange(short_table.num_classes), short_table.count - 1]
    short_t0 = makespan(short, short_table.max_clock_time_s[short_cls])
    short_slowest = makespan(short, cheapest_s[short_cls])
    idle_w = dag.shape.stages * table.blocking_power_w
    points = _sweep(
        LpRelaxation(short, short_table),
        start=makespan(short, short_table.time_s[short_cls, 0]),
        stop=short_slowest,
        t0=short_t0,
        slowest_t=short_slowest,
        idle_w=idle_w,
        config=config,
    )
    index = _stretch_index(dag, short)
    cls = option_classes(dag)
    out = []
    for _, relaxed, _ in points:
        duration = relaxed[index]
        deadline = makespan(dag, duration)
        if not outside[0] <= deadline <= outside[1]:
            energy = table.relaxed_cost_j(cls, duration) + idle_w * deadline
            out.append((deadline, duration, energy))
    return out


def _stretch_index(long: PipelineDag, short: PipelineDag) -> IntArray:
    """For each node of the long pipeline, the node of the short one whose duration it takes:
    the same class (stage, chunk and kind), the same microbatch in the fill (the first half of
    the short pipeline's microbatches) and the drain (its second half, counted from the end), the
    short pipeline's middle microbatch in between (in an interleaved pipeline, the one at the
    same place in the middle group of S)."""
    position = {
        (int(c), int(m)): i
        for i, (c, m) in enumerate(zip(option_classes(short), short.microbatch, strict=True))
    }
    n_long, n_short = long.shape.microbatches, short.shape.microbatches
    period = _period(long.shape)
    middle = n_short // period // 2 * period
    m = long.microbatch
    mapped = np.where(
        m < middle,
        m,
        np.where(
            m >= n_long - (n_short - middle - period), m - (n_long - n_short), middle + m % period
        ),
    )
    return np.asarray(
        [position[(int(c), int(j))] for c, j in zip(option_classes(long), mapped, strict=True)],
        dtype=np.int64,
    )
