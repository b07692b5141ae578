"""Job announcements from the operator: which pods belong to a job and its token's hash."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response, status

from perseus_sidecar.api import JobAnnouncement, JobOut
from perseus_sidecar.deps import JobName, Namespace, NodeDep, require_operator
from perseus_sidecar.job import Job

router = APIRouter(tags=["jobs"], dependencies=[Depends(require_operator)])


def _out(job: Job) -> JobOut:
    return JobOut(
        namespace=job.namespace,
        name=job.name,
        pods=list(job.pods.values()),
        ranks=sorted(job.ranks),
        schedule_entries=len(job.schedule),
        profiling=job.profiling is not None,
    )


@router.put("/jobs/{namespace}/{name}", responses={201: {"model": JobOut}})
async def put_job(
    namespace: Namespace, name: JobName, body: JobAnnouncement, node: NodeDep, response: Response
) -> JobOut:
    job, created = node.announce(namespace, name, body)
    response.status_code = status.HTTP_201_CREATED if created else status.HTTP_200_OK
    return _out(job)


@router.get("/jobs/{namespace}/{name}")
async def get_job(namespace: Namespace, name: JobName, node: NodeDep) -> JobOut:
    return _out(node.job(namespace, name))


@router.get("/jobs")
async def list_jobs(node: NodeDep) -> list[JobOut]:
    return [_out(job) for job in node.jobs.values()]


@router.delete("/jobs/{namespace}/{name}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_job(namespace: Namespace, name: JobName, node: NodeDep) -> None:
    """Forget the job: its ranks, schedule and profiling; reset the clocks it had locked."""
    node.remove_job(namespace, name)
