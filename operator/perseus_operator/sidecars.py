"""The operator's view of the node sidecars: one snapshot per node per reconcile, and the
control calls (announce, schedule, remove, forget, profiling) with the operator's token.

Every call goes through the sidecar's own client (`perseus_sidecar.client.SidecarClient`, one per
node address, pooled here) and its models, so a contract change breaks type checks here rather
than at run time. A sidecar that cannot be reached or answers 5xx raises
:class:`SidecarUnreachableError` with a one-line reason; a 4xx (a bug on our side) raises
:class:`SidecarRejectedError` with the sidecar's message.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx
from pydantic import ValidationError

from perseus_operator import reconcile as rc
from perseus_sidecar.api import (
    JobAnnouncement,
    PodAnnouncement,
    ProfilingRequest,
    ProfilingStatus,
    ScheduleEntry,
    ScheduleIn,
    TimingsOut,
)
from perseus_sidecar.client import SidecarClient, SidecarError, SidecarUnavailableError

__all__ = ["NodeSnapshot", "SidecarGateway", "SidecarRejectedError", "SidecarUnreachableError"]


class SidecarUnreachableError(Exception):
    """The sidecar did not answer (connection refused, timeout, 5xx)."""


class SidecarRejectedError(SidecarUnreachableError):
    """The sidecar refused a request (4xx): the message is its own."""


@dataclass(frozen=True)
class NodeSnapshot:
    address: str
    gpu_model: tuple[str, frozenset[int]]
    """(GPU name, SM clocks every usable GPU of the node supports)."""
    announced_pods: frozenset[str]
    entries: frozenset[rc.Entry]
    timings: TimingsOut | None


class SidecarGateway:
    """One `SidecarClient` per sidecar address, the operator's token, and what it last wrote."""

    def __init__(
        self,
        token: str,
        timeout_s: float = 2.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._token = token
        self._timeout_s = timeout_s
        self._transport = transport
        self._clients: dict[str, SidecarClient] = {}
        self._gpus: dict[str, tuple[str, frozenset[int]]] = {}
        self._applied: dict[tuple[str, str, str], frozenset[rc.Entry]] = {}

    async def close(self) -> None:
        for c in self._clients.values():
            await c.aclose()
        self._clients.clear()

    def _client(self, address: str) -> SidecarClient:
        found = self._clients.get(address)
        if found is None:
            found = SidecarClient(
                f"http://{address}",
                self._token,
                timeout_s=self._timeout_s,
                transport=self._transport,
            )
            self._clients[address] = found
        return found

    @asynccontextmanager
    async def _errors(self, address: str) -> AsyncIterator[None]:
        """The sidecar client's errors as this module's two kinds, one line each."""
        try:
            yield
        except SidecarUnavailableError as exc:
            raise SidecarUnreachableError(f"{address}: {exc.message}") from None
        except SidecarError as exc:
            if exc.status >= 500 or exc.status == 0:
                raise SidecarUnreachableError(f"{address}: HTTP {exc.status}") from None
            raise SidecarRejectedError(f"{address}: HTTP {exc.status}: {exc.message}") from None
        except (httpx.HTTPError, ValidationError) as exc:
            raise SidecarUnreachableError(f"{address}: {type(exc).__name__}") from None

    async def gpu_model(self, address: str) -> tuple[str, frozenset[int]]:
        cached = self._gpus.get(address)
        if cached is not None:
            return cached
        async with self._errors(address):
            gpus = await self._client(address).gpus()
        usable = [g for g in gpus.gpus if g.usable]
        if not usable:
            raise SidecarUnreachableError(f"{address}: no usable GPU")
        clocks = frozenset.intersection(*(frozenset(g.supported_sm_clocks_mhz) for g in usable))
        result = (usable[0].name, clocks)
        self._gpus[address] = result
        return result

    async def snapshot(
        self, address: str, namespace: str, name: str, window_s: float
    ) -> NodeSnapshot:
        model = await self.gpu_model(address)
        client = self._client(address)
        async with self._errors(address):
            job = await client.get_job(namespace, name)
            if job is None:
                return NodeSnapshot(address, model, frozenset(), frozenset(), None)
            try:
                timings: TimingsOut | None = await client.timings(
                    namespace, name, round(window_s, 3)
                )
            except SidecarError as exc:
                if exc.status != 404:  # the job went between the two calls
                    raise
                timings = None
            key = (address, namespace, name)
            entries = self._applied.get(key)
            if entries is None or len(entries) != job.schedule_entries:
                # Only the operator writes schedules: re-read one only when its size says it
                # changed (a restarted sidecar), so a steady poll is two requests.
                schedule = await client.get_schedule(namespace, name)
                entries = frozenset(
                    rc.Entry(e.data_rank, e.pipeline_rank, tuple(e.order), tuple(e.frequencies_mhz))
                    for e in (schedule.entries if schedule else [])
                )
                self._applied[key] = entries
        announced = frozenset(rc.pod_identity(p.name, p.uid, p.ip) for p in job.pods)
        return NodeSnapshot(address, model, announced, entries, timings)

    async def announce(
        self,
        address: str,
        namespace: str,
        name: str,
        token_sha256: str,
        pods: Iterable[rc.PodView],
        *,
        microbatches: int | None = None,
    ) -> None:
        body = JobAnnouncement(
            token_sha256=token_sha256,
            pods=[
                PodAnnouncement(
                    namespace=namespace,
                    name=p.name,
                    uid=p.uid,
                    ip=p.pod_ip or "",
                    host_network=p.host_network,
                    gpu_uuids=list(p.gpu_uuids) if p.gpu_uuids is not None else None,
                )
                for p in pods
            ],
            microbatches=microbatches,
        )
        async with self._errors(address):
            await self._client(address).announce_job(namespace, name, body)

    async def apply(
        self, address: str, namespace: str, name: str, entries: Iterable[rc.Entry]
    ) -> None:
        entries = tuple(entries)
        body = ScheduleIn(
            entries=[
                ScheduleEntry(
                    data_rank=e.data_rank,
                    pipeline_rank=e.pipeline_rank,
                    order=list(e.order),
                    frequencies_mhz=list(e.frequencies_mhz),
                )
                for e in entries
            ]
        )
        async with self._errors(address):
            await self._client(address).put_schedule(namespace, name, body)
        self._applied[(address, namespace, name)] = frozenset(entries)

    async def remove(self, address: str, namespace: str, name: str) -> None:
        """Stop steering the job's clocks here (the sidecar resets what it locked)."""
        self._applied.pop((address, namespace, name), None)
        async with self._errors(address):
            await self._client(address).delete_schedule(namespace, name)

    async def forget(self, address: str, namespace: str, name: str) -> None:
        """Forget the job entirely: ranks, schedule, profiling; clocks reset."""
        self._applied.pop((address, namespace, name), None)
        async with self._errors(address):
            await self._client(address).delete_job(namespace, name)

    async def start_profiling(
        self, address: str, namespace: str, name: str, request: ProfilingRequest
    ) -> None:
        async with self._errors(address):
            await self._client(address).start_profiling(namespace, name, request)

    async def profiling(self, address: str, namespace: str, name: str) -> ProfilingStatus | None:
        async with self._errors(address):
            return await self._client(address).get_profiling(namespace, name)
