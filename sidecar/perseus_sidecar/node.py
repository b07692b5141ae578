"""The sidecar's state: announced jobs, registered ranks, schedules and profiling sessions, and
the background tasks that keep clocks safe (rank timeouts) and sample energy counters.

Routers and the TCP transport call into one `Node`; every method runs on the event loop. What it
refuses is in `errors`, a job's record in `job`, the credentials it accepts in `tokens`, the
GPU-assignment rule in `assignment`, how a schedule is checked and read in `schedules`, its
scrape-time gauges in `statemetrics`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

from prometheus_client.core import Metric

from perseus_sidecar.api import (
    JobAnnouncement,
    PodAnnouncement,
    ProfilingRequest,
    RankRegistration,
    ScheduleIn,
    TimingsOut,
)
from perseus_sidecar.assignment import check_assignment
from perseus_sidecar.clocks import ClockController
from perseus_sidecar.errors import (
    AuthError,
    ConflictError,
    ForbiddenError,
    InvalidError,
    NotFoundError,
    UnavailableError,
)
from perseus_sidecar.gpu.base import GpuBackend, GpuError, GpuInfo
from perseus_sidecar.job import Job
from perseus_sidecar.lockstate import LockState
from perseus_sidecar.metrics import Metrics
from perseus_sidecar.podresources import PodResourcesError, list_pod_devices
from perseus_sidecar.profiling import ProfilingSession
from perseus_sidecar.ranks import Rank
from perseus_sidecar.schedules import check_clocks, clock_tables, holds
from perseus_sidecar.statemetrics import state_metrics
from perseus_sidecar.timings import job_timings, snapshot
from perseus_sidecar.tokens import Tokens

__all__ = ["Node"]

log = logging.getLogger(__name__)


class Node:
    def __init__(
        self,
        *,
        backend: GpuBackend,
        lock_state: LockState,
        operator_token: str,
        node_name: str,
        time_scale: float = 1.0,
        rank_timeout_s: float = 10.0,
        energy_poll_s: float = 0.002,
        timings_history: int = 2000,
        event_port: int = 8081,
        pod_resources_socket: Path | None = None,
        max_microbatches: int = 4096,
        metrics_tenant_labels: bool = False,
    ) -> None:
        self.backend = backend
        self.metrics = Metrics()
        self.clocks = ClockController(backend, lock_state, self.metrics)
        self.node_name = node_name
        self.time_scale = time_scale
        self.rank_timeout_s = rank_timeout_s
        self.energy_poll_s = energy_poll_s
        self.timings_history = timings_history
        self.event_port = event_port
        self.pod_resources_socket = pod_resources_socket
        self.max_microbatches = max_microbatches
        self.metrics_tenant_labels = metrics_tenant_labels
        self.tokens = Tokens(operator_token)
        self.gpus: dict[str, GpuInfo] = {}
        self.gpu_error: str | None = None
        self.jobs: dict[tuple[str, str], Job] = {}
        self.ranks: dict[str, Rank] = {}
        self._rank_ids: dict[tuple[str, str, int], str] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.metrics.add_state_collector(self._collect)

    # ---- lifecycle --------------------------------------------------------------------------

    def discover(self) -> None:
        """(Re)read the GPU inventory; a backend failure is kept as the readiness reason."""
        try:
            self.gpus = {g.uuid: g for g in self.backend.list_gpus()}
            self.gpu_error = None
        except GpuError as exc:
            self.gpus = {}
            self.gpu_error = str(exc)
            log.error("cannot list GPUs", extra={"error": str(exc)})

    def recover(self) -> list[str]:
        """On start: reset the GPUs a previous (killed) process recorded as locked; with no
        readable record, every locked GPU of the node."""
        unknown = self.clocks.lock_state.unknown
        if unknown is not None:
            done = self.clocks.reset_any_locked(sorted(self.gpus), "startup-unknown-owner")
            log.error(
                "lock-state record unreadable: cannot tell who locked which GPU, so every locked "
                "GPU was reset",
                extra={"error": unknown, "gpus": done},
            )
            return done
        done = self.clocks.reset_all("startup")
        if done:
            log.warning("reset clocks left locked by a previous run", extra={"gpus": done})
        return done

    def start_background(self) -> None:
        self._tasks.append(asyncio.create_task(self._watchdog(), name="perseus-watchdog"))
        self._tasks.append(asyncio.create_task(self._sampler(), name="perseus-energy-sampler"))

    async def shutdown(self, reason: str) -> list[str]:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        for rank in self.ranks.values():
            rank.listeners.clear()
        return self.clocks.reset_all(reason)

    # ---- jobs -------------------------------------------------------------------------------

    def announce(self, namespace: str, name: str, body: JobAnnouncement) -> tuple[Job, bool]:
        for pod in body.pods:
            if pod.namespace != namespace:
                raise InvalidError(
                    f"pod {pod.namespace}/{pod.name} is not in the job's namespace {namespace}"
                )
        pods = {(p.namespace, p.name): p for p in body.pods}
        key = (namespace, name)
        job = self.jobs.get(key)
        created = job is None
        microbatches = min(body.microbatches or self.max_microbatches, self.max_microbatches)
        if job is None:
            job = Job(namespace, name, body.token_sha256, pods, microbatches)
            self.jobs[key] = job
        else:
            job.microbatches = microbatches
            for rank in job.ranks.values():
                rank.microbatches = microbatches
            self.tokens.remove_job(job.token_sha256, key)
            job.token_sha256 = body.token_sha256
            job.pods = pods
            for rank in list(job.ranks.values()):
                now = pods.get((rank.namespace, rank.pod))
                if now is None:
                    self._drop_rank(rank, "pod-gone")
                elif now.gpu_uuids is not None and rank.gpu_uuid not in now.gpu_uuids:
                    self._drop_rank(rank, "gpu-unassigned")
        self.tokens.add_job(job.token_sha256, key)
        return job, created

    def job(self, namespace: str, name: str) -> Job:
        job = self.jobs.get((namespace, name))
        if job is None:
            raise NotFoundError(f"job {namespace}/{name} is not announced on this node")
        return job

    def remove_job(self, namespace: str, name: str) -> None:
        job = self.job(namespace, name)
        for rank in list(job.ranks.values()):
            self._drop_rank(rank, "job-deleted")
        self.tokens.remove_job(job.token_sha256, job.key)
        del self.jobs[job.key]

    # ---- ranks ------------------------------------------------------------------------------

    def _authorize_pod(
        self, body: RankRegistration, token: str | None, source_ip: str | None
    ) -> tuple[Job, PodAnnouncement]:
        job = self._job_of_pod(body.namespace, body.pod)
        if job is None or token is None or not job.token_ok(token):
            raise AuthError(
                f"pod {body.namespace}/{body.pod} is not an announced pod of a job with this token"
            )
        pod = job.pods[(body.namespace, body.pod)]
        if not pod.host_network and source_ip != pod.ip:
            raise ForbiddenError(
                f"requests for pod {body.namespace}/{body.pod} must come from {pod.ip}"
            )
        return job, pod

    @property
    def uses_kubelet(self) -> bool:
        """The kubelet's pod-resources socket is there: it, not the operator, says which pod
        holds which GPU."""
        path = self.pod_resources_socket
        return path is not None and path.exists()

    async def register_checked(
        self, body: RankRegistration, token: str | None, source_ip: str | None
    ) -> Rank:
        """`register`, asking the kubelet (in a worker thread, after the token and IP checks)
        which GPUs the pod holds when its socket is there."""
        self._authorize_pod(body, token, source_ip)
        kubelet: Mapping[tuple[str, str], frozenset[str]] | None = None
        if self.uses_kubelet:
            assert self.pod_resources_socket is not None
            try:
                kubelet = await asyncio.to_thread(list_pod_devices, self.pod_resources_socket)
            except PodResourcesError as exc:
                raise UnavailableError(str(exc)) from None
        return self.register(body, token, source_ip, kubelet)

    def register(
        self,
        body: RankRegistration,
        token: str | None,
        source_ip: str | None,
        kubelet: Mapping[tuple[str, str], frozenset[str]] | None = None,
    ) -> Rank:
        """Register a rank; `kubelet` is the pod-resources answer (None: trust only the
        operator's announcement of the pod's GPUs)."""
        job, pod = self._authorize_pod(body, token, source_ip)
        gpu = self.gpus.get(body.gpu_uuid)
        if gpu is None:
            raise InvalidError(f"GPU {body.gpu_uuid} is not on node {self.node_name}")
        if not gpu.usable:
            raise InvalidError(f"GPU {body.gpu_uuid} cannot be managed: {gpu.reason}")
        announced = (p for j in self.jobs.values() for p in j.pods.values())
        check_assignment(body, pod, kubelet, self.gpus.values(), announced)
        identity = (body.namespace, body.pod, body.rank)
        rank_id = self._rank_ids.get(identity)
        holder = next((r for r in self.ranks.values() if r.gpu_uuid == body.gpu_uuid), None)
        if holder is not None and holder.rank_id != rank_id:
            holder_job = self.jobs.get(holder.job_key)
            if holder_job is not None and (holder.namespace, holder.pod) in holder_job.pods:
                raise ConflictError(
                    f"GPU {body.gpu_uuid} is used by rank {holder.rank} of pod "
                    f"{holder.namespace}/{holder.pod}"
                )
            self._drop_rank(holder, "replaced")
        if rank_id is not None and rank_id in self.ranks:
            self._drop_rank(self.ranks[rank_id], "re-registered", forget=False)
        if rank_id is None:
            rank_id = secrets.token_hex(8)
            self._rank_ids[identity] = rank_id
        rank = Rank(
            rank_id=rank_id,
            job_key=job.key,
            namespace=body.namespace,
            pod=body.pod,
            rank=body.rank,
            pipeline_rank=body.pipeline_rank,
            data_rank=body.data_rank,
            tensor_rank=body.tensor_rank,
            gpu_uuid=body.gpu_uuid,
            max_mhz=gpu.max_sm_clock_mhz,
            clocks=self.clocks,
            metrics=self.metrics,
            time_scale=self.time_scale,
            history=self.timings_history,
            microbatches=job.microbatches,
        )
        self.ranks[rank_id] = rank
        job.ranks[rank_id] = rank
        self._apply_schedule_to_rank(job, rank)
        session = job.profiling
        if session is not None and not session.cancelled and not session.done:
            self._join_profiling(session, rank)
        log.info("rank registered", extra={"rank_id": rank_id, "gpu": body.gpu_uuid})
        return rank

    def authenticate_rank(self, rank_id: str, token: str, source_ip: str | None) -> Rank:
        rank = self.ranks.get(rank_id)
        job = self.jobs.get(rank.job_key) if rank is not None else None
        if rank is None or job is None or not job.token_ok(token):
            raise AuthError("unknown rank or wrong job token")
        pod = job.pods.get((rank.namespace, rank.pod))
        if pod is None:
            raise AuthError("the rank's pod is no longer announced")
        if not pod.host_network and source_ip != pod.ip:
            raise ForbiddenError(
                f"events for pod {rank.namespace}/{rank.pod} must come from {pod.ip}"
            )
        return rank

    def _job_of_pod(self, namespace: str, pod: str) -> Job | None:
        for job in self.jobs.values():
            if (namespace, pod) in job.pods:
                return job
        return None

    def _drop_rank(self, rank: Rank, reason: str, *, forget: bool = True) -> None:
        rank.set_schedule(None, None)
        rank.set_profiling(None)
        for listener in list(rank.listeners):
            listener.close(f"rank removed ({reason})")
        rank.listeners.clear()
        self._reset_gpu(rank.gpu_uuid, reason)
        self.ranks.pop(rank.rank_id, None)
        job = self.jobs.get(rank.job_key)
        if job is not None:
            job.ranks.pop(rank.rank_id, None)
        if forget:
            self._rank_ids.pop((rank.namespace, rank.pod, rank.rank), None)

    def _reset_gpu(self, uuid: str, reason: str) -> None:
        try:
            self.clocks.reset(uuid, reason)
        except (GpuError, OSError, RuntimeError) as exc:
            log.error("cannot reset GPU clocks", extra={"gpu": uuid, "error": str(exc)})

    # ---- schedules --------------------------------------------------------------------------

    def put_schedule(self, namespace: str, name: str, body: ScheduleIn) -> Job:
        """Validate everything first, then apply to every rank: never half-applied."""
        job = self.job(namespace, name)
        usable = [g for g in self.gpus.values() if g.usable]
        if not usable:
            raise InvalidError(f"node {self.node_name} has no usable GPU")
        for entry in body.entries:
            held = [self.gpus[r.gpu_uuid] for r in job.ranks.values() if holds(r, entry)]
            check_clocks(entry, held or usable)
        job.schedule = {(e.data_rank, e.pipeline_rank): e for e in body.entries}
        for rank in job.ranks.values():
            self._apply_schedule_to_rank(job, rank)
        return job

    def delete_schedule(self, namespace: str, name: str) -> None:
        job = self.job(namespace, name)
        if not job.schedule:
            raise NotFoundError(f"job {namespace}/{name} has no schedule on this node")
        job.schedule = {}
        for rank in job.ranks.values():
            self._apply_schedule_to_rank(job, rank)

    def _apply_schedule_to_rank(self, job: Job, rank: Rank) -> None:
        entry = job.schedule.get((rank.data_rank, rank.pipeline_rank))
        if entry is None or self.clocks.is_foreign(rank.gpu_uuid):
            was_controlled = rank.forward_mhz is not None
            rank.set_schedule(None, None)
            if was_controlled and rank.profiling is None:
                self._reset_gpu(rank.gpu_uuid, "schedule-deleted")
            return
        forward, backward = clock_tables(entry)
        rank.set_schedule(forward, backward, entry.chunks)

    # ---- profiling --------------------------------------------------------------------------

    def start_profiling(
        self, namespace: str, name: str, body: ProfilingRequest
    ) -> ProfilingSession:
        job = self.job(namespace, name)
        if job.profiling is not None and not job.profiling.done and not job.profiling.cancelled:
            raise ConflictError(f"job {namespace}/{name} already has a running profiling session")
        if not job.ranks:
            raise ConflictError(f"job {namespace}/{name} has no registered rank on this node")
        for rank in job.ranks.values():
            gpu = self.gpus[rank.gpu_uuid]
            unsupported = sorted(set(body.frequencies_mhz) - set(gpu.supported_sm_clocks_mhz))
            if unsupported:
                raise InvalidError(f"{unsupported} MHz not supported by GPU {gpu.uuid}")
        session = ProfilingSession(namespace, name, body)
        job.profiling = session
        for rank in job.ranks.values():
            self._join_profiling(session, rank)
        return session

    def _join_profiling(self, session: ProfilingSession, rank: Rank) -> None:
        """A re-registered rank (restarted process) carries on where its session stood."""
        rp = session.ranks.get(rank.rank_id)
        if rp is None:
            rp = session.add_rank(
                rank.rank_id, rank.gpu_uuid, rank.pipeline_rank, rank.seconds_per_ns
            )
        if not rp.done:
            rank.set_profiling(rp)

    def cancel_profiling(self, namespace: str, name: str) -> ProfilingSession:
        job = self.job(namespace, name)
        session = job.profiling
        if session is None:
            raise NotFoundError(f"job {namespace}/{name} has no profiling session")
        session.cancelled = True
        job.profiling = None
        for rank in job.ranks.values():
            if rank.profiling is not None:
                rank.set_profiling(None)
                if rank.forward_mhz is None:
                    self._reset_gpu(rank.gpu_uuid, "profiling-cancelled")
        return session

    # ---- reset ------------------------------------------------------------------------------

    def reset_all(self) -> tuple[list[str], int]:
        removed = 0
        for job in self.jobs.values():
            removed += len(job.schedule)
            job.schedule = {}
            if job.profiling is not None:
                job.profiling.cancelled = True
                job.profiling = None
            for rank in job.ranks.values():
                rank.set_schedule(None, None)
                rank.set_profiling(None)
        self.clocks.forget_foreign()
        return self.clocks.reset_all("reset-endpoint"), removed

    # ---- background tasks -------------------------------------------------------------------

    def check_timeouts(self, now_mono: float | None = None) -> list[str]:
        """Reset the clock of every controlled rank whose events stopped for the timeout."""
        now = time.monotonic() if now_mono is None else now_mono
        stale: list[str] = []
        for rank in self.ranks.values():
            if rank.stale or not rank.controlled:
                continue
            if now - rank.last_event_mono > self.rank_timeout_s:
                rank.stale = True
                stale.append(rank.rank_id)
                log.warning(
                    "rank events stopped; resetting its clock", extra={"rank_id": rank.rank_id}
                )
                self._reset_gpu(rank.gpu_uuid, "rank-timeout")
        return stale

    async def _watchdog(self) -> None:
        period_s = min(1.0, self.rank_timeout_s / 4)
        while True:
            await asyncio.sleep(period_s)
            self.check_timeouts()

    def sample_energy(self) -> None:
        for job in self.jobs.values():
            session = job.profiling
            if session is None:
                continue
            for rp in session.active():
                try:
                    rp.record_energy(self.backend.total_energy_mj(rp.gpu_uuid))
                except GpuError as exc:
                    self.metrics.gpu_errors.labels(error=type(exc).__name__).inc()

    async def _sampler(self) -> None:
        """Poll energy counters only while a profiling session runs (idle: check 10x a second)."""
        while True:
            profiling = any(job.profiling is not None for job in self.jobs.values())
            await asyncio.sleep(self.energy_poll_s if profiling else 0.1)
            self.sample_energy()

    # ---- timings ----------------------------------------------------------------------------

    async def timings(self, namespace: str, name: str, window_s: float) -> TimingsOut:
        """Copied on the loop, computed in a worker thread (see timings.py)."""
        ranks = [snapshot(r) for r in self.job(namespace, name).ranks.values()]
        return await asyncio.to_thread(job_timings, namespace, name, ranks, window_s)

    # ---- metrics ----------------------------------------------------------------------------

    def _collect(self) -> Iterator[Metric]:
        return state_metrics(
            self.backend,
            list(self.gpus),
            self.clocks,
            list(self.ranks.values()),
            tenant_labels=self.metrics_tenant_labels,  # GET /metrics has no auth: opt-in
        )
