"""The search for a frontier of per-instruction frequency plans (`frontier.compute_frontier`).

How the search works. With effective costs c = e - P_b*t (see `model`), the least-energy plan
that finishes by a deadline D minimises ``sum(c_i)`` subject to the longest path <= D. Choosing
among discrete clocks is NP-hard; its LP relaxation (durations anywhere on each instruction's
lower convex hull) is not, and bounds every plan. We build plans on the real options in four
moves:

1. *Uniform price.* For a price of time λ (J/s), every instruction takes the option minimising
   ``c + λ*t``: a ladder of plans from all-fastest (λ = ∞) to all-cheapest (λ = 0, the end of
   any frontier: no plan has a lower ``sum(c)``).
2. *LP rounding* (`lp`, pipelines up to `SearchConfig.lp_max_instructions`). The relaxation
   is solved along the deadline axis (HiGHS, each solve warm-started from the last),
   interpolated to deadlines 0.1% of T0 apart, and rounded: in topological order each
   instruction takes, among the options that still fit before its latest finish, the one its
   LP price of time prefers (`fill.BatchFill.round_priced`). At T0, the deadline of "no
   slowdown", many more roundings with jittered prices are tried and the best kept.
3. *Slack filling* (`fill`). Every rounded plan is then slowed within its float along a
   descending price ladder, forwards and backwards through the DAG, all deadlines in one batched
   sweep; then gaps left before T* are filled from the plans at their start. (Pipelines too
   large for the LP fill the fastest and the cheapest uniform plan that meet each deadline.)
4. *Exact costing.* Every candidate is costed exactly (longest path, energies, blocking power)
   and the frontier keeps the useful ones.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from perseus_operator.planner.config import DEFAULT_SEARCH, SearchConfig
from perseus_operator.planner.draws import NormalStream
from perseus_operator.planner.evaluate import dag_cost
from perseus_operator.planner.fill import BatchFill
from perseus_operator.planner.lp import hull_prices
from perseus_operator.planner.model import OptionTable, sorted_unique
from perseus_operator.planner.pipeline import PipelineDag
from perseus_operator.planner.plans import Plan, useful
from perseus_operator.planner.relaxed import ShortCopy, relaxed_path

__all__ = ["ProgressCallback", "Search", "fill_prices"]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
ProgressCallback = Callable[[int, int], None]
"""Called as ``progress(done, total)`` while the frontier is searched."""

BACKWARD_PRICES = [0.0]  # the backward sweep only takes what still fits


class _T0Roundings(NamedTuple):
    """The jittered roundings at T0 that `refine_t0` goes on from."""

    duration_s: FloatArray
    """The relaxed plan at T0."""
    bound_j: float
    """Its energy: no plan that meets T0 costs less."""
    jitter: tuple[FloatArray, FloatArray]
    """The roundings' jitters (see `Search.jitter`)."""
    lanes: slice
    """Where the roundings are among the lanes filled first."""
    rng: NormalStream
    """The generator their jitters were drawn from, to draw on from."""


class Search:
    """Runs the search of the module doc over one DAG and option table."""

    def __init__(
        self,
        dag: PipelineDag,
        table: OptionTable,
        short: ShortCopy | None = None,
        config: SearchConfig = DEFAULT_SEARCH,
    ) -> None:
        self.dag = dag
        self.config = config
        self.table = table
        self.short = short
        self.batch = BatchFill(dag, table)
        self.cls = self.batch.cls
        self.idle_power_w = dag.shape.stages * table.blocking_power_w
        self._clocks: list[int] = []

    def baseline(self) -> tuple[float, float]:
        return dag_cost(
            self.dag,
            self.table.max_clock_time_s[self.cls],
            self.table.max_clock_energy_j[self.cls],
            self.table.blocking_power_w,
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
        cfg = self.config
        slopes = self.table.hull_slopes()
        uniform = np.stack([self.uniform(p) for p in _ladder_prices(slopes)])  # plans x nodes
        u_time = self.batch.makespans(uniform.T)
        u_cost = self.batch.costs(uniform.T)
        t0, baseline_j = self.baseline()
        refine = None
        if self.dag.num_nodes <= cfg.lp_max_instructions:
            base, deadline_s, refine = self.lp_bases(uniform, u_time, u_cost, t0)
            prices = fill_prices(slopes, cfg.fill_steps_lp)
        else:
            base, deadline_s = self.uniform_bases(uniform, u_time, u_cost, t0)
            prices = fill_prices(slopes, cfg.fill_steps)
        # Plans are stored as int16 option indices (a 16k-instruction pipeline has hundreds of
        # lanes) and widened one chunk of lanes at a time.
        base = np.concatenate((base, self.max_clock_plan()[:, None]), axis=1).astype(np.int16)
        deadline_s = np.append(deadline_s, t0)
        kept = self.evaluated(uniform.T)
        chunk = max(1, cfg.lane_elements // self.dag.num_nodes)
        lanes = base.shape[1]
        filled_energy = np.empty(lanes)  # each lane's energy once filled both ways (inf: late)
        for first in range(0, lanes, chunk):
            part = slice(first, first + chunk)
            start = base[:, part].astype(np.int64)
            forward, both = self.fill_lanes(start, deadline_s[part], prices)
            filled = self.evaluated(both)
            filled_energy[part] = _on_time_energies(filled, deadline_s[part])
            found = self.evaluated(start) + self.evaluated(forward) + filled
            kept = useful(kept + found, self.idle_power_w)
            if progress is not None:
                progress(min(first + chunk, lanes), lanes)
        if refine is not None:
            enough_j = refine.bound_j + cfg.refine_gap * baseline_j
            kept = self.refine_t0(
                kept, refine, filled_energy[refine.lanes], t0, prices, enough_j=enough_j
            )
        return self.close_gaps(kept, t0, prices)

    def fill_lanes(
        self, base: IntArray, deadline_s: FloatArray, prices: list[float]
    ) -> tuple[IntArray, IntArray]:
        """Every lane of `base` filled forwards along `prices`, and that filled backwards."""
        forward = self.batch.fill(base, deadline_s, prices, backward=False)
        return forward, self.batch.fill(forward, deadline_s, BACKWARD_PRICES, backward=True)

    def refine_t0(
        self,
        kept: list[tuple[float, float, IntArray]],
        start: _T0Roundings,
        energy_j: FloatArray,
        t0: float,
        prices: list[float],
        *,
        enough_j: float,
    ) -> list[tuple[float, float, IntArray]]:
        """The no-slowdown plan, searched harder where the bound leaves room: while the best
        plan at T0 costs more than `enough_j` (`refine_gap` of the baseline energy above the LP
        bound; pipelines up to `refine_max_instructions`), up to `refine_rounds` rounds of
        `refine_lanes` roundings jittered a little around the best so far, a seeded evolution
        in the space of prices that started with the `random_lanes` roundings of `lp_bases`
        (`energy_j`: their energies, filled), so that one lucky draw decides less."""
        cfg = self.config
        if self.dag.num_nodes > cfg.refine_max_instructions:
            return kept
        rng = start.rng
        jitter, relaxed = start.jitter, start.duration_s
        best_j, best = -1, np.inf
        for round_ in range(1 + cfg.refine_rounds):
            if round_:
                lanes = self.jittered(relaxed[:, None], np.asarray([t0]), jitter, cfg.refine_lanes)
                _, both = self.fill_lanes(lanes, np.full(lanes.shape[1], t0), prices)
                found = self.evaluated(both)
                kept = useful(kept + found, self.idle_power_w)
                energy_j = _on_time_energies(found, t0)
            lane = int(np.argmin(energy_j))
            if energy_j[lane] < best:
                best, best_j = float(energy_j[lane]), lane
                center = (jitter[0][:, best_j], jitter[1][:, best_j])
            # Every lane filled so far is in `kept`, which always holds the cheapest plan at T0.
            at_t0 = min((e for t, e, _ in kept if t <= t0), default=np.inf)
            if round_ == cfg.refine_rounds or best_j < 0 or at_t0 <= enough_j:
                break
            shape = (cfg.refine_lanes,)
            jitter = (
                center[0][:, None]
                + cfg.refine_spreads[0] * rng.standard_normal(center[0].shape + shape),
                center[1][:, None]
                + cfg.refine_spreads[1] * rng.standard_normal(center[1].shape + shape),
            )
        return kept

    def evaluated(self, idx: IntArray) -> list[tuple[float, float, IntArray]]:
        """Exact (time, energy, plan) of each lane of `idx` (nodes x lanes)."""
        times = self.batch.makespans(idx)
        energies = self.batch.costs(idx) + self.idle_power_w * times
        return [(float(t), float(e), i.astype(np.int16))
                for t, e, i in zip(times, energies, idx.T, strict=True)]  # fmt: skip

    def lp_bases(
        self, uniform: IntArray, u_time: FloatArray, u_cost: FloatArray, t0: float
    ) -> tuple[IntArray, FloatArray, _T0Roundings | None]:
        """Plans to fill (nodes x lanes) and their deadlines: the LP roundings, jittered ones
        from T0 to just past it, and past the relaxation's path the cheapest uniform-price
        plans; and what `refine_t0` goes on from, if T0 was solved."""
        cfg = self.config
        fastest_t, slowest_t = float(u_time.min()), float(u_time.max())
        base, deadline_s, path_near_t0 = self.lp_rounded(t0, fastest_t, slowest_t)
        if len(deadline_s) and deadline_s.max() < slowest_t:
            tail = np.arange(deadline_s.max(), slowest_t, cfg.tail_step * t0)[1:]
            if len(tail):
                # Both the cheapest uniform plan and the slowest LP rounding, filled onwards.
                last = base[:, int(np.argmax(deadline_s))]
                cheapest = [self.cheapest_uniform(uniform, u_time, u_cost, d) for d in tail]
                base = np.concatenate(
                    (base, np.stack(cheapest, axis=1), np.repeat(last[:, None], len(tail), 1)),
                    axis=1,
                )
                deadline_s = np.concatenate((deadline_s, tail, tail))
        # Jittered roundings of the relaxed plans solved from T0 to just past it, all in one
        # batch: `random_lanes` at T0 (where `refine_t0` goes on), a few at each other one.
        if not path_near_t0:
            return base, deadline_s, None
        near_s = np.asarray([d for d, _ in path_near_t0])
        relaxed = np.stack([r for _, r in path_near_t0], axis=1)
        # The draws at T0 come first from their own generator, which `refine_t0` goes on with.
        t0_rng, near_rng = (
            NormalStream(cfg.seed),
            NormalStream(cfg.seed + 1),
        )
        parts = [
            self.jitter(t0_rng, cfg.random_lanes)
            if d == t0
            else self.jitter(near_rng, cfg.random_lanes_near_t0)
            for d in near_s
        ]
        jitter = (
            np.concatenate([p[0] for p in parts], axis=1),
            np.concatenate([p[1] for p in parts], axis=1),
        )
        each = np.asarray([p[0].shape[1] for p in parts])  # lanes per solved deadline
        refine = None
        if t0 in near_s:
            k = int(np.nonzero(near_s == t0)[0][0])
            first = int(each[:k].sum())
            own = slice(first, first + cfg.random_lanes)
            refine = _T0Roundings(
                duration_s=relaxed[:, k],
                bound_j=self.table.relaxed_cost_j(self.cls, relaxed[:, k]) + self.idle_power_w * t0,
                jitter=(jitter[0][:, own], jitter[1][:, own]),
                lanes=slice(base.shape[1] + first, base.shape[1] + first + cfg.random_lanes),
                rng=t0_rng,
            )
        base = np.concatenate((base, self.jittered(relaxed, near_s, jitter, each)), axis=1)
        return base, np.concatenate((deadline_s, np.repeat(near_s, each))), refine

    def lp_rounded(
        self, t0: float, fastest_t: float, slowest_t: float
    ) -> tuple[IntArray, FloatArray, tuple[tuple[float, FloatArray], ...]]:
        """Discrete plans rounded from the LP relaxation's path (nodes x lanes), their
        deadlines, and the relaxed plans solved at and just past T0 (worth more roundings).

        Deadlines are `grid_fraction` of T0 apart up to a little past the relaxation's least
        energy (`fast_grid_fraction` faster than T0, where energy falls steeply with time),
        half a `tail_step` apart to the path's end, and every solved deadline."""
        cfg = self.config
        path = relaxed_path(
            self.dag, self.table, t0, fastest_t, slowest_t, short=self.short, config=cfg
        )
        if path is None:
            return np.zeros((self.dag.num_nodes, 0), dtype=np.int64), np.zeros(0), ()
        at = path.deadline_s
        fine_end = min(path.t_star_s + cfg.fine_past_t_star * t0, float(at[-1]))
        grid = max(cfg.grid_fraction * t0, (fine_end - at[0]) / cfg.max_deadlines)
        steep = np.arange(at[0], min(t0, fine_end), cfg.fast_grid_fraction * t0)
        fine = np.arange(max(at[0], min(t0, fine_end)), fine_end, grid)
        beyond = np.arange(fine_end, at[-1], cfg.tail_step * t0 / 2)
        deadline_s = sorted_unique(np.concatenate((steep, fine, beyond, at)))
        duration_s = path.at(deadline_s)
        price = hull_prices(self.table, self.cls, duration_s)
        return self.batch.round_priced(duration_s, price, deadline_s), deadline_s, path.near_t0

    def jitter(self, rng: NormalStream, lanes: int) -> tuple[FloatArray, FloatArray]:
        """Log-normal jitters for `lanes` roundings, (per class, per node), each lanes wide:
        per class (every forward of a stage alike, a systematic lean that holds along the
        whole steady state) and per instruction, at the spreads of `random_spreads` in turn."""
        cfg = self.config
        spread = np.asarray(cfg.random_spreads)[np.arange(lanes) % len(cfg.random_spreads)].T
        per_class = spread[0] * rng.standard_normal((self.table.num_classes, lanes))
        per_node = spread[1] * rng.standard_normal((self.dag.num_nodes, lanes))
        return per_class, per_node

    def jittered(
        self,
        duration_s: FloatArray,
        deadline_s: FloatArray,
        jitter: tuple[FloatArray, FloatArray],
        lanes_each: int | IntArray,
    ) -> IntArray:
        """Roundings (nodes x lanes) of relaxed plans (nodes x plans, each with its deadline),
        `lanes_each` per plan, with their prices of time jittered lane by lane. Which
        fractional instructions go up decides how well the float left by the ones that went
        down is reused, and the best of many tries (once filled) lands measurably closer to
        the bound than the plain rounding."""
        price = np.repeat(hull_prices(self.table, self.cls, duration_s), lanes_each, axis=1)
        price *= np.exp(jitter[0][self.cls] + jitter[1])
        return self.batch.round_priced(
            np.repeat(duration_s, lanes_each, axis=1), price, np.repeat(deadline_s, lanes_each)
        )

    def uniform_bases(
        self, uniform: IntArray, u_time: FloatArray, u_cost: FloatArray, t0: float
    ) -> tuple[IntArray, FloatArray]:
        """Plans to fill (nodes x lanes) where the pipeline is too large for the LP: for each
        deadline, the fastest plan and the cheapest uniform-price plan that meets it."""
        cfg = self.config
        fastest_t, slowest_t = float(u_time.min()), float(u_time.max())
        step = max(cfg.grid_fraction * t0, (slowest_t - fastest_t) / cfg.max_deadlines)
        deadlines = sorted({*np.arange(fastest_t, slowest_t + step / 2, step).tolist(), t0})
        fastest = uniform[int(np.argmin(u_time))]
        bases, lane_deadlines = [], []
        for deadline in deadlines:
            bases += [fastest, self.cheapest_uniform(uniform, u_time, u_cost, deadline)]
            lane_deadlines += [deadline, deadline]
        return np.stack([b.astype(np.int16) for b in bases], axis=1), np.asarray(lane_deadlines)

    @staticmethod
    def cheapest_uniform(
        uniform: IntArray, u_time: FloatArray, u_cost: FloatArray, deadline_s: float
    ) -> IntArray:
        """The cheapest uniform-price plan that meets `deadline_s` (the fastest always does)."""
        fitting = np.nonzero(u_time <= deadline_s)[0]
        out: IntArray = uniform[fitting[np.argmin(u_cost[fitting])]]
        return out

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
        the gap, forwards and then back as the main lanes are. Repeats up to `gap_rounds` times
        (a gap that stays has no useful plan found inside it)."""
        cfg = self.config
        step = cfg.grid_fraction * t0 / 2
        tried: set[tuple[float, float]] = set()
        for _ in range(cfg.gap_rounds):
            star = min(range(len(kept)), key=lambda k: kept[k][1])
            bases, deadlines = [], []
            for (ta, _, ia), (tb, _, _) in itertools.pairwise(kept[: star + 1]):
                # A gap already filled from the same plan would give the same lanes again.
                if tb - ta > cfg.gap_target * t0 and (ta, tb) not in tried:
                    tried.add((ta, tb))
                    plan = ia.astype(np.int64)
                    for d in np.arange(ta + step, tb, step):
                        bases.append(plan)
                        deadlines.append(float(d))
                    # A plan stuck in its float still has cheaper neighbours: its instructions
                    # that save most per second, one option slower each (1, 2, 3, ... of them).
                    steps = self.cheapest_steps(plan, cfg.gap_nudges[-1])
                    for k in cfg.gap_nudges:
                        if k > len(steps):
                            break
                        nudged = plan.copy()
                        nudged[steps[:k]] += 1
                        bases.append(nudged)
                        deadlines.append(ta)
            if not bases:
                break
            found = []
            chunk = max(1, cfg.lane_elements // self.dag.num_nodes)
            for first in range(0, len(bases), chunk):
                base = np.stack(bases[first : first + chunk], axis=1)
                deadline_s = np.maximum(
                    np.asarray(deadlines[first : first + chunk]), self.batch.makespans(base)
                )
                forward, both = self.fill_lanes(base, deadline_s, prices)
                found += self.evaluated(forward) + self.evaluated(both)
            kept = useful(kept + found, self.idle_power_w)
        return kept

    def to_plan(self, idx: IntArray, t: float, e: float) -> Plan:
        # Every plan's clocks are the same few int objects (one per option of the table): a
        # 16k-instruction frontier of hundreds of plans would otherwise hold millions of ints.
        if not self._clocks:
            self._clocks = [int(f) for f in self.table.frequency_mhz.ravel().tolist()]
        flat = (self.batch.node_row[:, 0] + idx.astype(np.int64)).tolist()
        clocks = list(map(self._clocks.__getitem__, flat))
        off = self.dag.offsets.tolist()
        return Plan(
            iteration_time_s=t,
            energy_j=e,
            frequencies_mhz=tuple(
                tuple(clocks[off[s] : off[s + 1]]) for s in range(self.dag.shape.stages)
            ),
        )


def _on_time_energies(
    found: list[tuple[float, float, IntArray]], deadline_s: float | FloatArray
) -> FloatArray:
    """Each evaluated lane's energy, or infinity where it misses its deadline."""
    times = np.asarray([t for t, _, _ in found])
    out: FloatArray = np.where(times <= deadline_s, [e for _, e, _ in found], np.inf)
    return out


def fill_prices(slopes: FloatArray, steps: int) -> list[float]:
    """A geometric ladder from just above the steepest hull slope to just below the flattest."""
    if len(slopes) == 0:
        return [0.0]
    high, low = float(slopes[-1]) * 1.01, max(float(slopes[0]) * 0.99, 1e-9)
    ratio = (low / high) ** (1 / max(steps - 1, 1))
    return [high * ratio**k for k in range(steps)] + [0.0]


def _ladder_prices(slopes: FloatArray) -> list[float]:
    """One price inside every interval between consecutive hull breakpoints, plus both ends."""
    if len(slopes) == 0:
        return [0.0]
    mids = (slopes[:-1] + slopes[1:]) / 2
    return [0.0, *mids.tolist(), float(slopes[-1]) * 2 + 1.0]
