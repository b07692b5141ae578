"""Straggler detection: confirmation over several samples, hysteresis, and no flapping when the
other pipelines are slowed on purpose (each is compared with its own plan)."""

from __future__ import annotations

import pytest

from perseus_operator.straggler import Sample, StragglerState, update


def feed(
    state: StragglerState, spans: dict[int, float], predicted: dict[int, float]
) -> tuple[StragglerState, bool]:
    verdict = update(
        state, [Sample(d, s, predicted[d]) for d, s in spans.items()], threshold=0.05, iterations=3
    )
    return verdict.state, verdict.changed


def test_needs_several_slow_samples_in_a_row() -> None:
    state = StragglerState()
    pred = {0: 1.0, 1: 1.0}
    state, changed = feed(state, {0: 1.0, 1: 1.2}, pred)
    state, changed = feed(state, {0: 1.0, 1: 1.2}, pred)
    assert state.straggler is None and not changed
    state, changed = feed(state, {0: 1.0, 1: 1.0}, pred)  # the run is broken
    for _ in range(2):
        state, changed = feed(state, {0: 1.0, 1: 1.2}, pred)
    assert state.straggler is None
    state, changed = feed(state, {0: 1.0, 1: 1.2}, pred)
    assert changed and state.straggler == 1 and state.pace_s == pytest.approx(1.2)


def test_slowed_pipelines_do_not_flap_and_straggler_recovers() -> None:
    state = StragglerState()
    pred = {0: 1.0, 1: 1.0, 2: 1.0}
    for _ in range(3):
        state, changed = feed(state, {0: 1.0, 1: 1.3, 2: 1.0}, pred)
    assert changed and state.straggler == 1
    # The operator moves pipelines 0 and 2 to the 1.3 s plan: their prediction is now 1.3 s.
    pred = {0: 1.3, 1: 1.0, 2: 1.3}
    changes = 0
    for _ in range(20):
        state, changed = feed(state, {0: 1.29, 1: 1.3, 2: 1.31}, pred)
        changes += changed
    assert changes == 0 and state.straggler == 1
    # Small jitter of the straggler's pace (under threshold/2) does not re-plan either.
    state, changed = feed(state, {0: 1.3, 1: 1.32, 2: 1.3}, pred)
    assert not changed
    # Recovery needs `iterations` samples back within half the threshold.
    for i in range(3):
        state, changed = feed(state, {0: 1.3, 1: 1.01, 2: 1.3}, pred)
        assert changed == (i == 2)
    assert state.straggler is None and state.pace_s is None


def test_follows_the_slowest_and_its_pace_moves() -> None:
    state = StragglerState()
    pred = {0: 1.0, 1: 1.0, 2: 1.0}
    for _ in range(3):
        state, _ = feed(state, {0: 1.1, 1: 1.4, 2: 1.0}, pred)
    assert state.straggler == 1
    for _ in range(3):
        state, _ = feed(state, {0: 1.1, 1: 1.6, 2: 1.0}, pred)
    assert state.straggler == 1 and state.pace_s == pytest.approx(1.6)


def test_between_thresholds_neither_detects_nor_recovers() -> None:
    state = StragglerState()
    pred = {0: 1.0}
    for _ in range(10):
        state, changed = feed(state, {0: 1.04}, pred)
        assert not changed and state.straggler is None


def test_ignores_non_positive_and_rejects_bad_settings() -> None:
    state = update(
        StragglerState(), [Sample(0, 0.0, 1.0), Sample(0, 1.0, -1.0)], threshold=0.05, iterations=3
    ).state
    assert state.slow_runs == {} and state.ok_runs == {}
    with pytest.raises(ValueError):
        update(StragglerState(), [], threshold=0, iterations=3)
