"""kopf handlers: the only module with kopf decorators. Thin shims over `controller.py`.

- Indices: job pods by (namespace, label), sidecar pods by node, policies by namespace: in-memory
  lookups kept current by kopf's watches instead of API calls on every reconcile.
- A daemon per EnergyPolicy runs its level-based reconcile loop; spec changes and pod events
  wake it early.
- The delete handler is the finalizer: every sidecar forgets the job (clocks reset), with
  bounded retries.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Mapping
from typing import Any, cast

import kopf

from perseus_operator.controller import Controller, cleanup_policy
from perseus_operator.kube import Kube
from perseus_operator.model import GROUP, PLURAL, VERSION, parse_spec
from perseus_operator.plan_process import plan_in_subprocess
from perseus_operator.reconcile import EventSpec
from perseus_operator.settings import Settings
from perseus_operator.sidecar_index import SidecarPod, choose_sidecars, sidecar_candidate
from perseus_operator.sidecars import SidecarGateway
from perseus_operator.state import PodRecord, PolicyRecord, simulated_gpus

__all__ = ["STATE", "State"]

log = logging.getLogger("perseus.operator")


class State:
    """Process-wide objects created at startup (kopf's memo is per-resource)."""

    def __init__(self) -> None:
        self.settings = Settings()
        self.kube: Kube | None = None
        self.gateway: SidecarGateway | None = None
        self.controller: Controller | None = None
        self.ignored_sidecars: frozenset[str] = frozenset()
        """Candidates last logged as ignored: each is logged once, not on every pass."""

    def ready(self) -> Controller:
        if self.controller is None:
            raise kopf.TemporaryError("operator is still starting", delay=1)
        return self.controller


STATE = State()
SIDECAR_LABELS = STATE.settings.sidecar_labels()


def _emit(body: Mapping[str, Any], event: EventSpec) -> None:
    kopf.event(
        cast(kopf.Body, body), type=event.type, reason=event.reason, message=event.message[:1000]
    )


@kopf.on.startup(id="configure")
async def configure(*, settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING  # our own events explain transitions
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 30
    STATE.kube = await Kube.connect()
    STATE.gateway = SidecarGateway(
        STATE.settings.operator_token(), timeout_s=STATE.settings.sidecar_timeout_s
    )
    STATE.controller = Controller(
        STATE.kube,
        STATE.gateway,
        profile_namespace=STATE.settings.pod_namespace,
        baseline_iterations=STATE.settings.baseline_iterations,
        measure_iterations=STATE.settings.measure_iterations,
        max_window_s=STATE.settings.max_window_s,
        max_plan_instructions=STATE.settings.max_plan_instructions,
        plan=functools.partial(
            plan_in_subprocess,
            memory_mib=STATE.settings.planner_memory_mib,
            timeout_s=STATE.settings.planner_timeout_s,
        ),
        emit=_emit,
    )


@kopf.on.cleanup(id="close")
async def close(**_: Any) -> None:
    if STATE.gateway is not None:
        await STATE.gateway.close()
    if STATE.kube is not None:
        await STATE.kube.close()


@kopf.index("pods", id="job_pods")
def job_pods(
    *,
    namespace: str | None,
    name: str,
    uid: str,
    labels: Mapping[str, str],
    spec: Mapping[str, Any],
    status: Mapping[str, Any],
    meta: Mapping[str, Any],
    **_: Any,
) -> dict[tuple[str, str, str], PodRecord]:
    """Every pod under each of its labels, so a selector looks up one small bucket."""
    if meta.get("deletionTimestamp") and status.get("phase") not in ("Succeeded", "Failed"):
        phase = "Terminating"
    else:
        phase = str(status.get("phase") or "Pending")
    record = PodRecord(
        name=name,
        uid=uid,
        labels=dict(labels),
        phase=phase,
        pod_ip=status.get("podIP"),
        host_ip=status.get("hostIP"),
        node_name=spec.get("nodeName"),
        host_network=bool(spec.get("hostNetwork")),
        gpu_uuids=simulated_gpus(status) if STATE.settings.simulated_gpu_assignment else None,
    )
    return {(namespace or "", k, v): record for k, v in labels.items()}


@kopf.index("pods", id="sidecars", labels=SIDECAR_LABELS)
def sidecars(
    *,
    namespace: str | None,
    name: str,
    spec: Mapping[str, Any],
    status: Mapping[str, Any],
    meta: Mapping[str, Any],
    **_: Any,
) -> dict[str, SidecarPod] | None:
    """Sidecar candidates by node: running pods of the operator's namespace with the sidecar
    labels (the port is the configured one; `_addresses` keeps only the DaemonSet's pods)."""
    found = sidecar_candidate(
        namespace=namespace,
        name=name,
        meta=meta,
        spec=spec,
        status=status,
        own_namespace=STATE.settings.pod_namespace,
        daemonset=STATE.settings.sidecar_daemonset,
        port=STATE.settings.sidecar_port,
    )
    return None if found is None else {found[0]: found[1]}


@kopf.index(GROUP, VERSION, PLURAL, id="policies")
def policies(
    *, namespace: str | None, name: str, meta: Mapping[str, Any], spec: Mapping[str, Any], **_: Any
) -> dict[str, PolicyRecord]:
    labels = (spec.get("selector") or {}).get("matchLabels") or {}
    record = PolicyRecord(
        name=name,
        created=str(meta.get("creationTimestamp") or ""),
        deleting=bool(meta.get("deletionTimestamp")),
        selector=tuple(sorted((str(k), str(v)) for k, v in labels.items())),
    )
    return {namespace or "": record}


def _selected(
    index: kopf.Index[Any, PodRecord], namespace: str | None, raw_spec: Any
) -> list[PodRecord]:
    try:
        selector = parse_spec(raw_spec).selector
    except ValueError:
        return []
    buckets = [index.get((namespace, k, v), ()) for k, v in selector.match_labels.items()]
    smallest: Iterable[PodRecord] = min(buckets, key=lambda b: len(list(b))) if buckets else ()
    return [p for p in smallest if selector.matches(dict(p.labels))]


def _addresses(index: kopf.Index[str, SidecarPod]) -> dict[str, str]:
    addresses, ignored = choose_sidecars(index.items(), STATE.settings.sidecar_daemonset)
    for line in ignored:
        if line not in STATE.ignored_sidecars:
            log.warning("%s", line)
    STATE.ignored_sidecars = frozenset(ignored)
    return addresses


@kopf.daemon(GROUP, VERSION, PLURAL, id="reconcile", cancellation_timeout=10)
async def reconcile(
    *,
    body: kopf.Body,
    namespace: str | None,
    name: str,
    stopped: kopf.DaemonStopped,
    **kwargs: Any,
) -> None:
    job_pods: kopf.Index[Any, PodRecord] = kwargs["job_pods"]
    sidecars: kopf.Index[str, SidecarPod] = kwargs["sidecars"]
    policies: kopf.Index[str, PolicyRecord] = kwargs["policies"]
    controller = STATE.ready()
    namespace = namespace or ""
    await controller.run_policy(
        body,
        pods=lambda: _selected(job_pods, namespace, body.get("spec")),
        sidecars=lambda: _addresses(sidecars),
        others=lambda: list(policies.get(namespace, ())),
        stopped=lambda: bool(stopped),
        tick_s=STATE.settings.tick_s,
    )


@kopf.on.update(GROUP, VERSION, PLURAL, id="spec-changed", field="spec")
def spec_changed(*, namespace: str | None, name: str, **_: Any) -> None:
    STATE.ready().wake(namespace or "", name)


@kopf.on.event("pods", id="wake-on-pod")
def wake_on_pod(*, namespace: str | None, labels: Mapping[str, str], **kwargs: Any) -> None:
    """A job pod started, moved or finished: its policy reacts now, not at its next tick."""
    policies: kopf.Index[str, PolicyRecord] = kwargs["policies"]
    if STATE.controller is None or namespace is None:
        return
    for policy in policies.get(namespace, ()):
        if policy.selects(labels):
            STATE.controller.wake(namespace, policy.name)


@kopf.on.delete(GROUP, VERSION, PLURAL, id="cleanup")
async def cleanup(
    *,
    namespace: str | None,
    name: str,
    logger: kopf.Logger,
    **kwargs: Any,
) -> None:
    sidecars: kopf.Index[str, SidecarPod] = kwargs["sidecars"]
    controller = STATE.ready()
    namespace = namespace or ""
    assert STATE.gateway is not None
    addresses = _addresses(sidecars)
    runtime = controller.runtimes.pop((namespace, name), None)
    if runtime is not None and runtime.gpu_models:
        targets = [addresses[n] for n in runtime.gpu_models if n in addresses]
    else:  # after an operator restart: ask every sidecar
        targets = list(addresses.values())
    left = await cleanup_policy(
        STATE.gateway,
        targets,
        namespace,
        name,
        attempts=STATE.settings.cleanup_attempts,
    )
    if left:
        logger.warning(
            "could not reach sidecar(s) %s; their own timeout resets the clocks on restart",
            ", ".join(left),
        )
