"""Profiling sessions (operator token): measure each instruction at each requested clock."""

from __future__ import annotations

from fastapi import APIRouter, Depends, status

from perseus_sidecar.api import ProfilingRequest, ProfilingStatus
from perseus_sidecar.deps import JobName, Namespace, NodeDep, require_operator
from perseus_sidecar.errors import NotFoundError

router = APIRouter(tags=["profiling"], dependencies=[Depends(require_operator)])


@router.post("/jobs/{namespace}/{name}/profiling", status_code=status.HTTP_202_ACCEPTED)
async def start_profiling(
    namespace: Namespace, name: JobName, body: ProfilingRequest, node: NodeDep
) -> ProfilingStatus:
    session = node.start_profiling(namespace, name, body)
    await session.settled()
    return session.status()


@router.get("/jobs/{namespace}/{name}/profiling")
async def get_profiling(namespace: Namespace, name: JobName, node: NodeDep) -> ProfilingStatus:
    session = node.job(namespace, name).profiling
    if session is None:
        raise NotFoundError(f"job {namespace}/{name} has no profiling session")
    await session.settled()
    return session.status()


@router.delete("/jobs/{namespace}/{name}/profiling")
async def cancel_profiling(namespace: Namespace, name: JobName, node: NodeDep) -> ProfilingStatus:
    """Cancel the session (results so far are returned) and release the clocks it locked."""
    session = node.cancel_profiling(namespace, name)
    await session.settled()
    return session.status()
