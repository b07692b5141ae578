"""Interleaved 1F1B: Megatron-LM's order, a hand-computed pipeline, brute force, properties."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from perseus_operator.planner import (
    PipelineShape,
    compute_frontier,
    evaluate_plan,
    instruction_order,
    plan_for_no_straggler,
    stage_spans,
)
from perseus_operator.planner.pipeline import build_dag
from perseus_profiles import Measurement, ProfileError, StageProfile, load_example
from tests.planner import reference

BLOCKING_W = 10.0
Options = list[tuple[int, float, float]]


def chunked(units: list[tuple[Options, Options]], chunks: int) -> StageProfile:
    """A profile from per-unit (forward, backward) options, units ordered stage by stage."""
    return StageProfile(
        tuple(
            tuple(
                tuple(Measurement(f, t, e) for f, t, e in sorted(opts, reverse=True))
                for opts in unit
            )  # type: ignore[misc]
            for unit in units
        ),
        chunks,
    )


def named(seq: list[tuple[str, int, int]]) -> tuple[str, ...]:
    return tuple(f"{k}{m}c{c}" for k, m, c in seq)


@pytest.mark.parametrize(
    ("stages", "microbatches", "chunks"),
    [(2, 2, 2), (2, 4, 2), (2, 6, 3), (3, 3, 2), (3, 9, 2), (4, 8, 2), (4, 12, 4), (8, 16, 2)],
)
def test_order_is_megatrons(stages: int, microbatches: int, chunks: int) -> None:
    shape = PipelineShape(stages, microbatches, "interleaved-1f1b", chunks)
    order = instruction_order(shape)
    want = reference.order_interleaved(stages, microbatches, chunks)
    assert order == tuple(named(seq) for seq in want)
    for seq in order:  # every chunk's forward and backward of every microbatch, once
        assert sorted(seq) == sorted(
            f"{k}{m}c{c}" for k in "FB" for m in range(microbatches) for c in range(chunks)
        )
    build_dag(shape)  # no deadlock, every backward after its forward


def test_order_by_hand() -> None:
    """2 stages x 4 microbatches x 2 chunks. Stage 0 warms up with 2*(2-0-1) + (2-1)*2 = 4
    forwards (chunk 0 of microbatches 0-1, then chunk 1 of them), stage 1 with 2; the k-th
    backward runs the last chunk first."""
    order = instruction_order(PipelineShape(2, 4, "interleaved-1f1b", 2))
    assert order[0] == (
        "F0c0", "F1c0", "F0c1", "F1c1",
        "F2c0", "B0c1", "F3c0", "B1c1", "F2c1", "B0c0", "F3c1", "B1c0",
        "B2c1", "B3c1", "B2c0", "B3c0",
    )  # fmt: skip
    assert order[1][:6] == ("F0c0", "F1c0", "F0c1", "B0c1", "F1c1", "B1c1")


# Two stages, two chunks each; units in profile order (stage 0 chunk 0, stage 0 chunk 1, stage 1
# chunk 0, stage 1 chunk 1). The model runs s0c0 -> s1c0 -> s0c1 -> s1c1.
HAND = chunked(
    [
        ([(1000, 1.0, 100.0), (500, 1.5, 80.0)], [(1000, 2.0, 200.0), (500, 3.0, 150.0)]),
        ([(1000, 1.0, 100.0), (500, 2.0, 60.0)], [(1000, 1.0, 100.0), (500, 1.5, 95.0)]),
        ([(1000, 2.0, 200.0), (500, 2.5, 190.0)], [(1000, 3.0, 300.0), (500, 4.0, 250.0)]),
        ([(1000, 3.0, 300.0), (500, 3.5, 290.0)], [(1000, 4.0, 400.0), (500, 5.0, 380.0)]),
    ],
    2,
)
HAND_SHAPE = PipelineShape(2, 2, "interleaved-1f1b", 2)


def test_hand_computed_two_stages_two_chunks() -> None:
    """M = S: every stage runs all four forwards, then all four backwards. At 1000 MHz:
    s0: F0c0 0-1, F1c0 1-2;  s1: F0c0 1-3, F1c0 3-5;  s0: F0c1 3-4, F1c1 5-6;
    s1: F0c1 5-8, F1c1 8-11, B0c1 11-15, B1c1 15-19;  s0: B0c1 15-16, B1c1 19-20;
    s1: B0c0 19-22, B1c0 22-25;  s0: B0c0 22-24, B1c0 25-27. 27 s; busy 10 s + 24 s, so
    3400 J of compute (100 J/s everywhere) and 10 W x (2 x 27 - 34) s = 200 J idle."""
    order = instruction_order(HAND_SHAPE)
    assert order == (("F0c0", "F1c0", "F0c1", "F1c1", "B0c1", "B1c1", "B0c0", "B1c0"),) * 2
    top = [[1000] * 8, [1000] * 8]
    assert evaluate_plan(HAND, HAND_SHAPE, BLOCKING_W, top) == pytest.approx((27.0, 3600.0))
    assert stage_spans(HAND, HAND_SHAPE, top) == ((0.0, 27.0), (1.0, 25.0))
    # Stage 0's F0c1 (3-4) has 1 s of float (s1 is busy until 5 with F1c0, and s0's F1c1 waits
    # for that), so 500 MHz there costs no time: 2 s at 60 J instead of 1 s at 100 J: -40 J,
    # and 1 s less idle: -10 J.
    slow = [[1000, 1000, 500, 1000, 1000, 1000, 1000, 1000], [1000] * 8]
    assert evaluate_plan(HAND, HAND_SHAPE, BLOCKING_W, slow) == pytest.approx((27.0, 3550.0))
    fr = compute_frontier(HAND, HAND_SHAPE, BLOCKING_W)
    assert fr.t0_s == pytest.approx(27.0)
    assert fr.baseline_energy_j == pytest.approx(3600.0)
    assert fr.order == order


def test_hand_frontier_against_brute_force() -> None:
    """All 2^16 plans of the hand pipeline: the frontier's ends are the true ones and no plan
    of it claims less than the brute-force frontier allows; every plan costs what it says."""
    fr = compute_frontier(HAND, HAND_SHAPE, BLOCKING_W)
    truth = reference.brute_force_useful_interleaved(HAND, 2, BLOCKING_W)
    assert fr.fastest.iteration_time_s == pytest.approx(truth[0][0])
    assert fr.fastest.energy_j == pytest.approx(truth[0][1])
    assert fr.plans[-1].energy_j == pytest.approx(truth[-1][1])
    for p in fr.plans:
        best = min(e for t, e in truth if t <= p.iteration_time_s * (1 + 1e-12))
        assert p.energy_j >= best - 1e-6
        t, e = reference.cost_interleaved(HAND, 2, BLOCKING_W, p.frequencies_mhz)
        assert (p.iteration_time_s, p.energy_j) == pytest.approx((t, e))
    # Most of the true frontier is found exactly.
    found = {(round(p.iteration_time_s, 9), round(p.energy_j, 6)) for p in fr.plans}
    exact = sum((round(t, 9), round(e, 6)) in found for t, e in truth)
    assert exact >= 0.8 * len(truth)


@st.composite
def synthetic(draw: st.DrawFn) -> tuple[StageProfile, int, float]:
    stages = draw(st.integers(2, 3))
    chunks = draw(st.integers(2, 3))
    microbatches = stages * draw(st.integers(1, 3))
    freqs = sorted(draw(st.lists(st.integers(300, 2000), min_size=1, max_size=3, unique=True)))
    units = []
    for _ in range(stages * chunks):
        per_kind = []
        for _ in range(2):
            base_t, base_e = draw(st.floats(0.01, 1.0)), draw(st.floats(1.0, 300.0))
            per_kind.append(
                [(f, base_t * freqs[-1] / f, base_e * (0.6 + 0.4 * f / freqs[-1])) for f in freqs]
            )
        units.append((per_kind[0], per_kind[1]))
    return chunked(units, chunks), microbatches, draw(st.floats(0.0, 150.0))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(synthetic())
def test_frontier_properties(case: tuple[StageProfile, int, float]) -> None:
    profile, microbatches, blocking_w = case
    shape = PipelineShape(profile.num_stages, microbatches, "interleaved-1f1b", profile.chunks)
    fr = compute_frontier(profile, shape, blocking_w)
    top = [[profile.max_frequency_mhz] * len(s) for s in fr.order]
    t0, e0 = reference.cost_interleaved(profile, microbatches, blocking_w, top)
    assert (fr.t0_s, fr.baseline_energy_j) == pytest.approx((t0, e0))
    idle_w = blocking_w * shape.stages
    for p in fr.plans:
        t, e = reference.cost_interleaved(profile, microbatches, blocking_w, p.frequencies_mhz)
        assert p.iteration_time_s == pytest.approx(t, rel=1e-9)
        assert p.energy_j == pytest.approx(e, rel=1e-9)
    for a, b in itertools.pairwise(fr.plans):
        assert a.iteration_time_s < b.iteration_time_s
        assert b.energy_j - idle_w * b.iteration_time_s < a.energy_j - idle_w * a.iteration_time_s
    zero = plan_for_no_straggler(fr, 0.0)
    assert zero.iteration_time_s <= fr.t0_s * (1 + 1e-12)
    assert zero.energy_j <= fr.baseline_energy_j * (1 + 1e-12)


def test_evaluator_matches_reference_on_random_plans() -> None:
    """Distinct stages and chunks (a real profile's stages 0, 3 and 7, split in three), warm-up
    shorter than the iteration (M > S), random clocks."""
    profile = load_example("bloom-176b-a40").select_stages((0, 3, 7)).split_chunks(3)
    shape = PipelineShape(3, 6, "interleaved-1f1b", 3)
    clocks = profile.frequencies_mhz
    rng = random.Random(7)
    for _ in range(20):
        plan = [[rng.choice(clocks) for _ in seq] for seq in instruction_order(shape)]
        want = reference.cost_interleaved(profile, 6, 70.38, plan)
        assert evaluate_plan(profile, shape, 70.38, plan) == pytest.approx(want, rel=1e-12)


def test_long_pipeline_stretches_in_groups_and_stays_exact() -> None:
    """Past 24 microbatches the relaxation beyond T0 is stretched from a short copy, whose
    microbatch count stays a multiple of the stages."""
    profile = load_example("gpt3-175b-a40").select_stages((0, 2, 7)).split_chunks(2)
    shape = PipelineShape(3, 30, "interleaved-1f1b", 2)
    fr = compute_frontier(profile, shape, 70.38)
    assert len(fr.plans) > 10
    for p in fr.plans[:: max(1, len(fr.plans) // 10)]:
        want = reference.cost_interleaved(profile, 30, 70.38, p.frequencies_mhz)
        assert (p.iteration_time_s, p.energy_j) == pytest.approx(want, rel=1e-9)
    zero = plan_for_no_straggler(fr, 0.0)
    assert zero.energy_j < 0.95 * fr.baseline_energy_j


def test_shape_rules() -> None:
    with pytest.raises(ValueError, match="not a multiple of 4"):
        PipelineShape(4, 6, "interleaved-1f1b", 2)
    with pytest.raises(ValueError, match="needs 2-64 virtual stages"):
        PipelineShape(4, 8, "interleaved-1f1b")
    with pytest.raises(ValueError, match="need schedule interleaved-1f1b"):
        PipelineShape(4, 8, virtual_stages=2)
    with pytest.raises(ValueError, match="at least 2 stages"):
        PipelineShape(1, 4, "interleaved-1f1b", 2)
    with pytest.raises(ValueError, match="unknown schedule"):
        PipelineShape(4, 8, "gpipe")  # type: ignore[arg-type]


def test_profile_must_have_the_pipelines_chunks() -> None:
    one = load_example("gpt3-175b-a100").select_stages((0, 7))
    shape = PipelineShape(2, 4, "interleaved-1f1b", 2)
    with pytest.raises(ProfileError, match=r"2 model chunk.*profile has 1; split each stage"):
        compute_frontier(one, shape, 83.64)
    with pytest.raises(ProfileError, match=r"1 model chunk.*profile has 2"):
        compute_frontier(one.split_chunks(2), PipelineShape(2, 4), 83.64)
    with pytest.raises(ProfileError, match="profile has 2"):
        evaluate_plan(one.split_chunks(2), PipelineShape(2, 4), 83.64, [[1410] * 8] * 2)
    assert compute_frontier(one.split_chunks(2), shape, 83.64).plans
