"""Pure reconcile logic: what the operator observed -> what it must do, and the status to write.

No I/O here. The controller (`controller.py`) gathers an :class:`Observed` snapshot (pods, the
sidecars of their nodes, the profile, the chosen plans, energy figures), calls :func:`decide`
once, executes the returned actions, restates the outcome with :func:`settle` and writes the
status. Phases and conditions are computed here (their history and the Events of a transition in
`status_views.py`), so every transition is unit-tested without a cluster.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any, Protocol, TypeVar

from perseus_operator.model import Phase, Pipeline
from perseus_operator.reconcile_data import (
    CONDITION_TYPES,
    TERMINAL_POD_PHASES,
    UNKNOWN,
    Action,
    Announce,
    ApplySchedule,
    C,
    CondSpec,
    Decision,
    Entry,
    EventSpec,
    FrontierView,
    NodeView,
    Observed,
    PlanView,
    PodView,
    ProfileView,
    RankView,
    RemoveSchedule,
    Rollout,
    pod_identity,
)

__all__ = [
    "Announce",
    "ApplySchedule",
    "CondSpec",
    "Decision",
    "Entry",
    "EventSpec",
    "FrontierView",
    "NodeView",
    "Observed",
    "PlanView",
    "PodView",
    "ProfileView",
    "RankView",
    "RemoveSchedule",
    "Rollout",
    "decide",
    "job_ranks",
    "pod_identity",
    "saving_percent",
    "settle",
]


class _Rank(Protocol):
    @property
    def data_rank(self) -> int: ...
    @property
    def pipeline_rank(self) -> int: ...
    @property
    def tensor_rank(self) -> int: ...
    @property
    def pod(self) -> str: ...


R = TypeVar("R", bound=_Rank)


def job_ranks(
    ranks_by_node: Iterable[tuple[str, Iterable[R]]],
    pods: Iterable[PodView],
    pipeline: Pipeline,
) -> list[R]:
    """The ranks that count for the job: registered by a running pod of the job on the node that
    reports them, inside the spec's shape, one per (data, pipeline, tensor) position (the first
    by node, then pod). Anything else a pod registers must not inflate the rank count, the
    baseline or the measured energy."""
    announced = {(p.node_name, p.name) for p in pods if p.running}
    seen: set[tuple[int, int, int]] = set()
    out: list[R] = []
    for node, ranks in sorted(ranks_by_node, key=lambda item: item[0]):
        for r in sorted(ranks, key=lambda r: r.pod):
            where = (r.data_rank, r.pipeline_rank, r.tensor_rank)
            inside = (
                0 <= r.data_rank < pipeline.data_parallel
                and 0 <= r.pipeline_rank < pipeline.stages
                and 0 <= r.tensor_rank < pipeline.tensor_parallel
            )
            if inside and (node, r.pod) in announced and where not in seen:
                seen.add(where)
                out.append(r)
    return out


def _conds(ready: C, profiled: C, planned: C, applied: C) -> tuple[CondSpec, ...]:
    both = zip(CONDITION_TYPES, (ready, profiled, planned, applied), strict=True)
    return tuple(CondSpec(name, st, reason, msg) for name, (st, reason, msg) in both)


def _remove_everywhere(obs: Observed) -> tuple[Action, ...]:
    nodes = sorted(obs.nodes.items())
    return tuple(RemoveSchedule(n) for n, v in nodes if v.reachable and v.entries)


def _stopped(
    obs: Observed, phase: Phase, reason: str, msg: str, status: Mapping[str, Any]
) -> Decision:
    """A policy that must not lock anything: every schedule it set goes."""
    failed: C = ("False", reason, msg)
    conds = _conds(failed, UNKNOWN, UNKNOWN, failed)
    return Decision(phase, conds, _remove_everywhere(obs), status, optimizing=False)


def saving_percent(energy_j: float, baseline_j: float) -> float:
    return round(100.0 * (1.0 - energy_j / baseline_j), 2)


def predicted_saving_percent(
    plan: PlanView, frontier: FrontierView, blocking_power_w: float, stages: int, pace_s: float
) -> float:
    """Saving of one pipeline against all-max clocks over a common horizon: the straggler's pace,
    or the plan's own time with none. Both sides pay blocking power while waiting up to it."""
    horizon = max(pace_s, plan.iteration_time_s, frontier.baseline_time_s)
    energy = plan.energy_j + blocking_power_w * stages * (horizon - plan.iteration_time_s)
    base = frontier.baseline_energy_j + blocking_power_w * stages * (
        horizon - frontier.baseline_time_s
    )
    return saving_percent(energy, base)


def desired_entries(obs: Observed, ranks: Sequence[RankView]) -> frozenset[Entry]:
    """Schedule entries for the (pipeline, stage) pairs of `ranks`, from the plan each pipeline
    follows: the straggler's pace plan for every pipeline but the straggler."""
    assert obs.plan is not None
    out = set()
    for r in ranks:
        plan = obs.plan
        follows_straggler = obs.straggler is not None and r.data_rank != obs.straggler
        if follows_straggler and obs.straggler_plan is not None:
            plan = obs.straggler_plan
        if r.pipeline_rank >= len(plan.order):
            continue
        out.add(
            Entry(
                r.data_rank,
                r.pipeline_rank,
                plan.order[r.pipeline_rank],
                plan.frequencies_mhz[r.pipeline_rank],
            )
        )
    return frozenset(out)


def decide(obs: Observed) -> Decision:
    """The phase, conditions, actions and status fields for one observation."""
    if obs.spec is None:
        return _stopped(obs, "Failed", "Invalid", obs.spec_error or "spec is invalid", {})
    spec = obs.spec
    if obs.conflict_with is not None:
        msg = f"its pods are already managed by EnergyPolicy {obs.conflict_with}"
        return _stopped(obs, "Failed", "Conflict", msg, {})
    expected = spec.pipeline.ranks
    base_status: dict[str, Any] = {"expectedRanks": expected}
    if spec.suspend:
        msg = "spec.suspend is true: no clock is locked"
        return _stopped(obs, "Pending", "Suspended", msg, base_status)
    running = tuple(p for p in obs.pods if p.running)
    if not running:
        finished = bool(obs.pods) and all(p.phase in TERMINAL_POD_PHASES for p in obs.pods)
        if finished or (obs.had_pods and not obs.pods):
            msg = "the job's pods finished; clocks reset"
            return _stopped(obs, "Completed", "JobFinished", msg, base_status)
        msg = f"no running pod matches selector {spec.selector.as_query()}"
        return _stopped(obs, "Pending", "NoPods", msg, base_status)

    actions: list[Action] = []
    by_node: dict[str, list[PodView]] = {}
    for p in running:
        by_node.setdefault(p.node_name or "", []).append(p)
    missing = sorted(n for n in by_node if not obs.nodes.get(n, NodeView(False)).has_sidecar)
    unreachable = sorted(n for n in by_node if n not in missing and not obs.nodes[n].reachable)
    for node, pods in sorted(by_node.items()):
        view = obs.nodes.get(node)
        if view is None or not view.reachable:
            continue
        if view.announced_pods != frozenset(p.identity for p in pods):
            actions.append(Announce(node, tuple(sorted(pods, key=lambda p: p.name))))
    ranks = job_ranks(
        ((n, obs.nodes[n].ranks) for n in by_node if n in obs.nodes), running, spec.pipeline
    )
    registered = len(ranks)
    base_status["registeredRanks"] = registered

    degraded_msg = ""
    if missing:
        degraded_msg = f"no sidecar on node(s) {', '.join(missing)}"
    elif unreachable:
        reasons = "; ".join(f"{n}: {obs.nodes[n].unreachable_reason}" for n in unreachable)
        degraded_msg = f"sidecar unreachable on node(s) {reasons}"

    profiled: C
    if obs.profile.state == "ready":
        profiled = ("True", "ProfileReady", obs.profile.message)
    elif obs.profile.state == "invalid":
        bad: C = ("False", obs.profile.reason, obs.profile.message)
        return Decision(
            "Failed",
            _conds(bad, bad, UNKNOWN, bad),
            tuple(actions) + _remove_everywhere(obs),
            base_status,
            optimizing=False,
        )
    elif obs.profile.state == "measuring":
        profiled = ("False", "Profiling", obs.profile.message)
    else:
        profiled = ("False", "WaitingForProfile", obs.profile.message)

    if obs.plan_error is not None:  # before waiting for ranks: TooLarge is known at once
        failed: C = ("False", obs.plan_error_reason, obs.plan_error)
        conds = _conds(failed, profiled, failed, failed)
        return Decision(
            "Failed", conds, tuple(actions) + _remove_everywhere(obs), base_status, False
        )

    def waiting(phase: Phase, reason: str, msg: str, planned: C) -> Decision:
        if degraded_msg and obs.was_optimizing:
            phase, reason, msg = "Degraded", "SidecarUnavailable", degraded_msg
        return Decision(
            phase,
            _conds(("False", reason, msg), profiled, planned, ("False", reason, msg)),
            tuple(actions),
            base_status,
            optimizing=False,
        )

    if degraded_msg and not obs.was_optimizing:
        return waiting("Pending", "WaitingForSidecars", degraded_msg, UNKNOWN)
    if registered < expected and not obs.was_optimizing:
        msg = f"{registered} of {expected} ranks registered with their sidecars"
        return waiting("Pending", "WaitingForRanks", msg, UNKNOWN)
    if obs.profile.state != "ready":
        return waiting("Profiling", profiled[1], obs.profile.message, UNKNOWN)
    if obs.frontier is None or obs.plan is None:
        return waiting("Planning", "Planning", "computing the frontier", ("False", "Planning", ""))

    frontier, plan = obs.frontier, obs.plan
    stages = spec.pipeline.stages
    pace = obs.straggler_pace_s if obs.straggler is not None else plan.iteration_time_s
    follow = obs.straggler_plan if obs.straggler is not None and obs.straggler_plan else plan
    predicted = predicted_saving_percent(
        follow, frontier, obs.blocking_power_w or spec.blocking_power_w or 0.0, stages, pace or 0.0
    )
    status: dict[str, Any] = {
        **base_status,
        "frontier": {
            "plans": frontier.plans,
            "minIterationTimeSeconds": round(frontier.min_time_s, 4),
            "energyAtMinTimeJoules": round(frontier.energy_at_min_time_j, 1),
            "minEnergyIterationTimeSeconds": round(frontier.min_energy_time_s, 4),
            "minEnergyJoules": round(frontier.min_energy_j, 1),
            "baselineIterationTimeSeconds": round(frontier.baseline_time_s, 4),
            "baselineEnergyJoules": round(frontier.baseline_energy_j, 1),
        },
        "iterationTimeSeconds": round(plan.iteration_time_s, 4),
        "predictedSavingPercent": predicted,
        "measuredSavingPercent": obs.measured_saving_percent,
    }
    planned: C = (
        "True",
        "PlanChosen",
        f"{frontier.plans} plans; chosen iteration time {plan.iteration_time_s:.4f}s,"
        f" predicted saving {predicted:.2f}%",
    )
    if obs.straggler is not None and obs.straggler_plan is not None:
        planned = (
            "True",
            "FollowingStraggler",
            f"pipeline {obs.straggler} is a straggler at {pace:.4f}s; the others run the"
            f" {obs.straggler_plan.iteration_time_s:.4f}s plan (predicted saving {predicted:.2f}%)",
        )

    if spec.mode == "Observe":
        actions.extend(_remove_everywhere(obs))
        msg = f"Observe mode: predicted saving {predicted:.2f}%; no clock is locked"
        return Decision(
            "Planning",
            _conds(("True", "Observing", msg), profiled, planned, ("False", "ObserveMode", msg)),
            tuple(actions),
            status,
            optimizing=False,
        )
    if not obs.baseline_ready:
        msg = "measuring the all-max-clock baseline before locking clocks"
        return waiting("Planning", "MeasuringBaseline", msg, planned)

    pending_nodes = []
    for node in sorted(by_node):
        view = obs.nodes.get(node)
        if view is None or not view.reachable:
            continue
        want = desired_entries(obs, view.ranks)
        if not want:
            continue
        if view.entries != want:
            actions.append(ApplySchedule(node, tuple(sorted(want, key=_entry_key))))
            pending_nodes.append(node)
    problem: C | None = None
    if degraded_msg:
        problem = ("False", "SidecarUnavailable", degraded_msg)
    elif registered < expected:
        problem = ("False", "RanksMissing", f"{registered} of {expected} ranks registered")
    rollout = Rollout(tuple(pending_nodes), profiled, planned, problem, registered, len(by_node))
    return _rolling_out(tuple(actions), status, rollout, obs.rejected)


def _rolling_out(
    actions: tuple[Action, ...], status: Mapping[str, Any], rollout: Rollout, rejected: str | None
) -> Decision:
    """An optimizing policy's phase and conditions: Degraded on a refusal or a problem, else
    Applying until every node holds its schedule."""
    profiled, planned = rollout.profiled, rollout.planned
    problem: C | None = rollout.problem
    if rejected is not None:
        problem = ("False", "SidecarRejected", rejected)
    if problem is not None:
        conds = _conds(problem, profiled, planned, problem)
        return Decision("Degraded", conds, actions, status, optimizing=True, rollout=rollout)
    applied: C
    ready: C
    if rollout.pending_nodes:
        msg = f"pushing schedules to node(s) {', '.join(rollout.pending_nodes)}"
        applied = ("False", "Applying", msg)
        ready = ("False", "Applying", msg)
    else:
        msg = f"schedules applied to {rollout.registered} ranks on {rollout.nodes} node(s)"
        applied = ("True", "Applied", msg)
        ready = ("True", "Optimizing", planned[2])
    return Decision(
        "Optimizing",
        _conds(ready, profiled, planned, applied),
        actions,
        status,
        optimizing=True,
        rollout=rollout,
    )


def settle(decision: Decision, applied: Iterable[str], rejected: str | None) -> Decision:
    """The decision as it stands once its actions ran: the nodes in `applied` now hold their
    schedules and `rejected` is what sidecars refused (None: nothing). Only an optimizing
    decision's phase and conditions change; its actions stay those that ran."""
    if decision.rollout is None:
        return decision
    done = set(applied)
    pending = tuple(n for n in decision.rollout.pending_nodes if n not in done)
    rollout = replace(decision.rollout, pending_nodes=pending)
    return _rolling_out(decision.actions, decision.status, rollout, rejected)


def _entry_key(e: Entry) -> tuple[int, int]:
    return (e.data_rank, e.pipeline_rank)
