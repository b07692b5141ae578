"""Straggler plans solved at the pace: hand-computed cases, brute force on tiny pipelines, and the
real profiles where the frontier lookup leaves most on the table."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from perseus_operator.planner import (
    PacePlanner,
    PipelineShape,
    SearchConfig,
    compute_frontier,
    evaluate_plan,
    plan_for_straggler,
)
from perseus_operator.planner.lp import LpRelaxation, fractional_segments
from perseus_profiles import EXAMPLES, StageProfile, load_example
from tests.planner import reference
from tests.planner.test_frontier import BLOCKING_W, HAND, HAND_SHAPE, synthetic


def cost_at(energy_j: float, time_s: float, pace_s: float, idle_w: float) -> float:
    return energy_j + idle_w * max(0.0, pace_s - time_s)


def best_at(points: list[tuple[float, float]], pace_s: float, idle_w: float) -> float:
    return min(e + idle_w * (pace_s - t) for t, e in points if t <= pace_s + 1e-12)


def test_hand_computed_paces() -> None:
    fr = compute_frontier(HAND, HAND_SHAPE, BLOCKING_W)
    planner = PacePlanner(HAND, fr)
    idle_w = 2 * BLOCKING_W
    # At 13 s and later every instruction runs at 500 MHz (the cheapest e - P_b*t of each):
    # 980 J of compute plus 10 W x (26 - 18) s idle = 1060 J; at 20 s both GPUs also wait 7 s
    # (+140 J). No plan costs less, so that is the bound too.
    for pace_s, cost_j in ((13.0, 1060.0), (20.0, 1200.0)):
        got = planner.plan(pace_s)
        assert got.plan.iteration_time_s == pytest.approx(13.0)
        assert got.cost_j == pytest.approx(cost_j)
        assert got.bound_j == pytest.approx(cost_j)
    # In between, against all 256 plans (brute force).
    truth = reference.brute_force_useful(HAND, 2, BLOCKING_W)
    for pace_s in (9.0, 9.5, 10.0, 11.0, 12.0, 12.5):
        got = planner.plan(pace_s)
        assert got.cost_j == pytest.approx(best_at(truth, pace_s, idle_w))
        assert got.bound_j is not None and got.bound_j <= got.cost_j + 1e-9
        assert got.plan.iteration_time_s <= pace_s + 1e-12
    # Faster than any plan: the fastest, late, with no bound (nothing meets the pace).
    late = planner.plan(8.0)
    assert late.plan == fr.fastest and late.bound_j is None and late.source == "frontier"


@pytest.mark.parametrize("pace_s", [math.nan, math.inf, 0.0, -1.0])
def test_bad_paces_are_refused(pace_s: float) -> None:
    planner = PacePlanner(HAND, compute_frontier(HAND, HAND_SHAPE, BLOCKING_W))
    with pytest.raises(ValueError, match="pace must be a finite positive number"):
        planner.plan(pace_s)


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(synthetic().filter(lambda c: c[0].num_stages * c[1] <= 4 and len(c[0].frequencies_mhz) <= 3))
def test_pace_plans_against_brute_force(case: tuple[StageProfile, int, float]) -> None:
    """On time, exactly costed, never costlier than the lookup, never below the best plan there
    is (brute force), and the LP bound never above that."""
    profile, microbatches, blocking_w = case
    shape = PipelineShape(profile.num_stages, microbatches)
    fr = compute_frontier(profile, shape, blocking_w)
    planner = PacePlanner(profile, fr)
    idle_w = blocking_w * shape.stages
    truth = reference.brute_force_useful(profile, microbatches, blocking_w)
    slowest = truth[-1][0]
    paces = [fr.t0_s * r for r in (0.97, 1.0, 1.03, 1.1, 1.25)] + [slowest * 0.99, 2 * slowest]
    for pace_s in (p for p in paces if p >= truth[0][0]):
        got = planner.plan(pace_s)
        t, e = evaluate_plan(profile, shape, blocking_w, got.plan.frequencies_mhz)
        assert (t, e) == pytest.approx((got.plan.iteration_time_s, got.plan.energy_j))
        assert t <= pace_s * (1 + 1e-12)
        assert got.cost_j == pytest.approx(cost_at(e, t, pace_s, idle_w))
        lookup = plan_for_straggler(fr, pace_s)
        lookup_j = cost_at(lookup.energy_j, lookup.iteration_time_s, pace_s, idle_w)
        assert got.cost_j <= lookup_j + 1e-9
        optimum = best_at(truth, pace_s, idle_w)
        assert got.cost_j >= optimum - 1e-6 * optimum
        assert got.bound_j is not None
        assert got.bound_j <= optimum + 1e-6 * optimum


@pytest.mark.parametrize(("name", "ratio"), [("gpt3-175b-a100", 1.2), ("bloom-176b-a40", 1.2)])
def test_solving_at_the_pace_beats_the_lookup(name: str, ratio: float) -> None:
    """Past T* the frontier's plans are sparse: its choice at 1.2 x T0 is 0.24-0.47% above the
    LP bound on these (8 x 12), the plan solved at the pace within 0.1%."""
    profile = load_example(name)
    blocking_w = EXAMPLES[name].blocking_power_w
    shape = PipelineShape(8, 12)
    fr = compute_frontier(profile, shape, blocking_w)
    pace_s = ratio * fr.t0_s
    got = PacePlanner(profile, fr).plan(pace_s)
    lookup = plan_for_straggler(fr, pace_s)
    idle_w = blocking_w * shape.stages
    lookup_j = cost_at(lookup.energy_j, lookup.iteration_time_s, pace_s, idle_w)
    assert got.bound_j is not None and got.gap is not None
    assert lookup_j / got.bound_j - 1 > 0.002
    assert 0 <= got.gap < 0.001 and got.source == "solved"
    t, e = evaluate_plan(profile, shape, blocking_w, got.plan.frequencies_mhz)
    assert t <= pace_s and cost_at(e, t, pace_s, idle_w) == pytest.approx(got.cost_j)


def test_repeated_paces_reuse_the_model_and_agree() -> None:
    """Warm-started solves give the plan a fresh planner gives (the LP optimum is unique in
    cost; the roundings are seeded)."""
    profile = load_example("gpt3-175b-a40").select_stages((0, 1, 2, 7))
    shape = PipelineShape(4, 6)
    fr = compute_frontier(profile, shape, 70.38)
    warm = PacePlanner(profile, fr)
    paces = [r * fr.t0_s for r in (1.3, 1.05, 1.15)]
    for pace_s in paces:
        first = warm.plan(pace_s)
        fresh = PacePlanner(profile, fr).plan(pace_s)
        assert first.bound_j == pytest.approx(fresh.bound_j)
        assert first.cost_j == pytest.approx(fresh.cost_j, rel=1e-3)


def test_prepared_paces_start_from_the_nearest_basis() -> None:
    """`prepare` keeps the LP's basis along a grid of paces; a pace on the grid then needs no
    pivot, one between two grid paces far fewer than from scratch, and the bound is the same
    LP optimum."""
    profile = load_example("gpt3-175b-a40").select_stages((0, 1, 2, 7))
    shape = PipelineShape(4, 8)
    fr = compute_frontier(profile, shape, 70.38)
    planner = PacePlanner(profile, fr)
    assert planner.prepared_paces == []
    kept = planner.prepare()
    paces = planner.prepared_paces
    assert kept == len(paces) >= 2
    step = planner.config.pace_prepare_step * fr.t0_s
    assert paces[0] == pytest.approx(fr.t0_s)
    assert all(b - a == pytest.approx(step) for a, b in itertools.pairwise(paces))
    assert paces[-1] <= min(planner.config.pace_prepare_up_to * fr.t0_s, planner.slowest_s)
    on_grid = planner.plan(paces[1])
    assert on_grid.lp_pivots == 0
    between = (paces[0] + paces[1]) / 2
    got = planner.plan(between)
    fresh = PacePlanner(profile, fr).plan(between)
    assert got.bound_j == pytest.approx(fresh.bound_j)
    assert got.lp_pivots < fresh.lp_pivots / 2
    assert got.plan.iteration_time_s <= between * (1 + 1e-12)
    assert got.cost_j == pytest.approx(fresh.cost_j, rel=1e-3)
    # Past `pace_prepare_max_instructions` nothing is prepared, and solves start from scratch.
    long = PacePlanner(profile, fr, SearchConfig(pace_prepare_max_instructions=shape.stages))
    assert long.prepare() == 0 and long.prepared_paces == []
    assert long.plan(between).bound_j == pytest.approx(fresh.bound_j)


def test_fractional_segments_are_the_instructions_inside_a_hull_segment() -> None:
    profile = load_example("gpt3-175b-a40")
    fr = compute_frontier(profile, PipelineShape(8, 12), EXAMPLES["gpt3-175b-a40"].blocking_power_w)
    planner = PacePlanner(profile, fr)
    table, cls = planner.table, planner.search.cls
    relaxed = LpRelaxation(planner.dag, table).solve(1.05 * fr.t0_s)
    assert relaxed is not None
    frac = fractional_segments(table, cls, relaxed.duration_s)
    assert len(frac.nodes) > 0 and list(frac.nodes) == sorted(frac.nodes)
    for i in range(planner.dag.num_nodes):
        c = int(cls[i])
        hull = table.hull_indices(c)
        t, cost = table.time_s[c, hull], table.cost_j[c, hull]
        d = relaxed.duration_s[i]
        on_hull_point = bool(np.isclose(t, d, rtol=0, atol=1e-9 * t[-1]).any())
        assert (i in frac.nodes) != on_hull_point
        if i in frac.nodes:
            k = int(frac.segment[list(frac.nodes).index(i)])
            assert t[k] < d < t[k + 1]
            penalty = frac.penalty_j[list(frac.nodes).index(i)]
            assert penalty == pytest.approx(cost[k] - np.interp(d, t, cost))
            assert penalty > 0


def test_held_patterns_round_a_long_segment_jointly() -> None:
    """BLOOM on the A40 at 1.05 x T0 (8 x 24): the LP leaves stage 4's backwards inside a long
    hull segment; rounded one by one every one takes its fast end (0.41% above the bound),
    with every other one held at the slow end and the LP re-solved, 0.23%."""
    name = "bloom-176b-a40"
    profile = load_example(name)
    fr = compute_frontier(profile, PipelineShape(8, 24), EXAMPLES[name].blocking_power_w)
    pace_s = 1.05 * fr.t0_s
    alone = PacePlanner(profile, fr, SearchConfig(pace_held_patterns=())).plan(pace_s)
    held = PacePlanner(profile, fr).plan(pace_s)
    assert held.bound_j == pytest.approx(alone.bound_j)
    assert alone.gap is not None and held.gap is not None
    assert held.gap < alone.gap - 0.001
    assert held.plan.iteration_time_s <= pace_s * (1 + 1e-12)
    t, e = evaluate_plan(profile, PipelineShape(8, 24), EXAMPLES[name].blocking_power_w,
                         held.plan.frequencies_mhz)  # fmt: skip
    assert (t, e) == pytest.approx((held.plan.iteration_time_s, held.plan.energy_j))
