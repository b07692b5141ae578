"""Timings of a job's ranks on this node over a recent window (operator token)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query

from perseus_sidecar.api import TimingsOut
from perseus_sidecar.deps import JobName, Namespace, NodeDep, require_operator

router = APIRouter(tags=["timings"], dependencies=[Depends(require_operator)])


@router.get("/jobs/{namespace}/{name}/timings")
async def get_timings(
    namespace: Namespace,
    name: JobName,
    node: NodeDep,
    window_s: Annotated[float, Query(gt=0, le=86_400, allow_inf_nan=False)] = 60.0,
) -> TimingsOut:
    return await node.timings(namespace, name, window_s)
