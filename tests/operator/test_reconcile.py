"""decide(): phases, conditions and actions for each situation, with no cluster."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from perseus_operator.model import EnergyPolicySpec, parse_spec
from perseus_operator.reconcile import (
    Announce,
    ApplySchedule,
    CondSpec,
    Decision,
    Entry,
    FrontierView,
    NodeView,
    Observed,
    PlanView,
    PodView,
    ProfileView,
    RankView,
    RemoveSchedule,
    decide,
    settle,
)
from perseus_operator.status_views import events_between, merge_conditions


def make_spec(**over: Any) -> EnergyPolicySpec:
    raw: dict[str, Any] = {
        "selector": {"matchLabels": {"job": "gpt"}},
        "pipeline": {"stages": 2, "microbatches": 2, "dataParallel": 2},
        "profile": {"import": {"configMap": "gpt-profile"}},
        "blockingPowerW": 80.0,
    }
    raw.update(over)
    return parse_spec(raw)


ORDER = (("F0", "F1", "B0", "B1"), ("F0", "B0", "F1", "B1"))
PLAN = PlanView(1.0, 900.0, ORDER, ((1410, 1200, 1410, 1410), (1410, 1410, 1410, 1410)), 1.0)
SLOW = PlanView(1.2, 800.0, ORDER, ((1000,) * 4, (1100,) * 4), 1.2)
FRONTIER = FrontierView(10, 1.0, 900.0, 1.3, 780.0, 1.0, 1000.0)
PODS = tuple(
    PodView(
        f"p{d}{s}", f"uid{d}{s}", "Running", f"127.0.1.{2 * d + s}", f"127.0.0.{d + 1}", f"n{d}"
    )
    for d in range(2)
    for s in range(2)
)


def node(d: int, entries: frozenset[Entry] = frozenset()) -> NodeView:
    return NodeView(
        has_sidecar=True,
        reachable=True,
        announced_pods=frozenset({PODS[2 * d].identity, PODS[2 * d + 1].identity}),
        ranks=(RankView(d, 0, 0, f"p{d}0"), RankView(d, 1, 0, f"p{d}1")),
        entries=entries,
    )


def ready_obs(**over: Any) -> Observed:
    obs = Observed(
        generation=3,
        spec=make_spec(),
        pods=PODS,
        had_pods=True,
        nodes={"n0": node(0), "n1": node(1)},
        profile=ProfileView("ready", "imported"),
        frontier=FRONTIER,
        plan=PLAN,
        baseline_ready=True,
    )
    return replace(obs, **over)


def cond(decision: Decision, name: str) -> CondSpec:
    return next(c for c in decision.conditions if c.type == name)


def entries_for(d: int, plan: PlanView) -> frozenset[Entry]:
    return frozenset(Entry(d, s, plan.order[s], plan.frequencies_mhz[s]) for s in range(2))


def test_invalid_spec_fails_and_removes_schedules() -> None:
    d = decide(
        ready_obs(spec=None, spec_error="spec.x: bad", nodes={"n0": node(0, entries_for(0, PLAN))})
    )
    assert d.phase == "Failed"
    assert cond(d, "Ready") == CondSpec("Ready", "False", "Invalid", "spec.x: bad")
    assert d.actions == (RemoveSchedule("n0"),)


def test_conflict_suspend_nopods() -> None:
    assert decide(ready_obs(conflict_with="other")).phase == "Failed"
    assert cond(decide(ready_obs(conflict_with="other")), "Ready").reason == "Conflict"
    d = decide(ready_obs(spec=make_spec(suspend=True)))
    assert (d.phase, cond(d, "Ready").reason) == ("Pending", "Suspended")
    d = decide(ready_obs(pods=(), had_pods=False))
    assert (d.phase, cond(d, "Ready").reason) == ("Pending", "NoPods")


def test_job_finished_completes_and_resets() -> None:
    done = tuple(replace(p, phase="Succeeded") for p in PODS)
    nodes = {"n0": node(0, entries_for(0, PLAN)), "n1": node(1, entries_for(1, PLAN))}
    d = decide(ready_obs(pods=done, nodes=nodes))
    assert d.phase == "Completed" and cond(d, "Ready").reason == "JobFinished"
    assert set(d.actions) == {RemoveSchedule("n0"), RemoveSchedule("n1")}
    d = decide(ready_obs(pods=(), had_pods=True, nodes=nodes))
    assert d.phase == "Completed"


def test_announces_then_waits_for_ranks() -> None:
    bare = NodeView(has_sidecar=True, reachable=True)
    d = decide(ready_obs(nodes={"n0": bare, "n1": bare}))
    assert {a.node for a in d.actions if isinstance(a, Announce)} == {"n0", "n1"}
    assert d.phase == "Pending" and cond(d, "Ready").reason == "WaitingForRanks"
    assert d.status["registeredRanks"] == 0 and d.status["expectedRanks"] == 4


def test_missing_sidecar_pending_then_degraded() -> None:
    d = decide(ready_obs(nodes={"n0": node(0)}))
    assert d.phase == "Pending" and "no sidecar on node(s) n1" in cond(d, "Ready").message
    lost = NodeView(has_sidecar=True, reachable=False, unreachable_reason="connection refused")
    d = decide(ready_obs(nodes={"n0": node(0), "n1": lost}, was_optimizing=True))
    assert d.phase == "Degraded" and cond(d, "Ready").reason == "SidecarUnavailable"
    assert "connection refused" in cond(d, "Ready").message
    # the reachable node still gets its schedule
    assert [a.node for a in d.actions if isinstance(a, ApplySchedule)] == ["n0"]


def test_profile_states() -> None:
    d = decide(ready_obs(profile=ProfileView("measuring", "3 of 9 clocks")))
    assert d.phase == "Profiling" and cond(d, "Profiled").reason == "Profiling"
    d = decide(ready_obs(profile=ProfileView("invalid", "row 3: bad")))
    assert d.phase == "Failed" and cond(d, "Ready").reason == "ProfileInvalid"
    d = decide(ready_obs(frontier=None, plan=None))
    assert d.phase == "Planning" and cond(d, "Profiled").status == "True"


def test_observe_mode_never_locks() -> None:
    nodes = {"n0": node(0, entries_for(0, PLAN)), "n1": node(1)}
    d = decide(ready_obs(spec=make_spec(mode="Observe"), nodes=nodes))
    assert not any(isinstance(a, ApplySchedule) for a in d.actions)
    assert RemoveSchedule("n0") in d.actions
    assert cond(d, "Ready").status == "True" and cond(d, "ScheduleApplied").status == "False"
    assert d.status["predictedSavingPercent"] == pytest.approx(10.0)


def test_baseline_first_then_apply_then_ready() -> None:
    d = decide(ready_obs(baseline_ready=False))
    assert d.phase == "Planning" and cond(d, "Ready").reason == "MeasuringBaseline"
    assert not any(isinstance(a, ApplySchedule) for a in d.actions)
    d = decide(ready_obs())
    applies = {a.node: a for a in d.actions if isinstance(a, ApplySchedule)}
    assert set(applies) == {"n0", "n1"}
    assert set(applies["n1"].entries) == entries_for(1, PLAN)
    assert d.phase == "Optimizing" and cond(d, "Ready").status == "False"
    nodes = {"n0": node(0, entries_for(0, PLAN)), "n1": node(1, entries_for(1, PLAN))}
    d = decide(ready_obs(nodes=nodes, measured_saving_percent=9.5))
    assert d.actions == () and cond(d, "Ready").status == "True"
    assert cond(d, "ScheduleApplied").reason == "Applied"
    assert d.status["measuredSavingPercent"] == 9.5
    assert d.status["iterationTimeSeconds"] == 1.0
    assert d.status["frontier"]["plans"] == 10


def test_straggler_moves_the_others_only() -> None:
    nodes = {"n0": node(0, entries_for(0, PLAN)), "n1": node(1, entries_for(1, PLAN))}
    d = decide(ready_obs(nodes=nodes, straggler=1, straggler_plan=SLOW, straggler_pace_s=1.2))
    applies = [a for a in d.actions if isinstance(a, ApplySchedule)]
    assert [a.node for a in applies] == ["n0"]
    assert set(applies[0].entries) == entries_for(0, SLOW)
    assert cond(d, "Planned").reason == "FollowingStraggler"
    # fair baseline at T' = 1.2: 1000 + 80*2*0.2 = 1032 vs 800
    assert d.status["predictedSavingPercent"] == pytest.approx(100 * (1 - 800 / 1032), abs=0.01)


def test_merge_conditions_keeps_transition_time() -> None:
    old = [{"type": "Ready", "status": "False", "reason": "A", "lastTransitionTime": "t0"}]
    new = [CondSpec("Ready", "False", "B", "m"), CondSpec("Planned", "True", "P", "")]
    merged = merge_conditions(old, new, 4, "t1")
    assert merged[0]["lastTransitionTime"] == "t0" and merged[0]["reason"] == "B"
    assert merged[1]["lastTransitionTime"] == "t1" and merged[1]["observedGeneration"] == 4
    flipped = merge_conditions(merged, [CondSpec("Ready", "True", "B", "")], 4, "t2")
    assert flipped[0]["lastTransitionTime"] == "t2"


def test_events_for_transitions_only() -> None:
    new = [
        CondSpec("Ready", "False", "Invalid", "bad"),
        CondSpec("Planned", "Unknown", "NotYet", ""),
    ]
    events = events_between(None, [], "Failed", new)
    assert events[0].type == "Warning" and events[0].reason == "Failed"
    assert [e.reason for e in events] == ["Failed", "Invalid"]
    old = merge_conditions([], new, 1, "t")
    assert events_between("Failed", old, "Failed", new) == []


def test_a_pipeline_too_large_to_plan_fails_before_ranks_or_profile() -> None:
    """TooLarge is known from the spec alone: no wait for ranks or a profile, schedules go."""
    msg = "64 stages x 1024 microbatches are 131072 instructions per pipeline; at most 16384"
    bare = {"n0": replace(node(0, entries_for(0, PLAN)), ranks=()), "n1": node(1)}
    d = decide(
        ready_obs(
            nodes=bare,
            profile=ProfileView("missing"),
            frontier=None,
            plan=None,
            plan_error=msg,
            plan_error_reason="TooLarge",
        )
    )
    assert d.phase == "Failed" and cond(d, "Planned").reason == "TooLarge"
    assert cond(d, "Ready").reason == "TooLarge" and cond(d, "Ready").message == msg
    assert RemoveSchedule("n0") in d.actions


def test_planner_refusal_and_sidecar_rejection_are_reported() -> None:
    d = decide(ready_obs(frontier=None, plan=None, plan_error="the planner refused: x"))
    assert d.phase == "Failed" and cond(d, "Planned").reason == "PlanningFailed"
    assert cond(d, "Ready").message == "the planner refused: x"
    d = decide(ready_obs(rejected="node n0: HTTP 422: clock 5 MHz unsupported"))
    assert d.phase == "Degraded" and cond(d, "ScheduleApplied").reason == "SidecarRejected"
    assert "clock 5 MHz unsupported" in cond(d, "Ready").message


def after_acting(obs: Observed, applied: set[str], rejected: str | None) -> Observed:
    """What a second look at the sidecars would show once the schedules went out."""
    d = decide(obs)
    pushed = {a.node: frozenset(a.entries) for a in d.actions if isinstance(a, ApplySchedule)}
    nodes = {n: replace(v, entries=pushed[n]) if n in applied else v for n, v in obs.nodes.items()}
    return replace(obs, nodes=nodes, rejected=rejected)


@pytest.mark.parametrize(
    ("applied", "rejected", "phase", "ready"),
    [
        ({"n0", "n1"}, None, "Optimizing", "Optimizing"),
        ({"n0"}, None, "Optimizing", "Applying"),  # n1 was unreachable for the push
        (set(), None, "Optimizing", "Applying"),
        ({"n0"}, "node n1: HTTP 422: clock 5 MHz unsupported", "Degraded", "SidecarRejected"),
    ],
)
def test_settle_states_the_outcome_of_acting_as_deciding_again_would(
    applied: set[str], rejected: str | None, phase: str, ready: str
) -> None:
    """One `decide` per pass: `settle` restates its conditions once the schedules were pushed
    (or refused), exactly as a second `decide` over what the sidecars then hold."""
    obs = ready_obs()
    first = decide(obs)
    assert [type(a) for a in first.actions] == [ApplySchedule, ApplySchedule]
    assert cond(first, "Ready").reason == "Applying"
    settled = settle(first, applied, rejected)
    assert settled == replace(decide(after_acting(obs, applied, rejected)), actions=first.actions)
    assert (settled.phase, cond(settled, "Ready").reason) == (phase, ready)


def test_settle_leaves_a_decision_that_pushes_nothing_alone() -> None:
    for d in (decide(ready_obs(spec=None, spec_error="bad")), decide(ready_obs(frontier=None))):
        assert d.rollout is None and settle(d, {"n0"}, "refused") is d
