"""Per-job frequency schedules from the operator, validated whole before any rank sees them."""

from __future__ import annotations

from fastapi import APIRouter, Depends, status

from perseus_sidecar.api import ScheduleIn, ScheduleOut
from perseus_sidecar.deps import JobName, Namespace, NodeDep, require_operator
from perseus_sidecar.errors import NotFoundError
from perseus_sidecar.job import Job

router = APIRouter(tags=["schedules"], dependencies=[Depends(require_operator)])


def _out(job: Job) -> ScheduleOut:
    return ScheduleOut(
        namespace=job.namespace,
        name=job.name,
        entries=list(job.schedule.values()),
        active_ranks=sorted(r.rank_id for r in job.ranks.values() if r.forward_mhz is not None),
    )


@router.put("/jobs/{namespace}/{name}/schedule")
async def put_schedule(
    namespace: Namespace, name: JobName, body: ScheduleIn, node: NodeDep
) -> ScheduleOut:
    return _out(node.put_schedule(namespace, name, body))


@router.get("/jobs/{namespace}/{name}/schedule")
async def get_schedule(namespace: Namespace, name: JobName, node: NodeDep) -> ScheduleOut:
    job = node.job(namespace, name)
    if not job.schedule:
        raise NotFoundError(f"job {namespace}/{name} has no schedule on this node")
    return _out(job)


@router.delete("/jobs/{namespace}/{name}/schedule", status_code=status.HTTP_204_NO_CONTENT)
async def delete_schedule(namespace: Namespace, name: JobName, node: NodeDep) -> None:
    """Stop steering the job's clocks and reset every GPU it had locked."""
    node.delete_schedule(namespace, name)
