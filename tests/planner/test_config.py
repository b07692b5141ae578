"""The search configuration: defaults are what the planner uses when given none, each knob it is
given takes effect (and the result stays exact), and a bad knob is a ValueError naming it."""

from __future__ import annotations

import dataclasses
import math

import pytest

from perseus_operator.planner import (
    DEFAULT_SEARCH,
    PacePlanner,
    PipelineShape,
    SearchConfig,
    compute_frontier,
    evaluate_plan,
)
from perseus_operator.planner.relaxed import short_pipeline
from perseus_profiles import load_example

# Distinct stages: the real profiles' stages 0-6 are identical, 7 is not.
PROFILE = load_example("gpt3-175b-a40").select_stages((0, 3, 7))
SHAPE = PipelineShape(stages=3, microbatches=6)
BLOCKING_W = 70.38


def _points(config: SearchConfig | None = None) -> list[tuple[float, float]]:
    if config is None:
        frontier = compute_frontier(PROFILE, SHAPE, BLOCKING_W)
    else:
        frontier = compute_frontier(PROFILE, SHAPE, BLOCKING_W, config=config)
    return [(p.iteration_time_s, p.energy_j) for p in frontier.plans]


def test_no_config_is_the_default_config() -> None:
    assert SearchConfig() == DEFAULT_SEARCH
    assert _points() == _points(SearchConfig())


def test_each_search_path_follows_its_knobs() -> None:
    """Without the LP (a pipeline "too large" for it) and with no refinement the search finds
    other plans, every one still costed exactly; the fastest plan is as fast either way."""
    default = _points()
    no_lp = dataclasses.replace(DEFAULT_SEARCH, lp_max_instructions=1, gap_rounds=0)
    frontier = compute_frontier(PROFILE, SHAPE, BLOCKING_W, config=no_lp)
    points = [(p.iteration_time_s, p.energy_j) for p in frontier.plans]
    assert points != default
    assert points[0][0] == pytest.approx(default[0][0])
    for plan in frontier.plans:
        t, e = evaluate_plan(PROFILE, SHAPE, BLOCKING_W, plan.frequencies_mhz)
        assert (t, e) == pytest.approx((plan.iteration_time_s, plan.energy_j))


def test_the_stretched_copy_follows_its_knobs() -> None:
    long = PipelineShape(stages=8, microbatches=48)
    assert short_pipeline(long) == PipelineShape(stages=8, microbatches=24)
    config = SearchConfig(short_microbatches=12, short_min_stage_multiple=2)
    assert short_pipeline(long, config) == PipelineShape(stages=8, microbatches=16)
    assert short_pipeline(long, SearchConfig(short_microbatches=48)) is None


def test_the_pace_planner_follows_its_knobs() -> None:
    frontier = compute_frontier(PROFILE, SHAPE, BLOCKING_W)
    pace_s = frontier.t0_s * 1.05
    default = PacePlanner(PROFILE, frontier).plan(pace_s)
    # Almost no jittered lanes, no refinement, one frontier plan: the same bound, and here (the
    # plain rounding is not the best) a costlier plan than the default search finds.
    meagre = SearchConfig(
        pace_lanes=1, pace_lane_elements=1, pace_frontier_lanes=1, pace_refine_rounds=0
    )
    got = PacePlanner(PROFILE, frontier, meagre).plan(pace_s)
    assert got.bound_j == pytest.approx(default.bound_j)
    assert got.bound_j is not None and got.cost_j >= got.bound_j - 1e-9
    assert got.cost_j > default.cost_j


@pytest.mark.parametrize(
    ("knob", "value", "message"),
    [
        ("grid_fraction", 0.0, "grid_fraction must be a finite number > 0"),
        ("tail_step", math.nan, "tail_step must be a finite number > 0"),
        ("refine_gap", -0.1, "refine_gap must be a finite number > 0"),
        ("random_lanes", 0, "random_lanes must be an integer >= 1"),
        ("max_deadlines", 2.5, "max_deadlines must be an integer >= 1"),
        ("lane_elements", True, "lane_elements must be an integer >= 1"),
        ("refine_rounds", -1, "refine_rounds must be an integer >= 0"),
        ("seed", -3, "seed must be an integer >= 0"),
        ("random_spreads", (), "random_spreads must name at least one"),
        ("random_spreads", ((0.1, -0.2),), r"spreads must be \(per class, per instruction\)"),
        ("refine_spreads", (0.1,), r"spreads must be \(per class, per instruction\)"),
        ("pace_refine_spreads", (0.1, math.inf), "spreads must be"),
        ("gap_nudges", (2, 1), "gap_nudges must be increasing positive integers"),
        ("gap_nudges", (0, 1), "gap_nudges must be increasing positive integers"),
        ("gap_nudges", (), "gap_nudges must be increasing positive integers"),
        ("pace_held_patterns", ((1, 0),), r"pace_held_patterns must be \(k, phase\) pairs"),
        ("pace_held_patterns", ((2, 2),), r"pace_held_patterns must be \(k, phase\) pairs"),
        ("pace_held_patterns", ((2.0, 0),), r"pace_held_patterns must be \(k, phase\) pairs"),
        ("pace_held_patterns", ((3,),), r"pace_held_patterns must be \(k, phase\) pairs"),
        ("pace_prepare_step", 0.0, "pace_prepare_step must be a finite number > 0"),
        ("pace_held_min_instructions", 0, "pace_held_min_instructions must be an integer >= 1"),
    ],
)
def test_bad_knobs_are_refused(knob: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=f"search config {message}"):
        SearchConfig(**{knob: value})  # type: ignore[arg-type]


def test_zero_rounds_are_allowed() -> None:
    config = SearchConfig(refine_rounds=0, gap_rounds=0, pace_refine_rounds=0, seed=0)
    assert config.refine_rounds == config.gap_rounds == config.pace_refine_rounds == 0
