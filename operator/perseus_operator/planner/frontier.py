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
critical paths through it. We build plans on the real discrete options in two moves:

1. *Uniform price.* For a price of time λ (J/s), every instruction takes the option minimising
   ``c + λ*t``. This is the LP optimum for a single critical chain, and sweeping λ over every
   breakpoint of the options' convex hulls gives a ladder of plans from all-fastest (λ = ∞) to
   all-cheapest (λ = 0, the end of any frontier: no plan has a lower ``sum(c)``).
2. *Slack filling.* Instructions off the critical paths have float: they can run slower at no
   cost in time. For a deadline D, starting from the cheapest uniform plan that meets it, a
   backward pass gives every node's latest finish and a forward sweep, level by level (an
   antichain at a time, so moves never conflict), lets each node take the cheapest option that
   fits its float, preferring ``c + μ*t`` with μ stepping down from λ to 0 so that float goes to
   the instructions that save most per second first.

Deadlines are spaced 0.1% of T0 apart (at most 400 of them) from the fastest plan on, so
consecutive plans stay close; every candidate is costed exactly and the frontier keeps the useful
ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from perseus_operator.planner.evaluate import backward_pass, forward_pass
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
_PAD = 1e30  # padded options: never fit any float, never cheapest
_FILL_STEPS = 4  # μ = λ, λ/4, λ/16, 0
_POLISH_BASES = 3
_POLISH_STEPS = 12
_POLISH_RATIO = 0.6


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
            if out and t == out[-1][0]:
                out.pop()
            out.append((t, e, idx))
    return out


class _Search:
    """Plans are option indices per node into the class tables (class = 2*stage + kind)."""

    def __init__(self, dag: PipelineDag, table: OptionTable) -> None:
        self.dag = dag
        self.table = table
        self.cls = 2 * dag.stage + dag.kind
        self.time = np.where(np.isfinite(table.time_s), table.time_s, _PAD)
        self.cost = np.where(np.isfinite(table.cost_j), table.cost_j, _PAD)
        self.idle_power_w = dag.shape.stages * table.blocking_power_w
        self.level_time = tuple(self.time[self.cls[lv]] for lv in dag.levels)
        self.level_cost = tuple(self.cost[self.cls[lv]] for lv in dag.levels)
        self.level_rows = tuple(np.arange(len(lv)) for lv in dag.levels)

    def durations(self, idx: IntArray) -> FloatArray:
        out: FloatArray = self.time[self.cls, idx]
        return out

    def evaluate(self, idx: IntArray) -> tuple[float, float]:
        """(makespan, energy) of a plan; energy = sum(c) + P_b*S*T."""
        finish = forward_pass(self.dag, self.durations(idx))
        t = float(finish[:-1].max())
        return t, float(self.cost[self.cls, idx].sum()) + self.idle_power_w * t

    def baseline(self) -> tuple[float, float]:
        t_s = self.table.max_clock_time_s[self.cls]
        e_j = self.table.max_clock_energy_j[self.cls]
        finish = forward_pass(self.dag, t_s)
        t = float(finish[:-1].max())
        return t, float(e_j.sum()) + self.table.blocking_power_w * (
            self.dag.shape.stages * t - float(t_s.sum())
        )

    def uniform(self, price: float) -> IntArray:
        best = np.argmin(self.cost + price * self.time, axis=1)
        out: IntArray = best[self.cls]
        return out

    def max_clock_plan(self) -> IntArray:
        """The baseline as option indices (its options are efficient unless dominated: then the
        dominating option, no slower and cheaper, replaces it)."""
        best = np.empty(self.table.num_classes, dtype=np.int64)
        for c in range(self.table.num_classes):
            fits = np.nonzero(self.time[c] <= self.table.max_clock_time_s[c])[0]
            best[c] = int(fits[-1])
        out: IntArray = best[self.cls]
        return out

    def fill(self, idx: IntArray, deadline_s: float, prices: list[float]) -> IntArray:
        """Slow nodes within their float (never past `deadline_s`), never to costlier options."""
        idx = idx.copy()
        dag = self.dag
        for price in prices:
            latest_finish = backward_pass(dag, self.durations(idx), deadline_s)
            finish = np.zeros(dag.num_nodes + 1)
            for k, (lv, (p0, p1)) in enumerate(zip(dag.levels, dag.level_preds, strict=True)):
                start = np.maximum(finish[p0], finish[p1])
                avail = latest_finish[lv] - start
                times, costs, rows = self.level_time[k], self.level_cost[k], self.level_rows[k]
                current = idx[lv]
                ok = (times <= avail[:, None]) & (costs <= costs[rows, current][:, None])
                ok[rows, current] = True
                chosen = np.argmin(np.where(ok, costs + price * times, np.inf), axis=1)
                idx[lv] = chosen
                finish[lv] = start + times[rows, chosen]
        return idx

    def fill_backward(self, idx: IntArray, deadline_s: float, prices: list[float]) -> IntArray:
        """`fill` in reverse topological order: late instructions get the float first."""
        idx = idx.copy()
        dag = self.dag
        for price in prices:
            finish = forward_pass(dag, self.durations(idx))
            latest_start = np.empty(dag.num_nodes + 1)
            latest_start[-1] = deadline_s
            for k in range(len(dag.levels) - 1, -1, -1):
                lv = dag.levels[k]
                s0, s1 = dag.level_succs[k]
                latest_finish = np.minimum(latest_start[s0], latest_start[s1])
                times, costs, rows = self.level_time[k], self.level_cost[k], self.level_rows[k]
                current = idx[lv]
                avail = latest_finish - (finish[lv] - times[rows, current])
                ok = (times <= avail[:, None]) & (costs <= costs[rows, current][:, None])
                ok[rows, current] = True
                chosen = np.argmin(np.where(ok, costs + price * times, np.inf), axis=1)
                idx[lv] = chosen
                latest_start[lv] = latest_finish - times[rows, chosen]
        return idx

    def polish(
        self, ladder: list[tuple[float, float, float, IntArray]], deadline_s: float
    ) -> list[tuple[float, float, IntArray]]:
        """A thorough search for one important deadline (T0): the three cheapest uniform plans
        that meet it, each filled forwards and backwards with a fine price ladder."""
        fitting = sorted((r for r in ladder if r[0] <= deadline_s), key=lambda r: r[1])
        out = []
        for _, _, price, base in fitting[:_POLISH_BASES]:
            prices = [price * _POLISH_RATIO**k for k in range(_POLISH_STEPS)] + [0.0]
            for fill in (self.fill, self.fill_backward):
                idx = fill(base, deadline_s, prices)
                out.append((*self.evaluate(idx), idx))
        return out

    def run(self, progress: ProgressCallback | None) -> list[tuple[float, float, IntArray]]:
        slopes = self.table.hull_slopes()
        ladder = []
        for price in _ladder_prices(slopes):
            idx = self.uniform(price)
            t, e = self.evaluate(idx)
            ladder.append((t, e - self.idle_power_w * t, price, idx))
        candidates = [(t, c + self.idle_power_w * t, i) for t, c, _, i in ladder]
        t0, _ = self.baseline()
        fastest_t = min(t for t, *_ in ladder)
        slowest_t = max(t for t, *_ in ladder)
        step = max(GRID_FRACTION * t0, (slowest_t - fastest_t) / MAX_DEADLINES)
        deadlines = [float(d) for d in np.arange(fastest_t, slowest_t + step, step)]
        for n, deadline in enumerate(deadlines):
            fitting = [rung for rung in ladder if rung[0] <= deadline]
            _, _, price, base = min(fitting, key=lambda r: r[1])
            fill_prices = [price / 4**k for k in range(_FILL_STEPS - 1)] + [0.0]
            idx = self.fill(base, deadline, fill_prices)
            candidates.append((*self.evaluate(idx), idx))
            if progress is not None:
                progress(n + 1, len(deadlines) + 1)
        candidates += self.polish(ladder, t0)
        idx = self.fill(self.max_clock_plan(), t0, [0.0])
        candidates.append((*self.evaluate(idx), idx))
        if progress is not None:
            progress(len(deadlines) + 1, len(deadlines) + 1)
        return candidates

    def to_plan(self, idx: IntArray, t: float, e: float) -> Plan:
        freqs = self.table.frequency_mhz[self.cls, idx]
        off = self.dag.offsets
        return Plan(
            iteration_time_s=t,
            energy_j=e,
            frequencies_mhz=tuple(
                tuple(int(f) for f in freqs[off[s] : off[s + 1]])
                for s in range(self.dag.shape.stages)
            ),
        )


def _ladder_prices(slopes: FloatArray) -> list[float]:
    """One price inside every interval between consecutive hull breakpoints, plus both ends."""
    if len(slopes) == 0:
        return [0.0]
    mids = (slopes[:-1] + slopes[1:]) / 2
    return [0.0, *mids.tolist(), float(slopes[-1]) * 2 + 1.0]
