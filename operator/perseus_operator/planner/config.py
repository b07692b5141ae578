"""The search's tuning knobs, in one frozen configuration.

Every number that decides how hard the frontier search and the straggler solve look, and where,
is a field of :class:`SearchConfig`; ``compute_frontier`` and ``PacePlanner`` take one (the
defaults when none is given), so tests and benchmarks vary a knob with ``dataclasses.replace``
instead of patching module globals. The defaults are what the benchmarks measured as the best
trade between plan quality and time; docs/planner.md ("Tuning history") records how each was
chosen. Fractions are of T0, the iteration time with every GPU at its maximum clock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

__all__ = ["DEFAULT_SEARCH", "SearchConfig"]


@dataclass(frozen=True)
class SearchConfig:
    """How the planner searches; every field is validated, a bad one raises ValueError."""

    # ---- Deadlines the LP's relaxed plans are rounded for (`search.Search.lp_rounded`) ----
    grid_fraction: float = 0.001
    """Deadline spacing between T0 and a little past the relaxation's least energy."""
    fast_grid_fraction: float = 0.0002
    """Deadline spacing faster than T0, where energy falls steeply with time."""
    max_deadlines: int = 400
    """At most about this many deadlines at `grid_fraction`: a longer frontier spaces them wider,
    which bounds the work."""
    fine_past_t_star: float = 0.01
    """How far past the relaxation's T* the fine grid goes; beyond, deadlines are half a
    `tail_step` apart."""
    tail_step: float = 0.01
    """Past the relaxation's path, uniform-price plans are filled to deadlines this far apart."""
    gap_target: float = 0.0015
    """Consecutive plans before T* at most this far apart: wider gaps are filled from the plan at
    their start."""
    gap_rounds: int = 12
    """Rounds of gap filling (a gap that stays has no useful plan found inside it)."""
    gap_nudges: tuple[int, ...] = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)
    """A plan stuck in its float at a gap's start is also tried with this many of its
    instructions that save most per second one option slower."""

    # ---- The LP relaxation's path along the deadline axis (`relaxed`) ----
    lp_max_instructions: int = 6144
    """Larger pipelines skip the LP and fill uniform-price plans (HiGHS's time grows with
    instructions times path length)."""
    lp_step: float = 0.01
    """The LP is solved this far apart along the frontier ..."""
    max_lp_solves: int = 120
    """... or wider, so that at most about this many solves span it."""
    dense_step: float = 0.001
    """... and this far apart from the fastest deadline to `dense_above_t0` past T0, where the
    frontier is steep and the no-slowdown plan is chosen."""
    dense_above_t0: float = 0.01
    far_step_ratio: float = 0.2
    """Beyond the dense part, solves are at least this fraction of their distance to T0 apart:
    a solve re-prices a few hundred hull breakpoints however far it moves, and far from T0
    interpolating between solves loses little."""
    coarse_steps: int = 4
    """Past the relaxation's least energy, steps are this many times wider ..."""
    past_t_star: float = 0.02
    """... until this far past it, where the path stops."""
    short_microbatches: int = 24
    """Pipelines longer than this (and than `short_min_stage_multiple` x stages) solve at full
    size only near T0 and stretch a copy this long everywhere else."""
    short_min_stage_multiple: int = 3

    # ---- Jittered roundings at and near T0 (`search.Search.lp_bases`, `refine_t0`) ----
    seed: int = 20241104
    """Seed of every jitter draw: plans are reproducible."""
    random_lanes: int = 64
    """Jittered roundings of the relaxed plan at T0 ..."""
    random_lanes_near_t0: int = 4
    """... and at each other LP solve up to `dense_above_t0` past it."""
    random_spreads: tuple[tuple[float, float], ...] = (
        (0.1, 0.0),
        (0.2, 0.0),
        (0.05, 0.1),
        (0.0, 0.1),
    )
    """Log-normal jitter of their prices, (spread per class, spread per instruction), taken in
    turn lane by lane."""
    refine_rounds: int = 4
    """Rounds of roundings jittered around the best at T0 so far ..."""
    refine_lanes: int = 32
    """... this many each ..."""
    refine_max_instructions: int = 2048
    """... on pipelines up to this size (larger ones: their time budget is tight) ..."""
    refine_gap: float = 0.003
    """... while the best plan at T0 is more than this fraction of the baseline energy above the
    LP bound ..."""
    refine_spreads: tuple[float, float] = (0.05, 0.03)
    """... drawn this far (log; per class, per instruction) from the best one."""

    # ---- Slack filling (`fill`) ----
    fill_steps: int = 4
    """Rungs of the price ladder (plus μ = 0) filling uniform-price plans ..."""
    fill_steps_lp: int = 2
    """... and LP roundings, whose prices are the LP's already."""
    lane_elements: int = 2_000_000
    """Lanes x instructions per batch: bounds memory on large pipelines."""

    # ---- A straggler's plan solved at its pace (`pace.PacePlanner`) ----
    pace_lanes: int = 32
    """Jittered roundings of the relaxed plan at the pace ..."""
    pace_lane_elements: int = 24_000
    """... fewer on long pipelines (lanes x instructions at most this), for time; never fewer than
    4 lanes."""
    pace_frontier_lanes: int = 4
    """The frontier plans cheapest at the pace, filled to it too."""
    pace_refine_rounds: int = 2
    """Rounds of roundings jittered around the best one so far ..."""
    pace_refine_max_instructions: int = 800
    """... on pipelines up to this size (longer ones: time) ..."""
    pace_refine_spreads: tuple[float, float] = (0.05, 0.03)
    """... drawn this far (log; per class, per instruction) from it."""
    pace_held_patterns: tuple[tuple[int, int], ...] = ((2, 0), (2, 1), (3, 0), (3, 1))
    """In the class whose fractional instructions cost most to round (a long hull segment in
    the critical stage), every k-th of them (from the phase-th, in node order) held at its
    segment's slow end and the rest at the fast end, the LP re-solved so the others adapt, and
    rounded: (k, phase) pairs. A joint choice per-instruction rounding cannot make ..."""
    pace_held_min_instructions: int = 8
    """... among the classes with at least this many fractional instructions (on pipelines no
    longer than `pace_refine_max_instructions`: each pattern is a whole LP re-solve)."""
    pace_prepare_step: float = 0.025
    """`PacePlanner.prepare` solves the LP at paces this far apart (fraction of T0) ..."""
    pace_prepare_up_to: float = 2.0
    """... from T0 up to this multiple of it (or the pace where every instruction's cheapest
    option fits, if sooner), and keeps each basis: a later pace starts from the nearest."""
    pace_prepare_max_instructions: int = 2048
    """... on pipelines up to this size. Longer ones are not prepared: at 8 x 512 preparing
    took 36 s of CPU to bring a 5.1 s solve to 2.9 s, and neither is under a second."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(f.default, int):
                _check_int(f.name, value, 0 if f.name in _MAY_BE_ZERO else 1)
            elif isinstance(f.default, float):
                _check_fraction(f.name, value)
        if not self.random_spreads:
            raise ValueError("search config random_spreads must name at least one spread pair")
        for pair in (*self.random_spreads, self.refine_spreads, self.pace_refine_spreads):
            _check_spreads(pair)
        for pair in self.pace_held_patterns:
            if not (
                isinstance(pair, tuple)
                and len(pair) == 2
                and all(isinstance(x, int) and not isinstance(x, bool) for x in pair)
                and pair[0] >= 2
                and 0 <= pair[1] < pair[0]
            ):
                raise ValueError(
                    "search config pace_held_patterns must be (k, phase) pairs of integers with"
                    f" k >= 2 and 0 <= phase < k, got {pair!r}"
                )
        nudges = self.gap_nudges
        if (
            not nudges
            or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in nudges)
            or list(nudges) != sorted(set(nudges))
        ):
            raise ValueError(
                f"search config gap_nudges must be increasing positive integers, got {nudges!r}"
            )


_MAY_BE_ZERO = frozenset({"seed", "gap_rounds", "refine_rounds", "pace_refine_rounds"})


def _check_int(name: str, value: object, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"search config {name} must be an integer >= {least}, got {value!r}")


def _check_fraction(name: str, value: object) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not (math.isfinite(value) and value > 0)
    ):
        raise ValueError(f"search config {name} must be a finite number > 0, got {value!r}")


def _check_spreads(pair: object) -> None:
    if not (
        isinstance(pair, tuple)
        and len(pair) == 2
        and all(
            not isinstance(x, bool) and isinstance(x, int | float) and math.isfinite(x) and x >= 0
            for x in pair
        )
    ):
        raise ValueError(
            "search config spreads must be (per class, per instruction) pairs of finite numbers"
            f" >= 0, got {pair!r}"
        )


DEFAULT_SEARCH = SearchConfig()
"""The tuned defaults: what ``compute_frontier`` and ``PacePlanner`` use unless given another."""
