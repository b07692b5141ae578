"""The operator's side of an interleaved policy: the profile must have the spec's chunks, and
the plan it pushes names each instruction's chunk in a form the sidecar accepts."""

from __future__ import annotations

import pytest

from perseus_operator.model import parse_spec
from perseus_operator.planner import PipelineShape, compute_frontier, plan_for_no_straggler
from perseus_operator.status_views import check_profile, plan_view
from perseus_profiles import ProfileError, load_example
from perseus_sidecar.api import ScheduleEntry, ScheduleIn

SPEC = {
    "selector": {"matchLabels": {"job": "gpt"}},
    "pipeline": {"stages": 2, "microbatches": 4, "schedule": "interleaved-1f1b",
                 "virtualStages": 2},
    "profile": {"import": {"configMap": "gpt-profile"}},
    "blockingPowerW": 83.64,
}  # fmt: skip
ONE = load_example("gpt3-175b-a100").select_stages((0, 7))


def test_the_profile_must_have_the_specs_chunks() -> None:
    spec = parse_spec(SPEC)
    clocks = frozenset(ONE.frequencies_mhz)
    assert check_profile(ONE.split_chunks(2), spec, clocks).chunks == 2
    with pytest.raises(ProfileError, match=r"1 model chunk.*virtualStages is 2.*chunk column"):
        check_profile(ONE, spec, clocks)
    with pytest.raises(ProfileError, match="4 model chunk"):
        check_profile(ONE.split_chunks(4), spec, clocks)


def test_the_plans_schedule_entries_are_valid_sidecar_entries() -> None:
    profile = ONE.split_chunks(2)
    shape = PipelineShape(2, 4, "interleaved-1f1b", 2)
    frontier = compute_frontier(profile, shape, 83.64)
    view = plan_view(profile, frontier, plan_for_no_straggler(frontier, 0.0))
    entries = [
        ScheduleEntry(
            data_rank=0,
            pipeline_rank=s,
            order=list(view.order[s]),
            frequencies_mhz=list(view.frequencies_mhz[s]),
        )
        for s in range(2)
    ]
    body = ScheduleIn(entries=entries)
    assert [(e.chunks, e.microbatches) for e in body.entries] == [(2, 4), (2, 4)]
    assert view.stage0_span_s == pytest.approx(view.iteration_time_s)
