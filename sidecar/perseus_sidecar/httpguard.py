"""Connection limits for the HTTP server, where the ASGI middleware cannot act: before a request
exists. uvicorn closes idle keep-alive connections but waits forever for a request's headers, so
a few thousand half-sent requests (no token needed) would hold every file descriptor and starve
the kubelet's probes and the ranks' registrations.

Caps applied when a connection is made come after the kernel handed it over: asyncio accepts up
to `backlog` connections in one go, and if that runs out of file descriptors it logs a traceback
for every failed accept (megabytes a second) and stops listening for a second. So the process
raises its descriptor limit to the hard limit at start (`raise_fd_limit`), and the listen
backlogs are sized so that the caps plus one full accept burst on both listeners fit in it
(`accept_backlog`).

`guarded_h11()` makes a subclass of uvicorn's h11 protocol that
- refuses (closes at once) a connection beyond a total cap or a per-address cap, and
- closes a connection whose request (headers and body) has not fully arrived within a timeout
  of the connection opening or its previous response ending.

It relies on uvicorn's `H11Protocol` attributes `conn` (the h11 state machine), `transport`,
`client`, `connections` and its `on_response_complete` hook; tests/sidecar/test_httpguard.py runs
it under the real server."""

from __future__ import annotations

import asyncio
import logging
import resource
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

if TYPE_CHECKING:
    from perseus_sidecar.metrics import Metrics
    from perseus_sidecar.settings import Settings

__all__ = ["accept_backlog", "guarded_h11", "raise_fd_limit", "uvicorn_options"]

RESERVED_FDS = 64
"""Descriptors kept for everything else: the state file, NVML, the kubelet socket, logs."""


def raise_fd_limit() -> int:
    """Raise the soft open-files limit to the hard one; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-files limit", extra={"error": str(exc)})
    return soft


def accept_backlog(settings: Settings) -> int:
    """Listen backlog for each of the two listeners: the caps plus two full accept bursts fit
    in the open-files limit (2048 at most, 16 at least)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 2048
    spare = soft - settings.http_max_connections - settings.event_max_connections - RESERVED_FDS
    return max(16, min(2048, spare // 2))


log = logging.getLogger(__name__)

_RECEIVING = (h11.IDLE, h11.SEND_BODY)
"""The client's h11 states in which its request has not fully arrived."""


def guarded_h11(
    *,
    request_timeout_s: float,
    max_connections: int,
    max_per_ip: int,
    on_refused: Callable[[], None] = lambda: None,
    on_timeout: Callable[[], None] = lambda: None,
) -> type[asyncio.Protocol]:
    """The protocol class to pass as uvicorn's `http=`; its counters are per class (per server)."""
    per_ip: Counter[str] = Counter()

    class GuardedH11Protocol(H11Protocol):
        _counted_ip: str | None = None
        _waiting_since = 0.0
        _check: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            ip = self.client[0] if self.client else ""
            if len(self.connections) > max_connections or per_ip[ip] >= max_per_ip:
                on_refused()
                transport.close()
                return
            per_ip[ip] += 1
            self._counted_ip = ip
            self._waiting_since = self.loop.time()
            self._check = self.loop.call_later(request_timeout_s, self._deadline)

        def _deadline(self) -> None:
            self._check = None
            if self.transport.is_closing():
                return
            if self.conn.their_state in _RECEIVING:
                waited_s = self.loop.time() - self._waiting_since
                if waited_s >= request_timeout_s:
                    on_timeout()
                    self.transport.close()
                    return
                delay_s = request_timeout_s - waited_s
            else:  # the app is answering: look again later
                delay_s = request_timeout_s
            self._check = self.loop.call_later(delay_s, self._deadline)

        def on_response_complete(self) -> None:
            self._waiting_since = self.loop.time()
            super().on_response_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            super().connection_lost(exc)
            if self._check is not None:
                self._check.cancel()
                self._check = None
            ip = self._counted_ip
            if ip is not None:
                self._counted_ip = None
                per_ip[ip] -= 1
                if per_ip[ip] <= 0:
                    del per_ip[ip]

    return GuardedH11Protocol


def uvicorn_options(settings: Settings, metrics: Metrics) -> dict[str, Any]:
    """uvicorn.Config keyword arguments for the sidecar's limits."""
    return {
        "http": guarded_h11(
            request_timeout_s=settings.http_header_timeout_s,
            max_connections=settings.http_max_connections,
            max_per_ip=settings.http_max_connections_per_ip,
            on_refused=metrics.connections_refused.labels(transport="http").inc,
            on_timeout=metrics.connections_timed_out.inc,
        ),
        "timeout_keep_alive": settings.http_keep_alive_s,
        "backlog": accept_backlog(settings),
    }
