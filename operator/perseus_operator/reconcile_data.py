"""The plain data of reconciling: what the operator observed (`Observed` and its views of pods,
ranks, nodes, profile and plans) and what `reconcile.decide` returns (`Decision`: phase,
conditions, actions, the rollout `settle` restates). Frozen dataclasses, no logic beyond naming;
`reconcile` re-exports them, so callers keep one import.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from perseus_operator.model import EnergyPolicySpec, Phase

CONDITION_TYPES = ("Ready", "Profiled", "Planned", "ScheduleApplied")
Status = Literal["True", "False", "Unknown"]
C = tuple[Status, str, str]
"""A condition's (status, reason, message)."""
UNKNOWN: C = ("Unknown", "NotYet", "")
TERMINAL_POD_PHASES = frozenset({"Succeeded", "Failed"})


def pod_identity(name: str, uid: str, ip: str | None) -> str:
    """A pod as an announcement must match it, from the API server's view (`PodView.identity`)
    or a sidecar's (`NodeView.announced_pods`): a recreated pod (new UID or IP) is announced
    again."""
    return f"{name}/{uid}/{ip}"


@dataclass(frozen=True)
class PodView:
    name: str
    uid: str
    phase: str
    pod_ip: str | None
    host_ip: str | None
    node_name: str | None
    host_network: bool = False
    gpu_uuids: tuple[str, ...] | None = None
    """The GPUs the pod was given, where a trusted source tells (see state.simulated_gpus)."""

    @property
    def identity(self) -> str:
        """What an announcement must match (`pod_identity`)."""
        return pod_identity(self.name, self.uid, self.pod_ip)

    @property
    def running(self) -> bool:
        return self.phase == "Running" and bool(self.pod_ip) and bool(self.node_name)


@dataclass(frozen=True)
class RankView:
    data_rank: int
    pipeline_rank: int
    tensor_rank: int
    pod: str


@dataclass(frozen=True)
class Entry:
    """One stage of one pipeline: instruction order and clocks, as pushed to a sidecar."""

    data_rank: int
    pipeline_rank: int
    order: tuple[str, ...]
    frequencies_mhz: tuple[int, ...]


@dataclass(frozen=True)
class NodeView:
    """A node hosting running pods of the job, seen through its sidecar."""

    has_sidecar: bool
    reachable: bool = False
    announced_pods: frozenset[str] = frozenset()
    """`PodView.identity` of each pod the sidecar knows for this job."""
    ranks: tuple[RankView, ...] = ()
    entries: frozenset[Entry] = frozenset()
    unreachable_reason: str = ""


@dataclass(frozen=True)
class ProfileView:
    state: Literal["ready", "measuring", "missing", "invalid"]
    message: str = ""
    reason: str = "ProfileInvalid"
    """The condition reason of an invalid profile (ProfileInvalid, ProfileImplausible)."""


@dataclass(frozen=True)
class PlanView:
    """A plan for one pipeline (one GPU per stage, as profiled)."""

    iteration_time_s: float
    energy_j: float
    order: tuple[tuple[str, ...], ...]
    frequencies_mhz: tuple[tuple[int, ...], ...]
    stage0_span_s: float


@dataclass(frozen=True)
class FrontierView:
    plans: int
    min_time_s: float
    energy_at_min_time_j: float
    min_energy_time_s: float
    min_energy_j: float
    baseline_time_s: float
    baseline_energy_j: float


@dataclass(frozen=True)
class Observed:
    generation: int
    spec: EnergyPolicySpec | None
    spec_error: str | None = None
    conflict_with: str | None = None
    pods: tuple[PodView, ...] = ()
    had_pods: bool = False
    nodes: Mapping[str, NodeView] = field(default_factory=dict)
    profile: ProfileView = ProfileView("missing")
    frontier: FrontierView | None = None
    plan: PlanView | None = None
    """The plan with no straggler (the straggler itself keeps running it)."""
    straggler: int | None = None
    straggler_plan: PlanView | None = None
    """The plan for the others at the straggler's pace."""
    straggler_pace_s: float | None = None
    blocking_power_w: float | None = None
    """The blocking power in use: the spec's, or the one measured while profiling."""
    plan_error: str | None = None
    """Planning is refused or failed: the policy fails with this message."""
    plan_error_reason: str = "PlanningFailed"
    """Its condition reason: PlanningFailed, or TooLarge (refused before planning)."""
    rejected: str | None = None
    """A sidecar refused the schedule pushed to it (its message)."""
    baseline_ready: bool = False
    measured_saving_percent: float | None = None
    was_optimizing: bool = False


@dataclass(frozen=True)
class Announce:
    node: str
    pods: tuple[PodView, ...]


@dataclass(frozen=True)
class ApplySchedule:
    node: str
    entries: tuple[Entry, ...]


@dataclass(frozen=True)
class RemoveSchedule:
    node: str


Action = Announce | ApplySchedule | RemoveSchedule


@dataclass(frozen=True)
class CondSpec:
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str
    message: str


@dataclass(frozen=True)
class EventSpec:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass(frozen=True)
class Rollout:
    """What an optimizing decision's conditions rest on besides the observation, so that
    :func:`settle` can restate them once the schedules were pushed."""

    pending_nodes: tuple[str, ...]
    """Nodes whose sidecars do not hold the schedule they should (an ApplySchedule each)."""
    profiled: C
    planned: C
    problem: C | None
    """A missing or unreachable sidecar, or missing ranks: the policy is Degraded."""
    registered: int
    nodes: int


@dataclass(frozen=True)
class Decision:
    phase: Phase
    conditions: tuple[CondSpec, ...]
    actions: tuple[Action, ...]
    status: Mapping[str, Any]
    """Status fields besides phase/conditions (camelCase, None = remove)."""
    optimizing: bool
    rollout: Rollout | None = None
    """Set while optimizing: the input of :func:`settle`."""
