"""Which pod is a node's sidecar: the operator sends its own token to that address, so only a pod
of the operator's namespace owned by the chart's DaemonSet qualifies, and the port comes from
the operator's settings (never from the pod: whoever can label a pod could otherwise point the
operator, token and all, at a listener of their own).

Pure functions: the kopf index in `handlers.py` calls :func:`sidecar_candidate` per pod event and
:func:`choose_sidecars` when a reconcile pass needs the addresses.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["SidecarPod", "choose_sidecars", "owned_by_daemonset", "sidecar_candidate"]


@dataclass(frozen=True)
class SidecarPod:
    """A running pod of the operator's namespace carrying the sidecar labels."""

    name: str
    address: str
    """host:port, the port from the operator's settings."""
    ready: bool
    owned: bool
    """Owned by the configured sidecar DaemonSet: only such a pod is ever used."""


def owned_by_daemonset(meta: Mapping[str, Any], daemonset: str) -> bool:
    """The pod lists the DaemonSet `daemonset` (of its own namespace) among its owners."""
    for ref in meta.get("ownerReferences") or ():
        api = str(ref.get("apiVersion") or "")
        if (
            ref.get("kind") == "DaemonSet"
            and ref.get("name") == daemonset
            and api.startswith("apps/")
        ):
            return True
    return False


def _ready(status: Mapping[str, Any]) -> bool:
    return any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or ()
    )


def sidecar_candidate(
    *,
    namespace: str | None,
    name: str,
    meta: Mapping[str, Any],
    spec: Mapping[str, Any],
    status: Mapping[str, Any],
    own_namespace: str,
    daemonset: str,
    port: int,
) -> tuple[str, SidecarPod] | None:
    """(node, candidate) for a running pod with the sidecar labels in the operator's namespace;
    None for any other pod (another namespace's pod is never even a candidate)."""
    if namespace != own_namespace:
        return None
    node, host_ip = spec.get("nodeName"), status.get("hostIP")
    if not node or not host_ip or meta.get("deletionTimestamp"):
        return None
    if status.get("phase") != "Running":
        return None
    pod = SidecarPod(
        name=name,
        address=f"{host_ip}:{port}",
        ready=_ready(status),
        owned=owned_by_daemonset(meta, daemonset),
    )
    return str(node), pod


def choose_sidecars(
    candidates: Iterable[tuple[str, Iterable[SidecarPod]]], daemonset: str
) -> tuple[dict[str, str], list[str]]:
    """The address of each node's sidecar, and one line per candidate left out (to log).

    Only pods owned by the DaemonSet qualify; among several on a node (a rolling update, a
    stray copy) the Ready one wins, then the first by name, so the choice is stable."""
    addresses: dict[str, str] = {}
    ignored: list[str] = []
    for node, pods in sorted(candidates, key=lambda item: item[0]):
        ranked = sorted(pods, key=lambda p: (not p.owned, not p.ready, p.name))
        if not ranked:
            continue
        chosen = ranked[0] if ranked[0].owned else None
        if chosen is not None:
            addresses[node] = chosen.address
        for pod in ranked:
            if pod is chosen:
                continue
            if not pod.owned or chosen is None:
                why = f"not owned by DaemonSet {daemonset}"
            else:
                why = f"pod {chosen.name} is preferred" + ("" if pod.ready else "; not Ready")
            ignored.append(f"node {node}: ignoring sidecar candidate pod {pod.name} ({why})")
    return addresses, ignored
