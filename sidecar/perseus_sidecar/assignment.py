"""Which GPU a pod may register a rank on: the one the kubelet (or, without its socket, the
operator's announcement) gave the pod, and not one announced for another pod."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from perseus_sidecar.api import PodAnnouncement, RankRegistration
from perseus_sidecar.errors import ConflictError, ForbiddenError
from perseus_sidecar.gpu.base import GpuInfo

__all__ = ["check_assignment", "kubelet_uuids"]


def kubelet_uuids(gpus: Iterable[GpuInfo], device_ids: frozenset[str]) -> frozenset[str]:
    """Device plugin IDs as GPU UUIDs: a time-slicing replica `<uuid>::<n>` is its GPU, and
    with the plugin's index ID strategy an ID is the GPU's index."""
    by_index = {str(g.index): g.uuid for g in gpus}
    out = set()
    for raw in device_ids:
        device = raw.split("::", 1)[0]
        out.add(by_index.get(device, device))
    return frozenset(out)


def check_assignment(
    body: RankRegistration,
    pod: PodAnnouncement,
    kubelet: Mapping[tuple[str, str], frozenset[str]] | None,
    gpus: Iterable[GpuInfo],
    announced: Iterable[PodAnnouncement],
) -> None:
    """The registered GPU must be one the pod was given: by the kubelet where it answers,
    else by the operator's announcement; a GPU announced for another pod is refused."""
    where = f"pod {body.namespace}/{body.pod}"
    if kubelet is not None:
        devices = kubelet.get((body.namespace, body.pod), frozenset())
        assigned = kubelet_uuids(gpus, devices)
        source = "the kubelet"
    elif pod.gpu_uuids is not None:
        assigned = frozenset(pod.gpu_uuids)
        source = "the operator's announcement"
    else:
        raise ForbiddenError(
            f"no record of the GPUs {where} was given: this node has no kubelet "
            "pod-resources socket and the operator announced none"
        )
    if body.gpu_uuid not in assigned:
        given = ", ".join(sorted(assigned)) or "none"
        raise ForbiddenError(
            f"GPU {body.gpu_uuid} is not assigned to {where} (per {source}: {given})"
        )
    for other in announced:
        if (other.namespace, other.name) == (body.namespace, body.pod):
            continue
        if other.gpu_uuids is not None and body.gpu_uuid in other.gpu_uuids:
            raise ConflictError(
                f"GPU {body.gpu_uuid} is announced for pod {other.namespace}/{other.name}"
            )
