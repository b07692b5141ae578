"""A straggler's plan, solved at its pace instead of looked up in the frontier.

While a straggler sets the pace at T', every other pipeline waits for it anyway: over the
straggler's iteration a plan with time t <= T' costs ``E(t) + P_b*S*(T' - t)``, which is
``sum(c_i) + P_b*S*T'`` with the effective costs of `model`. That is the least-energy problem at
deadline T' with idle time charged at blocking power, and its LP relaxation bounds every plan.
The frontier only holds plans at the deadlines it searched, further apart past T*, so looking T'
up there leaves up to about 0.8% of the bound on the table; solving at T' itself (the LP at T',
rounded with its prices, jittered, filled, as `frontier` does at T0) closes most of that.

`PacePlanner` keeps the DAG, the option table and one HiGHS model per frontier, so that each new
pace re-solves the LP from the last basis (a pace moves one right-hand side). From scratch that
LP is most of a solve on long pipelines (about 0.3 s of 0.4 at 8 x 96), and from a pace 0.05 x T0
away hardly less; `prepare` solves it once along a grid of paces and keeps each basis, so a
straggler's pace starts from the nearest (a tenth of the pivots). The operator prepares a planner
in the background when a frontier lands, before any straggler. It compares its plan with the
frontier lookup by exact cost and returns the cheaper: never worse than the lookup.
"""

from __future__ import annotations

import bisect
import math
import threading
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from perseus_operator.planner.config import DEFAULT_SEARCH, SearchConfig
from perseus_operator.planner.draws import NormalStream
from perseus_operator.planner.fill import BatchFill
from perseus_operator.planner.lookup import plan_for_straggler
from perseus_operator.planner.lp import LpRelaxation, fractional_segments, hull_prices
from perseus_operator.planner.model import build_options
from perseus_operator.planner.pipeline import build_dag
from perseus_operator.planner.plans import Frontier, Plan
from perseus_operator.planner.search import Search, fill_prices
from perseus_profiles import StageProfile

__all__ = ["PacePlan", "PacePlanner"]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

_TIME_TOLERANCE = 1e-12  # relative: a plan "meets" the pace within floating-point noise


@dataclass(frozen=True)
class PacePlan:
    """The plan chosen for a straggler's pace and what it costs over the straggler's iteration."""

    plan: Plan
    pace_s: float
    cost_j: float
    """Energy per pipeline over the straggler's iteration: the plan's energy plus blocking power
    on every GPU while it waits from the plan's end to the pace."""
    bound_j: float | None
    """The LP relaxation's cost at the pace, a lower bound on `cost_j` of any plan (None when
    the pace is faster than any plan, or the LP failed)."""
    source: Literal["solved", "frontier"]
    """Which gave the plan: the solve at the pace, or the frontier lookup (kept when the solve
    found nothing cheaper)."""
    lp_pivots: int = 0
    """Simplex iterations the LP at the pace took (0 where none was solved): few when it
    started from a nearby pace's basis (see `PacePlanner.prepare`)."""

    @property
    def gap(self) -> float | None:
        """`cost_j` over the bound, minus one (0.001 = 0.1% above the bound)."""
        return None if self.bound_j is None else self.cost_j / self.bound_j - 1.0


class PacePlanner:
    """Solves straggler plans for one profile and frontier; safe to share between threads (one
    solve at a time: the HiGHS model keeps the last basis). `config` is the search's knobs (its
    `pace_*` ones, the seed and the fill ladder), the defaults unless given."""

    def __init__(
        self, profile: StageProfile, frontier: Frontier, config: SearchConfig = DEFAULT_SEARCH
    ) -> None:
        pipeline = frontier.pipeline
        self.frontier = frontier
        self.config = config
        self.dag = build_dag(pipeline)
        self.table = build_options(profile, self.dag, frontier.blocking_power_w)
        self.search = Search(self.dag, self.table, config=config)
        self.batch: BatchFill = self.search.batch
        self.idle_power_w = pipeline.stages * frontier.blocking_power_w
        self.prices = fill_prices(self.table.hull_slopes(), config.fill_steps_lp)
        cheapest = self.table.count[self.search.cls] - 1
        self._cheapest = cheapest.astype(np.int64)
        self.slowest_s = float(self.batch.makespans(self._cheapest[:, None])[0])
        self._lp: LpRelaxation | None = None
        self._lp_at_s = math.nan  # the pace whose optimal basis the LP holds
        self._bases: list[tuple[float, Any]] = []  # (pace, its optimal basis), by pace
        self._lock = threading.Lock()

    def prepare(self) -> int:
        """Solve the LP at paces `pace_prepare_step` x T0 apart, from T0 to `pace_prepare_up_to`
        x T0 (or to where every cheapest option fits), and keep each optimal basis, so that
        `plan` starts from the nearest one. Once per planner, in the background (about 25
        warm solves: 1.7 s of CPU at 8 x 96); returns how many bases it keeps (none on
        pipelines over `pace_prepare_max_instructions`)."""
        cfg, t0 = self.config, self.frontier.t0_s
        if self.dag.num_nodes > cfg.pace_prepare_max_instructions:
            return 0  # too long: preparing costs several solves' worth for little
        top = min(cfg.pace_prepare_up_to * t0, self.slowest_s)
        paces = [t0 * (1 + k * cfg.pace_prepare_step)
                 for k in range(int((top / t0 - 1) / cfg.pace_prepare_step) + 1)]  # fmt: skip
        with self._lock:
            lp = self._relaxation()
            kept: list[tuple[float, Any]] = []
            for pace_s in paces:
                if lp.solve(pace_s) is not None:
                    kept.append((pace_s, lp.basis()))
                self._lp_at_s = pace_s
            self._bases = kept
        return len(kept)

    @property
    def prepared_paces(self) -> list[float]:
        """The paces `prepare` kept a basis for (empty before it ran)."""
        return [p for p, _ in self._bases]

    def _relaxation(self) -> LpRelaxation:
        """The LP, built on first use (call with the lock held)."""
        if self._lp is None:
            self._lp = LpRelaxation(self.dag, self.table)
        return self._lp

    def _start_near(self, lp: LpRelaxation, pace_s: float) -> None:
        """Start the LP from the prepared basis nearest `pace_s`, if that is nearer than the
        pace it was last solved at (call with the lock held)."""
        paces = self.prepared_paces
        if not paces:
            return
        k = bisect.bisect_left(paces, pace_s)
        near = min((j for j in (k - 1, k) if 0 <= j < len(paces)),
                   key=lambda j: abs(paces[j] - pace_s))  # fmt: skip
        if not abs(self._lp_at_s - pace_s) <= abs(paces[near] - pace_s):
            lp.start_from(self._bases[near][1])

    def plan(self, pace_s: float) -> PacePlan:
        """The cheapest plan found for a straggler at `pace_s`: solved at the pace, or the
        frontier's choice where that is cheaper (the fastest plan when none keeps up)."""
        if not math.isfinite(pace_s) or pace_s <= 0:
            raise ValueError(f"pace must be a finite positive number of seconds, got {pace_s}")
        lookup = self._priced(plan_for_straggler(self.frontier, pace_s), pace_s, "frontier")
        if pace_s >= self.slowest_s:
            # Every instruction at its cheapest option fits: no plan has a lower sum(c), and
            # that plan is the bound.
            t, e, idx = self.search.evaluated(self._cheapest[:, None])[0]
            best = min(self._priced(self.search.to_plan(idx, t, e), pace_s, "solved"), lookup,
                       key=lambda p: p.cost_j)  # fmt: skip
            return replace(best, bound_j=best.cost_j)
        with self._lock:
            lp = self._relaxation()
            self._start_near(lp, pace_s)
            solution = lp.solve(pace_s)
            self._lp_at_s = pace_s
            held = [] if solution is None else self._held(lp, solution.duration_s, pace_s)
        if solution is None:  # faster than any relaxed plan: the frontier's fastest plan
            return lookup
        bound_j = solution.cost_j + self.idle_power_w * pace_s
        found = self._solve(solution.duration_s, pace_s, held)
        if found is None or found[1] >= lookup.cost_j:
            return replace(lookup, bound_j=bound_j, lp_pivots=solution.pivots)
        (t, e, idx), _ = found
        solved = self._priced(self.search.to_plan(idx, t, e), pace_s, "solved")
        return replace(solved, bound_j=bound_j, lp_pivots=solution.pivots)

    def _held(self, lp: LpRelaxation, relaxed_s: FloatArray, pace_s: float) -> list[FloatArray]:
        """Relaxed plans at the pace with the fractional instructions of one class held at
        their segment's ends in the `pace_held_patterns`: of the classes with at least
        `pace_held_min_instructions` fractional instructions, the one they cost most to round
        (none if no class has that many). Rounding decides each instruction alone, from what
        its predecessors saved; on a long segment in the critical stage (the A40 profiles at
        1.05 x T0, e.g. GPT-3's last-stage backward, 1335 -> 960 MHz: 8% more time) every one
        then takes the fast end, where holding a fixed share at the slow end lets the LP move
        the others' time to suit (call with the lock held)."""
        cfg = self.config
        if self.dag.num_nodes > cfg.pace_refine_max_instructions:
            return []  # each held solve is a re-solve of the whole LP: too slow there
        frac = fractional_segments(self.table, self.search.cls, relaxed_s)
        if len(frac.nodes) == 0:
            return []
        per_class, count = frac.by_class(self.search.cls, self.table.num_classes)
        per_class[count < cfg.pace_held_min_instructions] = 0.0  # too few to hold a share of
        if not per_class.any():
            return []
        mine = self.search.cls[frac.nodes] == int(np.argmax(per_class))
        nodes, segment = frac.nodes[mine], frac.segment[mine]
        out: list[FloatArray] = []
        order = np.arange(len(nodes))
        for k, phase in cfg.pace_held_patterns:
            got = lp.solve_with_ends(pace_s, nodes, segment, order % k == phase)
            if got is not None:
                out.append(got.duration_s)
        self._lp_at_s = math.nan  # its basis is a held problem's now
        return out

    def _solve(
        self, relaxed_s: FloatArray, pace_s: float, held: list[FloatArray]
    ) -> tuple[tuple[float, float, IntArray], float] | None:
        """The cheapest of the relaxed plan's roundings (plain and jittered), of the `held`
        relaxed plans' (plain) and of the frontier plans cheapest at the pace, each filled to
        it; then rounds jittered around the best rounding. None if none is on time."""
        search, cfg = self.search, self.config
        relaxed = relaxed_s[:, None]
        deadline = np.asarray([pace_s])
        price = hull_prices(self.table, search.cls, relaxed)
        lanes_n = max(4, min(cfg.pace_lanes, cfg.pace_lane_elements // self.dag.num_nodes))
        rng = NormalStream(cfg.seed)
        jitter = search.jitter(rng, lanes_n)
        bases = [
            self.batch.round_priced(relaxed, price, deadline),
            search.jittered(relaxed, deadline, jitter, lanes_n),
        ]
        for plan in self._cheapest_on_frontier(pace_s):
            idx = self._option_indices(plan)
            if idx is not None:
                bases.append(idx[:, None])
        best, best_lane = self._fill_and_pick(np.concatenate(bases, axis=1), pace_s)
        if held:  # filled apart: the refinement below centres on the best jittered lane
            plans = np.stack(held, axis=1)
            prices = hull_prices(self.table, search.cls, plans)
            rounded = self.batch.round_priced(plans, prices, np.full(len(held), pace_s))
            found, _ = self._fill_and_pick(rounded, pace_s)
            if found is not None and (best is None or found[1] < best[1]):
                best = found
        if self.dag.num_nodes > cfg.pace_refine_max_instructions:
            return best
        center = (jitter[0][:, 0], jitter[1][:, 0])
        if best is not None and 1 <= best_lane <= lanes_n:
            center = (jitter[0][:, best_lane - 1], jitter[1][:, best_lane - 1])
        for _ in range(cfg.pace_refine_rounds):
            shape = (len(center[0]), lanes_n)
            around = (
                center[0][:, None] + cfg.pace_refine_spreads[0] * rng.standard_normal(shape),
                center[1][:, None]
                + cfg.pace_refine_spreads[1] * rng.standard_normal((len(center[1]), lanes_n)),
            )
            found, lane = self._fill_and_pick(
                search.jittered(relaxed, deadline, around, lanes_n), pace_s
            )
            if found is not None and (best is None or found[1] < best[1]):
                best = found
                center = (around[0][:, lane], around[1][:, lane])
        return best

    def _fill_and_pick(
        self, bases: IntArray, pace_s: float
    ) -> tuple[tuple[tuple[float, float, IntArray], float] | None, int]:
        """Every lane filled to the pace (forwards, then backwards); the cheapest on time, its
        cost over the pace, and its lane (-1 if none is on time)."""
        _, both = self.search.fill_lanes(bases, np.full(bases.shape[1], pace_s), self.prices)
        best: tuple[tuple[float, float, IntArray], float] | None = None
        lane = -1
        for k, (t, e, idx) in enumerate(self.search.evaluated(both)):
            if t > pace_s * (1 + _TIME_TOLERANCE):
                continue
            cost = e + self.idle_power_w * (pace_s - t)
            if best is None or cost < best[1]:
                best, lane = ((t, e, idx), cost), k
        return best, lane

    def _cheapest_on_frontier(self, pace_s: float) -> list[Plan]:
        """The frontier's `pace_frontier_lanes` plans that cost least at the pace (filling them
        to the pace can only make them cheaper)."""
        fitting = [p for p in self.frontier.plans if p.iteration_time_s <= pace_s]
        fitting.sort(key=lambda p: p.energy_j - self.idle_power_w * p.iteration_time_s)
        return fitting[: self.config.pace_frontier_lanes]

    def _option_indices(self, plan: Plan) -> IntArray | None:
        """A plan's clocks as option indices into the table (None if one is not an efficient
        option, e.g. a frontier from another planner)."""
        table, cls = self.table, self.search.cls
        flat = [f for row in plan.frequencies_mhz for f in row]
        out = np.empty(self.dag.num_nodes, dtype=np.int64)
        where = [
            {int(f): k for k, f in enumerate(table.frequency_mhz[c, : table.count[c]])}
            for c in range(table.num_classes)
        ]
        for i, f in enumerate(flat):
            k = where[int(cls[i])].get(f)
            if k is None:
                return None
            out[i] = k
        return out

    def _priced(self, plan: Plan, pace_s: float, source: Literal["solved", "frontier"]) -> PacePlan:
        """`plan` with its cost over the pace (waiting at blocking power; none if it is late,
        which only the fastest plan can be, when nothing keeps up)."""
        wait_s = max(0.0, pace_s - plan.iteration_time_s)
        return PacePlan(plan, pace_s, plan.energy_j + self.idle_power_w * wait_s, None, source)
