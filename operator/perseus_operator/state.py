"""What the controller keeps in memory: the pod and policy indices' records, each policy's
runtime state (rebuilt from its status and the profile store after a restart), and the
Kubernetes calls it needs (`Store`, `kube.Kube` in production, a fake in tests)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

from perseus_operator import reconcile as rc
from perseus_operator.accounting import Baseline
from perseus_operator.planner import Frontier, PacePlanner
from perseus_operator.profiling import ProfileSession
from perseus_operator.straggler import StragglerState
from perseus_profiles import StageProfile

__all__ = [
    "SIMULATED_GPUS_CONDITION",
    "EventSink",
    "PlanFailureRecord",
    "PodRecord",
    "PolicyRecord",
    "PolicyRuntime",
    "Regime",
    "Store",
    "simulated_gpus",
]

SIMULATED_GPUS_CONDITION = "perseus.dev/SimulatedGPUs"
"""Pod status condition in which the simulated cluster's kubelet records the GPUs it gave a pod
(message: comma-separated UUIDs). Pod status is written through the pods/status subresource,
which tenants' roles (edit, admin) do not grant and pod creation ignores: unlike a label or an
annotation, a tenant cannot set it. Read only with the operator's `simulated_gpu_assignment`
setting; on real nodes the sidecar asks the kubelet itself."""


def simulated_gpus(status: Mapping[str, Any]) -> tuple[str, ...] | None:
    for condition in status.get("conditions") or ():
        if condition.get("type") == SIMULATED_GPUS_CONDITION and condition.get("status") == "True":
            text = str(condition.get("message") or "")
            return tuple(u for u in (p.strip() for p in text.split(",")) if u)
    return None


@dataclass(frozen=True)
class PodRecord:
    """What the pod index keeps per pod: enough to select, announce and place it."""

    name: str
    uid: str
    labels: Mapping[str, str]
    phase: str
    pod_ip: str | None
    host_ip: str | None
    node_name: str | None
    host_network: bool
    gpu_uuids: tuple[str, ...] | None = None

    def view(self) -> rc.PodView:
        return rc.PodView(
            self.name,
            self.uid,
            self.phase,
            self.pod_ip,
            self.host_ip,
            self.node_name,
            self.host_network,
            self.gpu_uuids,
        )


@dataclass(frozen=True)
class PolicyRecord:
    """What the policy index keeps: enough to tell which policy owns a pod."""

    name: str
    created: str
    deleting: bool
    selector: tuple[tuple[str, str], ...]

    def selects(self, labels: Mapping[str, str]) -> bool:
        return bool(self.selector) and all(labels.get(k) == v for k, v in self.selector)


class Store(Protocol):
    """The Kubernetes calls the controller makes (`kube.Kube` in production, a fake in tests)."""

    async def patch_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None: ...

    async def ensure_job_token(self, namespace: str, policy: str, policy_uid: str) -> str: ...

    async def read_configmap_key(self, namespace: str, name: str, key: str) -> str | None: ...

    async def store_profile(
        self,
        namespace: str,
        *,
        scope: str,
        gpu_model: str,
        stages: int,
        tensor_parallel: int,
        key: str,
        csv_text: str,
        source: str,
        blocking_power_w: float | None = None,
    ) -> str: ...

    async def load_profile(
        self,
        namespace: str,
        *,
        scope: str,
        gpu_model: str,
        stages: int,
        tensor_parallel: int,
        key: str,
    ) -> tuple[str, str, float | None] | None: ...


EventSink = Callable[[Mapping[str, Any], rc.EventSpec], None]


@dataclass(frozen=True)
class PlanFailureRecord:
    """Planning failed for this spec generation: not retried until the spec changes, also
    after an operator restart (it is written to `status.planFailure`)."""

    generation: int
    reason: str
    message: str


@dataclass
class Regime:
    """A stretch of time under one schedule (or none): measurements only count inside it."""

    name: str
    since_wall_s: float


@dataclass
class PolicyRuntime:
    """In-memory state of one policy; what must survive a restart is in its status and in the
    profile store, from which it is rebuilt."""

    namespace: str
    name: str
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    token: str | None = None
    profile: StageProfile | None = None
    profile_sig: tuple[Any, ...] | None = None
    profile_msg: str = ""
    profile_error: str | None = None
    profile_error_reason: str = "ProfileInvalid"
    profile_cm: str | None = None
    blocking_w: float | None = None
    """Blocking power measured while profiling (or stored with the profile)."""
    plan_failure: PlanFailureRecord | None = None
    """The last planning failure and the spec generation it failed for (kept in the status)."""
    profiling: ProfileSession | None = None
    frontier: Frontier | None = None
    frontier_sig: tuple[Any, ...] | None = None
    pace_planner: PacePlanner | None = None
    """Solves straggler plans at their pace for `frontier` (taken from `pace_planner_ready` on
    the first straggler)."""
    pace_planner_ready: Future[PacePlanner | None] | None = None
    """The pace planner for `frontier`, being prepared in the background since it landed."""
    plan: rc.PlanView | None = None
    straggler: StragglerState = field(default_factory=StragglerState)
    straggler_plan: rc.PlanView | None = None
    last_spans: dict[int, float] = field(default_factory=dict)
    regime: Regime = field(default_factory=lambda: Regime("none", 0.0))
    baseline: Baseline | None = None
    measured_saving: float | None = None
    had_pods: bool = False
    was_optimizing: bool = False
    last_status: dict[str, Any] = field(default_factory=dict)
    gpu_models: dict[str, tuple[str, frozenset[int]]] = field(default_factory=dict)
    conflict_key: tuple[Any, ...] | None = None
    conflict: str | None = None

    def resume(self, status: Mapping[str, Any], generation: int) -> None:
        """After an operator restart: the measured baseline, the phase and a planning failure of
        this very spec come from the status."""
        failed = status.get("planFailure") or {}
        if failed.get("generation") == generation and failed.get("message"):
            self.plan_failure = PlanFailureRecord(
                generation, str(failed.get("reason") or "PlanningFailed"), str(failed["message"])
            )
        base = status.get("measuredBaseline") or {}
        if base.get("energyJoules") and base.get("iterationTimeSeconds"):
            self.baseline = Baseline(
                float(base["energyJoules"]),
                float(base["iterationTimeSeconds"]),
                int(base.get("gpus") or 0),
            )
        saving = status.get("measuredSavingPercent")
        self.measured_saving = float(saving) if saving is not None else None
        self.was_optimizing = status.get("phase") in ("Optimizing", "Degraded")
        self.had_pods = status.get("phase") in ("Optimizing", "Degraded", "Completed")
        self.last_status = dict(status)
