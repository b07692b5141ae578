"""HTTP clients of the sidecar API: `SidecarClient` (async, the operator's, one per node, every
control endpoint) and `RankClient` (sync, rank registration and HTTP events, for tests, benches
and clients that cannot hold the TCP event stream). Errors are `SidecarError` with the status and
the server's one-line message; an unreachable sidecar is `SidecarUnavailableError`."""

from __future__ import annotations

import hashlib
from types import TracebackType
from typing import Any, Self, TypeVar

import httpx
from pydantic import BaseModel, TypeAdapter

from perseus_sidecar.api import (
    ClockResetResponse,
    EventIn,
    EventsAccepted,
    EventsIn,
    GpusOut,
    HealthOut,
    JobAnnouncement,
    JobOut,
    ProfilingRequest,
    ProfilingStatus,
    RankRegistered,
    RankRegistration,
    ReadyOut,
    ScheduleIn,
    ScheduleOut,
    TimingsOut,
)

__all__ = ["RankClient", "SidecarClient", "SidecarError", "SidecarUnavailableError", "token_sha256"]

M = TypeVar("M", bound=BaseModel)
_JOBS = TypeAdapter(list[JobOut])


def token_sha256(token: str) -> str:
    """What a job announcement carries instead of the job token itself."""
    return hashlib.sha256(token.encode()).hexdigest()


class SidecarError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"sidecar answered {status}: {message}" if status else message)
        self.status = status
        self.message = message


class SidecarUnavailableError(SidecarError):
    """The sidecar could not be reached (connection refused, timeout)."""


def _raise_for(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        body = response.json()
        message = body.get("message") or body.get("detail")
        if not isinstance(message, str):
            message = str(message)
    except (ValueError, AttributeError):
        message = response.text[:200] or response.reason_phrase
    raise SidecarError(response.status_code, message)


class SidecarClient:
    """The operator's client for one node's sidecar (operator bearer token)."""

    def __init__(
        self,
        base_url: str,
        operator_token: str,
        *,
        timeout_s: float = 5.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._http = httpx.AsyncClient(
            base_url=base_url,
            headers={"Authorization": f"Bearer {operator_token}"},
            timeout=timeout_s,
            transport=transport,
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(
        self, method: str, path: str, *, body: BaseModel | None = None, **kwargs: Any
    ) -> httpx.Response:
        if body is not None:
            kwargs["content"] = body.model_dump_json()
            kwargs["headers"] = {"Content-Type": "application/json"}
        try:
            response = await self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise SidecarUnavailableError(
                0, f"sidecar {self._http.base_url} unreachable: {exc}"
            ) from exc
        _raise_for(response)
        return response

    async def _model(self, model: type[M], method: str, path: str, **kwargs: Any) -> M:
        return model.model_validate_json((await self._request(method, path, **kwargs)).content)

    async def _optional(self, model: type[M], path: str) -> M | None:
        try:
            return await self._model(model, "GET", path)
        except SidecarError as exc:
            if exc.status == 404:
                return None
            raise

    async def _delete(self, path: str, missing_ok: bool) -> None:
        try:
            await self._request("DELETE", path)
        except SidecarError as exc:
            if not (missing_ok and exc.status == 404):
                raise

    # health and inventory

    async def health(self) -> HealthOut:
        return await self._model(HealthOut, "GET", "/v1/healthz")

    async def ready(self) -> ReadyOut:
        """Readiness, also when not ready (503 carries the reason)."""
        try:
            response = await self._http.get("/v1/readyz")
        except httpx.TransportError as exc:
            raise SidecarUnavailableError(
                0, f"sidecar {self._http.base_url} unreachable: {exc}"
            ) from exc
        if response.status_code not in (200, 503):
            _raise_for(response)
        return ReadyOut.model_validate_json(response.content)

    async def gpus(self) -> GpusOut:
        return await self._model(GpusOut, "GET", "/v1/gpus")

    # jobs

    async def announce_job(self, namespace: str, name: str, job: JobAnnouncement) -> JobOut:
        return await self._model(JobOut, "PUT", f"/v1/jobs/{namespace}/{name}", body=job)

    async def get_job(self, namespace: str, name: str) -> JobOut | None:
        return await self._optional(JobOut, f"/v1/jobs/{namespace}/{name}")

    async def list_jobs(self) -> list[JobOut]:
        return _JOBS.validate_json((await self._request("GET", "/v1/jobs")).content)

    async def delete_job(self, namespace: str, name: str, *, missing_ok: bool = True) -> None:
        await self._delete(f"/v1/jobs/{namespace}/{name}", missing_ok)

    # schedules

    async def put_schedule(self, namespace: str, name: str, schedule: ScheduleIn) -> ScheduleOut:
        path = f"/v1/jobs/{namespace}/{name}/schedule"
        return await self._model(ScheduleOut, "PUT", path, body=schedule)

    async def get_schedule(self, namespace: str, name: str) -> ScheduleOut | None:
        return await self._optional(ScheduleOut, f"/v1/jobs/{namespace}/{name}/schedule")

    async def delete_schedule(self, namespace: str, name: str, *, missing_ok: bool = True) -> None:
        await self._delete(f"/v1/jobs/{namespace}/{name}/schedule", missing_ok)

    # profiling

    async def start_profiling(
        self, namespace: str, name: str, request: ProfilingRequest
    ) -> ProfilingStatus:
        path = f"/v1/jobs/{namespace}/{name}/profiling"
        return await self._model(ProfilingStatus, "POST", path, body=request)

    async def get_profiling(self, namespace: str, name: str) -> ProfilingStatus | None:
        return await self._optional(ProfilingStatus, f"/v1/jobs/{namespace}/{name}/profiling")

    async def cancel_profiling(self, namespace: str, name: str) -> ProfilingStatus | None:
        try:
            return await self._model(
                ProfilingStatus, "DELETE", f"/v1/jobs/{namespace}/{name}/profiling"
            )
        except SidecarError as exc:
            if exc.status == 404:
                return None
            raise

    # timings and reset

    async def timings(self, namespace: str, name: str, window_s: float = 60.0) -> TimingsOut:
        path = f"/v1/jobs/{namespace}/{name}/timings"
        return await self._model(TimingsOut, "GET", path, params={"window_s": window_s})

    async def reset_clocks(self) -> ClockResetResponse:
        return await self._model(ClockResetResponse, "POST", "/v1/clocks/reset")


class RankClient:
    """Synchronous rank-side calls with a job token: registration and HTTP events. `http` reuses
    an existing client (e.g. a TestClient); it is then not closed here."""

    def __init__(
        self,
        base_url: str,
        job_token: str,
        *,
        timeout_s: float = 5.0,
        http: httpx.Client | None = None,
    ) -> None:
        self._own = http is None
        self._http = http if http is not None else httpx.Client(timeout=timeout_s)
        self._base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {job_token}", "Content-Type": "application/json"}

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._own:
            self._http.close()

    def _post(self, path: str, content: str) -> httpx.Response:
        try:
            response = self._http.post(
                self._base_url + path, content=content, headers=self._headers
            )
        except httpx.TransportError as exc:
            raise SidecarUnavailableError(
                0, f"sidecar {self._base_url} unreachable: {exc}"
            ) from exc
        _raise_for(response)
        return response

    def register(self, registration: RankRegistration) -> RankRegistered:
        response = self._post("/v1/ranks", registration.model_dump_json())
        return RankRegistered.model_validate_json(response.content)

    def post_events(self, rank_id: str, events: list[EventIn]) -> EventsAccepted:
        body = EventsIn(events=events).model_dump_json()
        return EventsAccepted.model_validate_json(
            self._post(f"/v1/ranks/{rank_id}/events", body).content
        )
