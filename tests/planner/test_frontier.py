"""Frontier: a hand-computed pipeline, brute force on tiny ones, properties on distinct stages."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from perseus_operator.planner import (
    PipelineShape,
    compute_frontier,
    evaluate_plan,
    instruction_order,
    plan_for_no_straggler,
    plan_for_straggler,
    stage_spans,
)
from perseus_profiles import Measurement, StageProfile, load_example
from tests.planner import reference

BLOCKING_W = 10.0


def profile_of(
    table: list[tuple[list[tuple[int, float, float]], list[tuple[int, float, float]]]],
) -> StageProfile:
    return StageProfile(
        tuple(
            tuple(
                tuple(Measurement(f, t, e) for f, t, e in sorted(opts, reverse=True))
                for opts in stage
            )  # type: ignore[misc]
            for stage in table
        )
    )


# Two stages, two clocks. Stage 0: F 1.0 s/100 J or 2.0 s/60 J; B 2.0 s/200 J or 3.0 s/150 J.
# Stage 1: F 1.0 s/100 J or 1.5 s/90 J; B 2.0 s/200 J or 2.5 s/190 J.
HAND = profile_of(
    [
        ([(1000, 1.0, 100.0), (500, 2.0, 60.0)], [(1000, 2.0, 200.0), (500, 3.0, 150.0)]),
        ([(1000, 1.0, 100.0), (500, 1.5, 90.0)], [(1000, 2.0, 200.0), (500, 2.5, 190.0)]),
    ]
)
HAND_SHAPE = PipelineShape(stages=2, microbatches=2)


def test_hand_computed_two_stages_two_microbatches() -> None:
    fr = compute_frontier(HAND, HAND_SHAPE, BLOCKING_W)
    assert fr.order == (("F0", "F1", "B0", "B1"), ("F0", "B0", "F1", "B1"))
    # All at 1000 MHz: the critical path F0(0) F0(1) B0(1) F1(1) B1(1) B1(0) is 9 s;
    # 1200 J of compute plus 10 W x (2 x 9 s - 12 s busy) idle.
    assert fr.t0_s == pytest.approx(9.0)
    assert fr.baseline_energy_j == pytest.approx(1260.0)
    # Still 9 s: F1 on stage 0 has 2 s of float and B0 on stage 0 has 1 s, so both drop to 500 MHz:
    # -40 J and -50 J of compute, 2 s less idle (-20 J): 1150 J.
    assert fr.fastest.iteration_time_s == pytest.approx(9.0)
    assert fr.fastest.energy_j == pytest.approx(1150.0)
    assert fr.fastest.frequencies_mhz == ((1000, 500, 500, 1000), (1000, 1000, 1000, 1000))
    # The last useful plan runs everything at 500 MHz (each option's e - 10 W x t is lower there):
    # 13 s, 980 J of compute + 10 W x (26 - 18) s idle = 1060 J.
    last = fr.plans[-1]
    assert last.iteration_time_s == pytest.approx(13.0)
    assert last.energy_j == pytest.approx(1060.0)
    truth = reference.brute_force_useful(HAND, 2, BLOCKING_W)
    assert len(fr.plans) == len(truth)
    for p, (t, e) in zip(fr.plans, truth, strict=True):
        assert p.iteration_time_s == pytest.approx(t)
        assert p.energy_j == pytest.approx(e)


def test_lookups_on_hand_frontier() -> None:
    fr = compute_frontier(HAND, HAND_SHAPE, BLOCKING_W)
    assert plan_for_no_straggler(fr, 0.0) == fr.fastest
    slow = plan_for_no_straggler(fr, 1.0)
    assert slow.energy_j == min(p.energy_j for p in fr.plans)
    # A straggler at 13 s: every plan waits until 13 s, so the all-500 MHz plan wins.
    assert plan_for_straggler(fr, 13.0) == fr.plans[-1]
    assert plan_for_straggler(fr, 1.0) == fr.fastest  # cannot keep up: run flat out
    for pace in (9.0, 10.0, 11.5, 13.0, 20.0):
        chosen = plan_for_straggler(fr, pace)
        best = min(
            p.energy_j + BLOCKING_W * 2 * (pace - p.iteration_time_s)
            for p in fr.plans
            if p.iteration_time_s <= pace
        )
        assert chosen.energy_j + BLOCKING_W * 2 * (pace - chosen.iteration_time_s) == best
    with pytest.raises(ValueError, match="max_slowdown"):
        plan_for_no_straggler(fr, -0.1)
    with pytest.raises(ValueError, match="pace"):
        plan_for_straggler(fr, math.nan)


def test_stage_spans_follow_the_dag() -> None:
    plan = [[1000] * 4, [1000] * 4]
    assert stage_spans(HAND, HAND_SHAPE, plan) == ((0.0, 9.0), (1.0, 7.0))


@st.composite
def synthetic(draw: st.DrawFn) -> tuple[StageProfile, int, float]:
    stages = draw(st.integers(1, 4))
    microbatches = draw(st.integers(1, 5))
    n_freq = draw(st.integers(1, 4))
    freqs = sorted(
        draw(st.lists(st.integers(300, 2000), min_size=n_freq, max_size=n_freq, unique=True))
    )
    table = []
    for _ in range(stages):
        per_kind = []
        for _ in range(2):
            base_t = draw(st.floats(0.01, 1.0))
            base_e = draw(st.floats(1.0, 300.0))
            opts = []
            for f in freqs:
                scale = freqs[-1] / f
                t = base_t * scale * draw(st.floats(0.97, 1.03))
                e = base_e * (0.6 + 0.4 / scale) * draw(st.floats(0.97, 1.03))
                opts.append((f, t, e))
            per_kind.append(opts)
        table.append((per_kind[0], per_kind[1]))
    return profile_of(table), microbatches, draw(st.floats(0.0, 150.0))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(synthetic())
def test_frontier_properties(case: tuple[StageProfile, int, float]) -> None:
    profile, microbatches, blocking_w = case
    shape = PipelineShape(stages=profile.num_stages, microbatches=microbatches)
    fr = compute_frontier(profile, shape, blocking_w)
    assert fr.order == instruction_order(shape)
    idle_w = blocking_w * shape.stages
    t0, e0 = reference.cost(
        profile, microbatches, blocking_w,
        [[profile.max_frequency_mhz] * len(s) for s in fr.order],
    )  # fmt: skip
    assert fr.t0_s == pytest.approx(t0)
    assert fr.baseline_energy_j == pytest.approx(e0)
    for p in fr.plans:
        for s, row in enumerate(p.frequencies_mhz):
            assert len(row) == len(fr.order[s])
            for f, token in zip(row, fr.order[s], strict=True):
                kind = 0 if token[0] == "F" else 1
                assert f in {m.frequency_mhz for m in profile.options[s][kind]}
        t, e = reference.cost(profile, microbatches, blocking_w, p.frequencies_mhz)
        assert p.iteration_time_s == pytest.approx(t, rel=1e-9)
        assert p.energy_j == pytest.approx(e, rel=1e-9)
        assert evaluate_plan(profile, shape, blocking_w, p.frequencies_mhz) == pytest.approx((t, e))
    for a, b in zip(fr.plans, fr.plans[1:], strict=False):
        assert a.iteration_time_s < b.iteration_time_s
        assert b.energy_j - idle_w * b.iteration_time_s < a.energy_j - idle_w * a.iteration_time_s
    # No slowdown is real, and it never costs more than the baseline.
    zero = plan_for_no_straggler(fr, 0.0)
    assert zero.iteration_time_s <= fr.t0_s * (1 + 1e-12)
    assert zero.energy_j <= fr.baseline_energy_j * (1 + 1e-12)
    # The frontier ends where nothing is cheaper: every instruction at its least e - P_b*t.
    floor = sum(
        min(
            m.energy_j - blocking_w * m.time_s
            for m in profile.options[s][0 if tok[0] == "F" else 1]
        )
        for s in range(shape.stages)
        for tok in fr.order[s]
    )
    last = fr.plans[-1]
    assert last.energy_j - idle_w * last.iteration_time_s == pytest.approx(
        floor, rel=1e-9, abs=1e-9
    )


@settings(max_examples=20, deadline=None)
@given(synthetic().filter(lambda c: c[0].num_stages * c[1] <= 4 and len(c[0].frequencies_mhz) <= 2))
def test_tiny_frontiers_are_never_beaten_by_brute_force_at_their_ends(
    case: tuple[StageProfile, int, float],
) -> None:
    profile, microbatches, blocking_w = case
    shape = PipelineShape(stages=profile.num_stages, microbatches=microbatches)
    fr = compute_frontier(profile, shape, blocking_w)
    truth = reference.brute_force_useful(profile, microbatches, blocking_w)
    # The fastest achievable time is found, and the slow end reaches the global optimum.
    assert fr.fastest.iteration_time_s == pytest.approx(truth[0][0])
    assert fr.plans[-1].energy_j == pytest.approx(truth[-1][1])
    # Every reported plan is a real plan: never better than the brute-force frontier allows.
    for p in fr.plans:
        best = min(e for t, e in truth if t <= p.iteration_time_s * (1 + 1e-12))
        assert p.energy_j >= best - 1e-6


def test_fewer_microbatches_than_stages() -> None:
    profile = HAND
    shape = PipelineShape(stages=2, microbatches=1)
    fr = compute_frontier(profile, shape, BLOCKING_W)
    assert fr.order == (("F0", "B0"), ("F0", "B0"))
    assert fr.t0_s == pytest.approx(1 + 1 + 2 + 2)


def test_rejects_shape_that_does_not_match_profile() -> None:
    with pytest.raises(ValueError, match="3 stages but the profile has 2"):
        compute_frontier(HAND, PipelineShape(stages=3, microbatches=4), BLOCKING_W)
    with pytest.raises(ValueError, match="blocking power"):
        compute_frontier(HAND, HAND_SHAPE, -1.0)
    with pytest.raises(ValueError, match="microbatches"):
        PipelineShape(stages=2, microbatches=0)


def test_long_pipeline_stretches_the_relaxation_and_stays_exact_and_reproducible() -> None:
    """Past 24 microbatches the LP beyond T0 comes from a stretched short copy: every plan is
    still exact and useful, no slowdown is real, and a second run gives the same plans (the
    jittered roundings are seeded)."""
    profile = load_example("bloom-176b-a40").select_stages((0, 3, 7))
    shape = PipelineShape(stages=3, microbatches=30)
    first = compute_frontier(profile, shape, 70.38)
    idle_w = 70.38 * shape.stages
    for p in first.plans[:: max(1, len(first.plans) // 15)]:
        t, e = reference.cost(profile, shape.microbatches, 70.38, p.frequencies_mhz)
        assert p.iteration_time_s == pytest.approx(t, rel=1e-9)
        assert p.energy_j == pytest.approx(e, rel=1e-9)
    for a, b in zip(first.plans, first.plans[1:], strict=False):
        assert b.energy_j - idle_w * b.iteration_time_s < a.energy_j - idle_w * a.iteration_time_s
    zero = plan_for_no_straggler(first, 0.0)
    assert zero.iteration_time_s <= first.t0_s * (1 + 1e-12)
    assert zero.energy_j < 0.97 * first.baseline_energy_j  # a real saving, not just "no worse"
    assert first.t_star.iteration_time_s > 1.05 * first.t0_s  # the stretched part is there
    assert compute_frontier(profile, shape, 70.38).plans == first.plans
