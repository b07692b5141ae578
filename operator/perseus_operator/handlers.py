"""kopf handlers: the only module that registers with kopf. Thin shims over `controller.py`.

`build_registry` puts them on a registry of their own; `main` runs kopf with it and with an
`OperatorMemo` holding the settings, through which every handler reaches the controller.

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
from dataclasses import dataclass, field
from typing import Any, cast

import kopf

from perseus_operator.controller import Controller
from perseus_operator.kube import Kube
from perseus_operator.model import GROUP, PLURAL, VERSION, parse_spec
from perseus_operator.plan_process import plan_in_subprocess
from perseus_operator.reconcile import EventSpec
from perseus_operator.settings import Settings
from perseus_operator.sidecar_index import SidecarPod, choose_sidecars, sidecar_candidate
from perseus_operator.sidecars import SidecarGateway
from perseus_operator.state import PodRecord, PolicyRecord, simulated_gpus

__all__ = ["OperatorMemo", "build_registry"]

log = logging.getLogger("perseus.operator")


@dataclass
class OperatorMemo:
    """kopf's `memo`: built once by `main` with the settings; the startup handler adds the
    process-wide objects. kopf gives each resource a shallow copy, so all share these."""

    settings: Settings
    kube: Kube | None = None
    gateway: SidecarGateway | None = None
    controller: Controller | None = None
    ignored_sidecars: set[str] = field(default_factory=set)
    """Candidates last logged as ignored: each is logged once, not on every pass."""

    def ready(self) -> Controller:
        if self.controller is None:
            raise kopf.TemporaryError("operator is still starting", delay=1)
        return self.controller


def build_registry(settings: Settings) -> kopf.OperatorRegistry:
    """Every handler of this module on a registry of its own (not kopf's global default);
    the sidecar index watches only pods with the configured sidecar labels. kopf logs in with
    the Kubernetes client the operator uses (kubeconfig or in-cluster credentials), the one
    login handler kopf's default registry would have added by itself."""
    registry = kopf.OperatorRegistry()
    kopf.on.login(id="login", registry=registry)(kopf.login_via_async_client)
    kopf.on.startup(id="configure", registry=registry)(configure)
    kopf.on.cleanup(id="close", registry=registry)(close)
    kopf.index("pods", id="job_pods", registry=registry)(job_pods)
    kopf.index("pods", id="sidecars", labels=settings.sidecar_labels(), registry=registry)(sidecars)
    kopf.index(GROUP, VERSION, PLURAL, id="policies", registry=registry)(policies)
    kopf.daemon(GROUP, VERSION, PLURAL, id="reconcile", cancellation_timeout=10, registry=registry)(
        reconcile
    )
    kopf.on.update(GROUP, VERSION, PLURAL, id="spec-changed", field="spec", registry=registry)(
        spec_changed
    )
    kopf.on.event("pods", id="wake-on-pod", registry=registry)(wake_on_pod)
    kopf.on.delete(GROUP, VERSION, PLURAL, id="cleanup", registry=registry)(cleanup)
    return registry


def _emit(body: Mapping[str, Any], event: EventSpec) -> None:
    kopf.event(
        cast(kopf.Body, body), type=event.type, reason=event.reason, message=event.message[:1000]
    )


async def configure(*, settings: kopf.OperatorSettings, memo: OperatorMemo, **_: Any) -> None:
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING  # our own events explain transitions
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 30
    ours = memo.settings
    memo.kube = await Kube.connect()
    memo.gateway = SidecarGateway(ours.operator_token(), timeout_s=ours.sidecar_timeout_s)
    memo.controller = Controller(
        memo.kube,
        memo.gateway,
        profile_namespace=ours.pod_namespace,
        baseline_iterations=ours.baseline_iterations,
        measure_iterations=ours.measure_iterations,
        max_window_s=ours.max_window_s,
        max_plan_instructions=ours.max_plan_instructions,
        plan=functools.partial(
            plan_in_subprocess,
            memory_mib=ours.planner_memory_mib,
            timeout_s=ours.planner_timeout_s,
        ),
        emit=_emit,
    )


async def close(*, memo: OperatorMemo, **_: Any) -> None:
    if memo.gateway is not None:
        await memo.gateway.close()
    if memo.kube is not None:
        await memo.kube.close()


def job_pods(
    *,
    namespace: str | None,
    name: str,
    uid: str,
    labels: Mapping[str, str],
    spec: Mapping[str, Any],
    status: Mapping[str, Any],
    meta: Mapping[str, Any],
    memo: OperatorMemo,
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
        gpu_uuids=simulated_gpus(status) if memo.settings.simulated_gpu_assignment else None,
    )
    return {(namespace or "", k, v): record for k, v in labels.items()}


def sidecars(
    *,
    namespace: str | None,
    name: str,
    spec: Mapping[str, Any],
    status: Mapping[str, Any],
    meta: Mapping[str, Any],
    memo: OperatorMemo,
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
        own_namespace=memo.settings.pod_namespace,
        daemonset=memo.settings.sidecar_daemonset,
        port=memo.settings.sidecar_port,
    )
    return None if found is None else {found[0]: found[1]}


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


def _addresses(index: kopf.Index[str, SidecarPod], memo: OperatorMemo) -> dict[str, str]:
    addresses, ignored = choose_sidecars(index.items(), memo.settings.sidecar_daemonset)
    for line in ignored:
        if line not in memo.ignored_sidecars:
            log.warning("%s", line)
    memo.ignored_sidecars.clear()  # in place: every resource's copy of the memo shares it
    memo.ignored_sidecars.update(ignored)
    return addresses


async def reconcile(
    *,
    body: kopf.Body,
    namespace: str | None,
    name: str,
    stopped: kopf.DaemonStopped,
    memo: OperatorMemo,
    **kwargs: Any,
) -> None:
    job_pods: kopf.Index[Any, PodRecord] = kwargs["job_pods"]
    sidecars: kopf.Index[str, SidecarPod] = kwargs["sidecars"]
    policies: kopf.Index[str, PolicyRecord] = kwargs["policies"]
    controller = memo.ready()
    namespace = namespace or ""
    await controller.run_policy(
        body,
        pods=lambda: _selected(job_pods, namespace, body.get("spec")),
        sidecars=lambda: _addresses(sidecars, memo),
        others=lambda: list(policies.get(namespace, ())),
        stopped=lambda: bool(stopped),
        tick_s=memo.settings.tick_s,
    )


def spec_changed(*, namespace: str | None, name: str, memo: OperatorMemo, **_: Any) -> None:
    memo.ready().wake(namespace or "", name)


def wake_on_pod(
    *, namespace: str | None, labels: Mapping[str, str], memo: OperatorMemo, **kwargs: Any
) -> None:
    """A job pod started, moved or finished: its policy reacts now, not at its next tick."""
    policies: kopf.Index[str, PolicyRecord] = kwargs["policies"]
    if memo.controller is None or namespace is None:
        return
    for policy in policies.get(namespace, ()):
        if policy.selects(labels):
            memo.controller.wake(namespace, policy.name)


async def cleanup(
    *,
    namespace: str | None,
    name: str,
    logger: kopf.Logger,
    memo: OperatorMemo,
    **kwargs: Any,
) -> None:
    """The finalizer: the controller has the sidecars that used the policy forget it."""
    sidecars: kopf.Index[str, SidecarPod] = kwargs["sidecars"]
    left = await memo.ready().forget_policy(
        namespace or "", name, _addresses(sidecars, memo), attempts=memo.settings.cleanup_attempts
    )
    if left:
        logger.warning(
            "could not reach sidecar(s) %s; their own timeout resets the clocks on restart",
            ", ".join(left),
        )
