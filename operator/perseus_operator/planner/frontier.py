"""The iteration-time vs. energy frontier of per-instruction frequency plans.

API (stable; the operator and the CLI use it):

- ``compute_frontier(profile, pipeline, blocking_power_w, progress=None) -> Frontier``
- ``Frontier``: ``order`` (each stage's ``F<m>``/``B<m>`` sequence), ``plans`` (sorted by
  iteration time; ``energy_j - blocking_power_w * stages * iteration_time_s`` strictly decreases,
  so every plan is the best choice at some pace), ``t0_s``/``baseline_energy_j`` (all GPUs at
  maximum clock), ``fastest``, ``t_star`` (least-energy plan).

How the search works. With effective costs c = e - P_b*t (see `model`), the least-energy plan
that finishes by a deadline D minimises ``sum(c_i)`` subject to the longest path <= D. Its LP
relaxation is a project-crashing problem whose optimum prices time per instruction: the flow of
critical paths through it. We build plans on the real discrete options in four moves:

1. *Uniform price.* For a price of time λ (J/s), every instruction takes the option minimising
   ``c + λ*t``. This is the LP optimum for a single critical chain, and sweeping λ over every
   breakpoint of the options' convex hulls gives a ladder of plans from all-fastest (λ = ∞) to
   all-cheapest (λ = 0, the end of any frontier: no plan has a lower ``sum(c)``).
2. *Crashing along minimum cuts* (`crash`, pipelines up to `CRASH_MAX_INSTRUCTIONS`). From the
   all-cheapest plan, repeatedly shorten every critical path at the least cost (a minimum vertex
   cut of the critical subgraph, Phillips-Dessouky style, on the real options). This speeds up
   what all critical paths share (the pipeline's fill and drain) instead of whole stages.
3. *Slack filling* (`fill`). For each deadline, starting from the all-fastest plan, the cheapest
   uniform plan and the cheapest crashed plan that meet it, instructions are slowed within
   their float along a descending price ladder, forwards and backwards through the DAG.
   Deadlines are 0.1% of T0 apart (at most 400), all filled in one batched sweep; then gaps
   left before T* are filled from the plans at their start.
4. *LP rounding* (`lp`, pipelines up to `LP_MAX_INSTRUCTIONS`). At T0, the deadline of "no
   slowdown", the LP optimum (HiGHS) is rounded instruction by instruction under its own finish
   times, then filled: the LP sees how critical-path flows price each instruction.

Every candidate is costed exactly (longest path, energies, blocking power) and the frontier keeps
the useful ones.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from perseus_operator.planner.crash import crash_by_cuts
from perseus_operator.planner.evaluate import forward_pass
from perseus_operator.planner.fill import BatchFill
from perseus_operator.planner.lp import lp_finish_times
from perseus_operator.planner.model import OptionTable, build_options
from perseus_operator.planner.pipeline import PipelineDag, PipelineShape, build_dag
from perseus_profiles import StageProfile

__all__ = ["Frontier", "Plan", "ProgressCallback", "compute_frontier"]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
ProgressCallback = Callable[[int, int], None]
"""Called as ``progress(done, total)`` while the frontier is searched."""

GRID_FRACTION = 0.001  # deadline spacing, as a fraction of T0 ...
MAX_DEADLINES = 400  # ... unless the frontier is so long that this bounds the work
GAP_TARGET = 0.0015  # consecutive plans before T* at most this far apart (fraction of T0)
LP_MAX_INSTRUCTIONS = 6144  # larger pipelines skip the LP rounding (HiGHS time grows fast)
CRASH_MAX_INSTRUCTIONS = 2048  # larger pipelines skip the min-cut crash (a max-flow per cut)
CRASH_STEP = 0.001  # each cut shortens the critical paths by this fraction of T0 ...
CRASH_MAX_ROUNDS = 300  # ... or more, so that about this many cuts span the frontier
FINE_CRASH_MAX_INSTRUCTIONS = 1024  # up to this size, half the step and twice the cuts: finer
# crashed plans are better bases mid-frontier (8 x 24 against lowtime: worst excess 0.9-2.3% ->
# 0.2-0.65%), at a cost that grows with the pipeline; they also get twice the gap rounds
_GAP_ROUNDS = 6
_GAP_NUDGES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)
_FILL_STEPS = 12  # rungs of the price ladder (plus μ = 0)
_LANE_ELEMENTS = 2_000_000  # lanes x nodes per batch: bounds memory on large pipelines


@dataclass(frozen=True)
class Plan:
    """One frequency plan and what it really costs under the profile (per pipeline: one GPU per
    stage). ``frequencies_mhz[s][i]`` is the clock for ``Frontier.order[s][i]``."""

    iteration_time_s: float
    energy_j: float
    frequencies_mhz: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class Frontier:
    pipeline: PipelineShape
    blocking_power_w: float
    order: tuple[tuple[str, ...], ...]
    plans: tuple[Plan, ...]
    t0_s: float
    """Iteration time with every GPU at its maximum clock."""
    baseline_energy_j: float
    """Energy with every GPU at its maximum clock."""

    @property
    def fastest(self) -> Plan:
        return self.plans[0]

    @property
    def t_star(self) -> Plan:
        """The least-energy plan (its time is T*)."""
        return min(self.plans, key=lambda p: p.energy_j)


def compute_frontier(
    profile: StageProfile,
    pipeline: PipelineShape,
    blocking_power_w: float,
    progress: ProgressCallback | None = None,
) -> Frontier:
    """The frontier of frequency plans for `pipeline` under `profile` (see the module doc)."""
    if not np.isfinite(blocking_power_w) or blocking_power_w < 0:
        raise ValueError(f"blocking power must be a finite number >= 0 W, got {blocking_power_w}")
    dag = build_dag(pipeline)
    table = build_options(profile, dag, blocking_power_w)
    search = _Search(dag, table)
    candidates = search.run(progress)
    plans = _useful(candidates, pipeline.stages * blocking_power_w)
    t0, e0 = search.baseline()
    return Frontier(
        pipeline=pipeline,
        blocking_power_w=float(blocking_power_w),
        order=dag.order,
        plans=tuple(search.to_plan(idx, t, e) for t, e, idx in plans),
        t0_s=t0,
        baseline_energy_j=e0,
    )


def _useful(
    candidates: list[tuple[float, float, IntArray]], idle_power_w: float
) -> list[tuple[float, float, IntArray]]:
    """Plans sorted by time whose `energy - idle_power*time` strictly decreases."""
    out: list[tuple[float, float, IntArray]] = []
    for t, e, idx in sorted(candidates, key=lambda c: (c[0], c[1])):
        if not out or e - idle_power_w * t < out[-1][1] - idle_power_w * out[-1][0]:
            out.append((t, e, idx))
    return out


class _Search:
    """Runs the search of the module doc over one DAG and option table."""

    def __init__(self, dag: PipelineDag, table: OptionTable) -> None:
        self.dag = dag
        self.table = table
        self.batch = BatchFill(dag, table)
        self.cls = self.batch.cls
        self.idle_power_w = dag.shape.stages * table.blocking_power_w
        self._pool: dict[int, int] = {}

    def baseline(self) -> tuple[float, float]:
        t_s = self.table.max_clock_time_s[self.cls]
        e_j = self.table.max_clock_energy_j[self.cls]
        finish = forward_pass(self.dag, t_s)
        t = float(finish[:-1].max())
        return t, float(e_j.sum()) + self.table.blocking_power_w * (
            self.dag.shape.stages * t - float(t_s.sum())
        )

    def uniform(self, price: float) -> IntArray:
        """Every instruction at the efficient option minimising ``c + price*t``."""
        best = np.argmin(self.batch.cost + price * self.batch.time, axis=1)
        out: IntArray = best[self.cls]
        return out

    def max_clock_plan(self) -> IntArray:
        """The baseline as option indices (a dominated max-clock option is replaced by the option
        that dominates it: no slower, cheaper)."""
        best = np.empty(self.table.num_classes, dtype=np.int64)
        for c in range(self.table.num_classes):
            fits = np.nonzero(self.batch.time[c] <= self.table.max_clock_time_s[c])[0]
            best[c] = int(fits[-1])
        out: IntArray = best[self.cls]
        return out

    def run(self, progress: ProgressCallback | None) -> list[tuple[float, float, IntArray]]:
        slopes = self.table.hull_slopes()
        uniform = np.stack([self.uniform(p) for p in _ladder_prices(slopes)])  # plans x nodes
        u_time = self.batch.makespans(uniform.T)
        u_cost = self.batch.costs(uniform.T)
        t0, _ = self.baseline()
        fastest_t, slowest_t = float(u_time.min()), float(u_time.max())
        # Crash from the cheapest plan (every instruction at its least e - P_b*t) down to the
        # fastest one along minimum cuts: plans that slow the pipeline's steady state, not its
        # fill and drain.
        crashed = np.zeros((0, self.dag.num_nodes), dtype=np.int64)
        if self.dag.num_nodes <= CRASH_MAX_INSTRUCTIONS:
            fine = 2 if self.dag.num_nodes <= FINE_CRASH_MAX_INSTRUCTIONS else 1
            rounds = fine * CRASH_MAX_ROUNDS
            step = max(CRASH_STEP / fine * t0, (slowest_t - fastest_t) / rounds)
            cheapest = uniform[int(np.argmin(u_cost))]
            found = crash_by_cuts(self.batch, cheapest, fastest_t, step, 2 * rounds)
            if found:
                crashed = np.stack(found)
        c_time = self.batch.makespans(crashed.T) if len(crashed) else np.zeros(0)
        c_cost = self.batch.costs(crashed.T) if len(crashed) else np.zeros(0)
        step = max(GRID_FRACTION * t0, (slowest_t - fastest_t) / MAX_DEADLINES)
        deadlines = sorted({*np.arange(fastest_t, slowest_t + step / 2, step).tolist(), t0})
        fastest = uniform[int(np.argmin(u_time))]
        bases, lane_deadlines = [], []
        for deadline in deadlines:
            fitting = np.nonzero(u_time <= deadline)[0]
            chosen = [fastest, uniform[fitting[np.argmin(u_cost[fitting])]]]
            fitting = np.nonzero(c_time <= deadline)[0]
            if len(fitting):
                chosen.append(crashed[fitting[np.argmin(c_cost[fitting])]])
            bases += chosen
            lane_deadlines += [deadline] * len(chosen)
        bases.append(self.max_clock_plan())
        lane_deadlines.append(t0)
        prices = _fill_prices(slopes)
        extra = self.lp_lanes(t0, prices) if self.dag.num_nodes <= LP_MAX_INSTRUCTIONS else []
        kept = _useful(
            [(float(t), float(c) + self.idle_power_w * float(t), u.astype(np.int16))
             for t, c, u in zip([*u_time, *c_time], [*u_cost, *c_cost], [*uniform, *crashed],
                                strict=True)] + extra,
            self.idle_power_w,
        )  # fmt: skip
        chunk = max(1, _LANE_ELEMENTS // self.dag.num_nodes)
        total = 2 * len(bases)
        done = 0
        for first in range(0, len(bases), chunk):
            base = np.stack(bases[first : first + chunk], axis=1)
            deadline_s = np.asarray(lane_deadlines[first : first + chunk])
            for backward in (False, True):
                idx = self.batch.fill(base, deadline_s, prices, backward=backward)
                times = self.batch.makespans(idx)
                energies = self.batch.costs(idx) + self.idle_power_w * times
                kept = _useful(
                    kept + [(float(t), float(e), i.astype(np.int16))
                            for t, e, i in zip(times, energies, idx.T, strict=True)],
                    self.idle_power_w,
                )  # fmt: skip
                done += base.shape[1]
                if progress is not None:
                    progress(done, total)
        return self.close_gaps(kept, t0, prices)

    def cheapest_steps(self, plan: IntArray, count: int) -> IntArray:
        """The `count` nodes whose next slower option saves the most effective energy per second
        it adds."""
        nxt = np.minimum(plan + 1, self.table.count[self.cls] - 1)
        gain = self.batch.cost[self.cls, plan] - self.batch.cost[self.cls, nxt]
        extra = self.batch.time[self.cls, nxt] - self.batch.time[self.cls, plan]
        rate = np.where(nxt > plan, gain / np.where(nxt > plan, extra, 1.0), -np.inf)
        best = np.argsort(-rate, kind="stable")[:count]
        out: IntArray = best[rate[best] > 0]
        return out

    def close_gaps(
        self, kept: list[tuple[float, float, IntArray]], t0: float, prices: list[float]
    ) -> list[tuple[float, float, IntArray]]:
        """Where consecutive plans before T* are far apart (typically right after an LP-rounded
        plan that no filled plan beats), fill the plan at the gap's start to deadlines inside
        the gap. Repeats a few times; a gap that stays has no useful plan found inside it."""
        tried: set[tuple[float, float]] = set()
        fine = self.dag.num_nodes <= FINE_CRASH_MAX_INSTRUCTIONS
        for _ in range(2 * _GAP_ROUNDS if fine else _GAP_ROUNDS):
            star = min(range(len(kept)), key=lambda k: kept[k][1])
            bases, deadlines = [], []
            for (ta, _, ia), (tb, _, _) in itertools.pairwise(kept[: star + 1]):
                # A gap already filled from the same plan would give the same lanes again.
                if tb - ta > GAP_TARGET * t0 and (ta, tb) not in tried:
                    tried.add((ta, tb))
                    plan = ia.astype(np.int64)
                    for d in np.arange(ta + GRID_FRACTION * t0 / 2, tb, GRID_FRACTION * t0 / 2):
                        bases.append(plan)
                        deadlines.append(float(d))
                    # A plan stuck in its float still has cheaper neighbours: its instructions
                    # that save most per second, one option slower each (1, 2, 3, ... of them).
                    steps = self.cheapest_steps(plan, _GAP_NUDGES[-1])
                    for k in _GAP_NUDGES:
                        if k > len(steps):
                            break
                        nudged = plan.copy()
                        nudged[steps[:k]] += 1
                        bases.append(nudged)
                        deadlines.append(ta)
            if not bases:
                break
            found = []
            chunk = max(1, _LANE_ELEMENTS // self.dag.num_nodes)
            for first in range(0, len(bases), chunk):
                base = np.stack(bases[first : first + chunk], axis=1)
                deadline_s = np.maximum(
                    np.asarray(deadlines[first : first + chunk]), self.batch.makespans(base)
                )
                for backward in (False, True):
                    idx = self.batch.fill(base, deadline_s, prices, backward=backward)
                    times = self.batch.makespans(idx)
                    energies = self.batch.costs(idx) + self.idle_power_w * times
                    found += [(float(t), float(e), i.astype(np.int16))
                              for t, e, i in zip(times, energies, idx.T, strict=True)]  # fmt: skip
            kept = _useful(kept + found, self.idle_power_w)
        return kept

    def lp_lanes(
        self, deadline_s: float, prices: list[float]
    ) -> list[tuple[float, float, IntArray]]:
        """Plans rounded from the LP optimum at `deadline_s`, then filled."""
        finish = lp_finish_times(self.dag, self.table, deadline_s)
        if finish is None:
            return []
        rounded = self.batch.round_under(finish)
        lanes = [rounded]
        deadline = np.asarray([deadline_s])
        for backward in (False, True):
            lanes.append(self.batch.fill(rounded, deadline, [0.0], backward=backward))
            lanes.append(self.batch.fill(rounded, deadline, prices, backward=backward))
        idx = np.concatenate(lanes, axis=1)
        times = self.batch.makespans(idx)
        energies = self.batch.costs(idx) + self.idle_power_w * times
        return [(float(t), float(e), i.astype(np.int16))
                for t, e, i in zip(times, energies, idx.T, strict=True)]  # fmt: skip

    def to_plan(self, idx: IntArray, t: float, e: float) -> Plan:
        freqs = self.table.frequency_mhz[self.cls, idx.astype(np.int64)]
        # Share one int object per clock across all plans: a 16k-instruction frontier of
        # hundreds of plans would otherwise hold millions of separate ints.
        pool, codes = np.unique(freqs, return_inverse=True)
        values = [self._pool.setdefault(int(f), int(f)) for f in pool]
        off = self.dag.offsets
        return Plan(
            iteration_time_s=t,
            energy_j=e,
            frequencies_mhz=tuple(
                tuple(map(values.__getitem__, codes[off[s] : off[s + 1]].tolist()))
                for s in range(self.dag.shape.stages)
            ),
        )


def _fill_prices(slopes: FloatArray) -> list[float]:
    """A geometric ladder from just above the steepest hull slope to just below the flattest."""
    if len(slopes) == 0:
        return [0.0]
    high, low = float(slopes[-1]) * 1.01, max(float(slopes[0]) * 0.99, 1e-9)
    ratio = (low / high) ** (1 / max(_FILL_STEPS - 1, 1))
    return [high * ratio**k for k in range(_FILL_STEPS)] + [0.0]


def _ladder_prices(slopes: FloatArray) -> list[float]:
    """One price inside every interval between consecutive hull breakpoints, plus both ends."""
    if len(slopes) == 0:
        return [0.0]
    mids = (slopes[:-1] + slopes[1:]) / 2
    return [0.0, *mids.tolist(), float(slopes[-1]) * 2 + 1.0]
