"""App factory and lifespan. Start: read the GPU inventory, reset clocks a killed predecessor
left locked, open the event transport, start the watchdog. Stop (SIGTERM/SIGINT through uvicorn,
or a test's TestClient exit): close the transport and reset every clock this sidecar locked."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from perseus_sidecar.api import ErrorOut
from perseus_sidecar.errors import (
    AuthError,
    ConflictError,
    ForbiddenError,
    InvalidError,
    NodeError,
    NotFoundError,
    UnavailableError,
)
from perseus_sidecar.gpu.base import (
    GpuBackend,
    GpuError,
    GpuLostError,
    GpuNotFoundError,
    GpuNotSupportedError,
    GpuPermissionError,
)
from perseus_sidecar.guard import GuardMiddleware
from perseus_sidecar.httpguard import accept_backlog
from perseus_sidecar.lockstate import LockState, LockStateError
from perseus_sidecar.node import Node
from perseus_sidecar.routers import clocks, gpus, health, jobs, profiling, ranks, schedules, timings
from perseus_sidecar.settings import Settings
from perseus_sidecar.transport import EventLimits, start_event_server
from perseus_sidecar.validation import clean_message, error_line

__all__ = ["SetupError", "build_backend", "create_app", "read_operator_token"]

log = logging.getLogger(__name__)


class SetupError(RuntimeError):
    """The sidecar cannot start with these settings; the message is one line."""


def read_operator_token(settings: Settings) -> str:
    if settings.token_file is not None:
        try:
            token = settings.token_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise SetupError(f"cannot read token file {settings.token_file}: {exc}") from None
    elif settings.operator_token is not None:
        token = settings.operator_token.strip()
    else:
        raise SetupError("no operator token: pass --token-file (or PERSEUS_SIDECAR_TOKEN_FILE)")
    if len(token) < 16 or any(c.isspace() for c in token):
        raise SetupError("the operator token must be at least 16 characters with no whitespace")
    return token


TOKEN_POLL_S = 5.0


async def _watch_token_file(node: Node, settings: Settings) -> None:
    """Pick up a rotated operator token: a mounted Secret's file changes in place. A file that
    turns unreadable or invalid keeps the previous token (and says so in the log)."""
    path = settings.token_file
    if path is None:
        return
    last: tuple[int, int] | None = None
    while True:
        with contextlib.suppress(OSError):
            st = path.stat()
            key = (st.st_ino, st.st_mtime_ns)
            if last is not None and key != last:
                try:
                    node.tokens.set_operator(read_operator_token(settings))
                    log.info("operator token reloaded", extra={"file": str(path)})
                except SetupError as exc:
                    log.error("keeping the previous operator token", extra={"error": str(exc)})
            last = key
        await asyncio.sleep(TOKEN_POLL_S)


def build_backend(settings: Settings) -> GpuBackend:
    if settings.gpu_backend == "nvml":
        from perseus_sidecar.gpu.nvml import NvmlBackend

        return NvmlBackend(time_sliced=settings.time_sliced)
    from perseus_profiles import EXAMPLES, ProfileError, example, read_profile
    from perseus_sidecar.gpu.simulated import SimulatedBackend

    try:
        if settings.example is not None:
            ex = example(settings.example)
            profile = ex.load()
            blocking_w = ex.blocking_power_w
        else:
            assert settings.profile is not None
            profile = read_profile(settings.profile)
            blocking_w = EXAMPLES["gpt3-175b-a100"].blocking_power_w
    except (ProfileError, OSError) as exc:
        raise SetupError(f"cannot load the simulated GPUs' profile: {exc}") from None
    return SimulatedBackend(
        profile,
        settings.gpus,
        settings.state_dir,
        node_name=settings.node_name,
        time_scale=settings.time_scale,
        energy_update_interval_s=settings.sim_energy_update_s,
        blocking_power_w=settings.sim_blocking_power_w or blocking_w,
        perturbation=settings.sim_perturbation,
        seed=settings.sim_seed,
    )


def create_app(settings: Settings, backend: GpuBackend | None = None) -> FastAPI:
    """The sidecar app; `backend` swaps in a GPU backend (tests), else settings choose one."""
    try:
        lock_state = LockState(settings.state_dir)
    except LockStateError as exc:
        raise SetupError(str(exc)) from None
    node = Node(
        backend=backend if backend is not None else build_backend(settings),
        lock_state=lock_state,
        operator_token=read_operator_token(settings),
        node_name=settings.node_name,
        time_scale=settings.time_scale,
        rank_timeout_s=settings.rank_timeout_s,
        energy_poll_s=settings.energy_poll_s,
        timings_history=settings.timings_history,
        event_port=settings.event_port,
        pod_resources_socket=settings.pod_resources_socket,
        max_microbatches=settings.max_microbatches,
        metrics_tenant_labels=settings.metrics_tenant_labels,
    )
    event_limits = EventLimits(
        handshake_timeout_s=settings.http_header_timeout_s,
        idle_timeout_s=settings.event_idle_timeout_s,
        max_connections=settings.event_max_connections,
        max_per_ip=settings.event_max_connections_per_ip,
        max_per_rank=settings.event_max_connections_per_rank,
        backlog=accept_backlog(settings),
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        node.discover()
        node.recover()
        server = await start_event_server(node, settings.host, settings.event_port, event_limits)
        node.start_background()
        watcher = asyncio.create_task(_watch_token_file(node, settings), name="perseus-token")
        log.info("sidecar ready", extra={"node": node.node_name, "gpus": len(node.gpus)})
        try:
            yield
        finally:
            watcher.cancel()
            server.close()
            reset = await node.shutdown("shutdown")
            log.info("sidecar stopped; clocks reset", extra={"gpus": reset})
            node.backend.close()

    app = FastAPI(
        title="Perseus sidecar",
        version="1",
        description="Per-node agent: locks GPU clocks per instruction, measures energy, "
        "reports timings.",
        lifespan=lifespan,
    )
    app.state.node = node
    app.add_middleware(GuardMiddleware, node=node, max_body_bytes=settings.max_body_bytes)
    errors: dict[int | str, dict[str, Any]] = {
        code: {"model": ErrorOut, "description": text}
        for code, text in (
            (401, "Missing or wrong bearer token"),
            (403, "Request not from the announced pod's IP"),
            (404, "No such job, rank, schedule or session"),
            (409, "Conflicts with the current state"),
            (413, "Request body too large"),
            (503, "GPU backend, state file or kubelet failure"),
        )
    }
    for module in (health, gpus, jobs, ranks, schedules, profiling, timings, clocks):
        app.include_router(module.router, prefix="/v1", responses=errors)
    # Probe paths at the root too, where kubelet probes conventionally look.
    app.include_router(health.router, include_in_schema=False)
    _add_error_handlers(app)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(node.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


_STATUS: list[tuple[type[Exception], int]] = [
    (ForbiddenError, 403),
    (AuthError, 401),
    (NotFoundError, 404),
    (ConflictError, 409),
    (InvalidError, 422),
    (UnavailableError, 503),
    (GpuNotFoundError, 404),
    (GpuPermissionError, 503),
    (GpuNotSupportedError, 422),
    (GpuLostError, 503),
    (GpuError, 503),
    (LockStateError, 503),
]


def _add_error_handlers(app: FastAPI) -> None:
    async def node_error(_: Request, exc: Exception) -> JSONResponse:
        code = next(c for t, c in _STATUS if isinstance(exc, t))
        if code == 422:  # the same shape as a validation error
            detail = [{"loc": ["body"], "msg": str(exc), "type": "value_error"}]
            return JSONResponse({"detail": detail, "message": str(exc)}, status_code=422)
        headers = {"WWW-Authenticate": "Bearer"} if code == 401 else None
        return JSONResponse({"detail": str(exc)}, status_code=code, headers=headers)

    async def validation_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = [
            {
                "loc": list(e.get("loc", ())),
                "msg": clean_message(str(e.get("msg", "invalid"))),
                "type": str(e.get("type", "")),
            }
            for e in exc.errors()
        ]
        message = "; ".join(error_line(e) for e in errors)
        return JSONResponse({"detail": errors, "message": message}, status_code=422)

    for exc_type in (NodeError, GpuError, LockStateError):
        app.add_exception_handler(exc_type, node_error)
    app.add_exception_handler(RequestValidationError, validation_error)
