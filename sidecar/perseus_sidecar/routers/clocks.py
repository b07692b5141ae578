"""Emergency stop (operator token): drop every schedule and profiling session on this node and
reset every GPU clock this sidecar locked."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from perseus_sidecar.api import ClockResetResponse
from perseus_sidecar.deps import NodeDep, require_operator

router = APIRouter(tags=["clocks"], dependencies=[Depends(require_operator)])


@router.post("/clocks/reset")
async def reset_clocks(node: NodeDep) -> ClockResetResponse:
    reset, removed = node.reset_all()
    return ClockResetResponse(reset_gpus=reset, schedules_removed=removed)
