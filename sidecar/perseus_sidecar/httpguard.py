"""Connection limits for the HTTP server, where the ASGI middleware cannot act: before a request
exists. uvicorn closes idle keep-alive connections but waits forever for a request's headers, so
a few thousand half-sent requests (no token needed) would hold every file descriptor and starve
the kubelet's probes and the ranks' registrations.

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
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

if TYPE_CHECKING:
    from perseus_sidecar.metrics import Metrics
    from perseus_sidecar.settings import Settings

__all__ = ["guarded_h11", "uvicorn_options"]

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
    }
