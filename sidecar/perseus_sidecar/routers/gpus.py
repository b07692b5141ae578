"""GPU inventory (operator token)."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from perseus_sidecar.api import GpuOut, GpusOut
from perseus_sidecar.deps import NodeDep, require_operator
from perseus_sidecar.gpu.base import GpuError

router = APIRouter(tags=["gpus"], dependencies=[Depends(require_operator)])


@router.get("/gpus")
async def list_gpus(node: NodeDep) -> GpusOut:
    node.discover()
    if node.gpu_error is not None:
        raise GpuError(f"cannot list GPUs: {node.gpu_error}")
    return GpusOut(
        node_name=node.node_name,
        gpus=[
            GpuOut(
                index=g.index,
                uuid=g.uuid,
                name=g.name,
                supported_sm_clocks_mhz=list(g.supported_sm_clocks_mhz),
                max_sm_clock_mhz=g.max_sm_clock_mhz,
                usable=g.usable,
                reason=g.reason,
                locked_by_sidecar=g.uuid in node.clocks.lock_state,
                applied_sm_clock_mhz=node.clocks.applied_mhz(g.uuid),
            )
            for g in sorted(node.gpus.values(), key=lambda g: g.index)
        ],
    )
