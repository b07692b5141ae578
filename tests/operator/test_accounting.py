"""The pure energy accounting: the all-max-clock baseline, the measured saving (under a straggler
too) and the straggler samples. Plain data in and out; figures worked out by hand."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from perseus_operator.accounting import (
    Baseline,
    measure_baseline,
    measured_saving_percent,
    straggler_samples,
)
from perseus_operator.straggler import Sample


@dataclass(frozen=True)
class Rank:
    data_rank: int
    energy_per_iteration_mean_j: float | None = 100.0
    iteration_time_mean_s: float | None = 1.0
    iterations: int = 5
    schedule_active: bool = False


@dataclass(frozen=True)
class Span:
    data_rank: int
    stage0_span_last_s: float | None


def job(n: int = 4, **kw: object) -> list[Rank]:
    """`n` ranks, two per pipeline."""
    return [Rank(r // 2, **kw) for r in range(n)]  # type: ignore[arg-type]


def test_baseline_sums_the_jobs_energy_and_averages_its_iteration_time() -> None:
    ranks = [Rank(0, 100.0, 1.0), Rank(0, 120.0, 1.2), Rank(1, 90.0, None), Rank(1, 110.0, 1.1)]
    found = measure_baseline(ranks, expected_ranks=4, iterations=5)
    assert found is not None and (found.energy_j, found.gpus) == (420.0, 4)
    assert found.iteration_s == pytest.approx(1.1)


@pytest.mark.parametrize(
    ("ranks", "why"),
    [
        (job(3), "a rank has not registered"),
        (job(4, iterations=4), "too few iterations"),
        ([*job(3), Rank(1, energy_per_iteration_mean_j=None)], "no energy figure yet"),
        ([*job(3), Rank(1, schedule_active=True)], "a schedule is already running"),
    ],
)
def test_no_baseline_until_every_rank_ran_enough_unscheduled_iterations(
    ranks: list[Rank], why: str
) -> None:
    assert measure_baseline(ranks, expected_ranks=4, iterations=5) is None, why


BASE = Baseline(energy_j=400.0, iteration_s=1.0, gpus=4)


def saving(ranks: list[Rank], straggler: int | None = None, blocking_w: float = 50.0) -> object:
    return measured_saving_percent(
        ranks,
        BASE,
        expected_ranks=4,
        iterations=5,
        straggler=straggler,
        blocking_w=blocking_w,
    )


def test_saving_against_the_baseline_with_no_straggler() -> None:
    # 4 x 90 J against 400 J; running slower costs no blocking power term without a straggler
    assert saving(job(4, energy_per_iteration_mean_j=90.0, schedule_active=True)) == 10.0
    slower = job(
        4, energy_per_iteration_mean_j=90.0, iteration_time_mean_s=1.5, schedule_active=True
    )
    assert saving(slower) == 10.0


def test_saving_under_a_straggler_leaves_it_out_and_charges_the_baselines_wait() -> None:
    """Pipeline 1 straggles at 1.5 s: the followers (pipeline 0, two GPUs) spend 95 J each.
    Their baseline: half of 400 J plus 50 W x 2 GPUs x 0.5 s of waiting = 250 J;
    190 J against it saves 24%. The straggler's own ranks count nowhere."""
    followers = [Rank(0, 95.0, 1.5, 5, True), Rank(0, 95.0, 1.5, 5, True)]
    straggler = [Rank(1, 500.0, 1.5, 5, True), Rank(1, 500.0, 1.5, 5, True)]
    assert saving(followers + straggler, straggler=1) == 24.0
    # the same figures read as if nobody straggled: everyone counts, no wait is charged
    assert saving(followers + straggler, straggler=None) == round(100 * (1 - 1190 / 400), 2)


def test_a_faster_iteration_under_a_straggler_charges_no_negative_wait() -> None:
    followers = [Rank(0, 95.0, 0.8, 5, True), Rank(0, 95.0, 0.8, 5, True)]
    straggler = [Rank(1, 95.0, 0.8, 5, True), Rank(1, 95.0, 0.8, 5, True)]
    assert saving(followers + straggler, straggler=1) == 5.0


@pytest.mark.parametrize(
    "ranks",
    [
        job(3, schedule_active=True),
        [*job(3, schedule_active=True), Rank(1)],  # one rank still runs without its schedule
        job(4, schedule_active=True, iterations=4),
    ],
)
def test_no_saving_until_every_rank_ran_the_plan_long_enough(ranks: list[Rank]) -> None:
    assert saving(ranks) is None


def test_no_saving_without_a_baseline_iteration_time() -> None:
    ranks = job(4, schedule_active=True)
    no_time = Baseline(energy_j=400.0, iteration_s=None, gpus=4)
    figures = {"expected_ranks": 4, "iterations": 5, "straggler": None, "blocking_w": 50.0}
    assert measured_saving_percent(ranks, no_time, **figures) is None  # type: ignore[arg-type]


def test_only_fresh_spans_are_samples_and_followers_are_held_to_the_pace_plan() -> None:
    spans = [Span(0, 1.0), Span(1, 1.4), Span(2, None), Span(3, 2.0)]
    samples, seen = straggler_samples(
        spans, {3: 2.0}, plan_span_s=1.0, straggler=1, follower_span_s=1.35
    )
    # pipeline 0 follows straggler 1: its plan predicts the pace; 1 itself runs the plain plan;
    # 2 reported no span; 3's span was seen already
    assert samples == [Sample(0, 1.0, 1.35), Sample(1, 1.4, 1.0)]
    assert seen == {0: 1.0, 1: 1.4, 3: 2.0}
    again, _ = straggler_samples(spans, seen, plan_span_s=1.0, straggler=1, follower_span_s=1.35)
    assert again == []


def test_with_no_straggler_plan_everyone_is_held_to_the_plain_plan() -> None:
    samples, _ = straggler_samples(
        [Span(0, 1.1), Span(1, 1.2)], {}, plan_span_s=1.0, straggler=1, follower_span_s=None
    )
    assert [s.predicted_span_s for s in samples] == [1.0, 1.0]
