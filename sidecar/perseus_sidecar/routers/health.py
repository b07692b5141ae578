"""Liveness and readiness (no authentication: kubelet probes)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from perseus_sidecar.api import HealthOut, ReadyOut
from perseus_sidecar.deps import NodeDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> HealthOut:
    return HealthOut()


@router.get("/readyz", response_model=ReadyOut, responses={503: {"model": ReadyOut}})
async def readyz(node: NodeDep) -> JSONResponse:
    if node.gpu_error is not None or not node.gpus:
        node.discover()  # the driver may have come back, or GPUs become visible
    usable = sum(1 for g in node.gpus.values() if g.usable)
    if node.gpu_error is not None:
        out = ReadyOut(ready=False, reason=f"GPU backend failed: {node.gpu_error}")
    elif not node.gpus:
        out = ReadyOut(
            ready=False, reason="no GPU visible to the sidecar (NVIDIA_VISIBLE_DEVICES?)"
        )
    elif usable == 0:
        out = ReadyOut(ready=False, reason="no visible GPU can be managed (MIG/MPS/time-sliced)")
    else:
        out = ReadyOut(ready=True, usable_gpus=usable)
    return JSONResponse(out.model_dump(), status_code=200 if out.ready else 503)
