"""The hot-path event transport: the hooks' TCP line protocol (`perseus_hooks.wire`, which both
ends import) served on the same event loop as the HTTP server.

A malformed line gets `ERR <message>` and the connection closes. Parsing is a byte split and
two int() calls per event (three with a chunk): no per-event allocation beyond that, no pydantic.

Connections are bounded (`EventLimits`): a handshake must come within a deadline, the server holds
a fixed number of connections (more are refused at once), a rank keeps a few (a new one closes
its oldest), and an authenticated connection that stays silent is closed."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass, field

from perseus_hooks import wire
from perseus_hooks.wire import MAX_LINE_BYTES, WireError, parse_event
from perseus_sidecar.errors import AuthError
from perseus_sidecar.node import Node
from perseus_sidecar.ranks import Rank

__all__ = ["MAX_LINE_BYTES", "EventLimits", "EventProtocol", "start_event_server"]

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT_S = 10.0
BATCH_LINES = 64
"""Lines handled per loop callback; with more pending, reading pauses and the rest is handled
in later callbacks, so a flooding client cannot starve HTTP or other ranks (and feels TCP
backpressure instead). 64 keeps a callback near 0.2 ms: a probe waits behind a flood for a few
of them (256 doubled /healthz p99 under bench/sidecar_abuse.py's floods)."""


@dataclass
class EventLimits:
    """Bounds on the transport's connections, and the count of open ones."""

    handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S
    idle_timeout_s: float = 600.0
    max_connections: int = 512
    max_per_ip: int = 64
    max_per_rank: int = 4
    backlog: int = 100
    open: set[EventProtocol] = field(default_factory=set)
    per_ip: Counter[str] = field(default_factory=Counter)


class EventProtocol(asyncio.Protocol):
    def __init__(self, node: Node, limits: EventLimits | None = None) -> None:
        self._node = node
        self._limits = limits if limits is not None else EventLimits()
        self._transport: asyncio.Transport | None = None
        self._peer_ip: str | None = None
        self._rank: Rank | None = None
        self._buffer = b""
        self._closed = False
        self._paused = False
        self._opened_mono = self._last_data_mono = time.monotonic()
        self._counted_ip: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        peer = transport.get_extra_info("peername")
        self._peer_ip = peer[0] if isinstance(peer, tuple) else None
        limits = self._limits
        ip = self._peer_ip or ""
        if len(limits.open) >= limits.max_connections or limits.per_ip[ip] >= limits.max_per_ip:
            self._node.metrics.connections_refused.labels(transport="tcp").inc()
            self.close("too many connections")
            return
        limits.open.add(self)
        limits.per_ip[ip] += 1
        self._counted_ip = ip
        loop = asyncio.get_running_loop()
        loop.call_later(self._limits.handshake_timeout_s, self._handshake_deadline)

    def _handshake_deadline(self) -> None:
        if self._rank is None:
            self.close("no handshake in time")

    def _idle_check(self) -> None:
        if self._closed:
            return
        idle_s = time.monotonic() - self._last_data_mono
        if idle_s >= self._limits.idle_timeout_s:
            self.close(f"no event for {self._limits.idle_timeout_s:g} s")
            return
        asyncio.get_running_loop().call_later(
            self._limits.idle_timeout_s - idle_s, self._idle_check
        )

    def _uncount(self) -> None:
        self._limits.open.discard(self)
        ip = self._counted_ip
        if ip is not None:
            self._counted_ip = None
            self._limits.per_ip[ip] -= 1
            if self._limits.per_ip[ip] <= 0:
                del self._limits.per_ip[ip]

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._uncount()
        if self._rank is not None:
            self._rank.listeners.discard(self)

    def data_received(self, data: bytes) -> None:
        self._last_data_mono = time.monotonic()
        self._buffer = self._buffer + data if self._buffer else data
        if not self._paused:
            self._process()

    def _process(self) -> None:
        if self._closed:
            return
        lines = self._buffer.split(b"\n", BATCH_LINES)
        rest = lines.pop()
        more = len(lines) == BATCH_LINES and b"\n" in rest
        self._buffer = rest
        if not more and len(rest) > MAX_LINE_BYTES:
            self.close("line too long")
            return
        self._handle_lines(lines)
        if self._transport is None or self._closed:
            return
        if more:
            if not self._paused:
                self._paused = True
                self._transport.pause_reading()
            asyncio.get_running_loop().call_soon(self._process)
        elif self._paused:
            self._paused = False
            self._transport.resume_reading()

    def _handle_lines(self, lines: list[bytes]) -> None:
        rank = self._rank
        counter = self._node.metrics.events_tcp
        accepted = 0
        if rank is not None:
            rank.received_ns = time.time_ns()
        for line in lines:
            if self._closed:
                return
            if rank is None:
                rank = self._handshake(line)
                if rank is not None:
                    rank.received_ns = time.time_ns()
                continue
            try:
                code, microbatch, t_ns, chunk = parse_event(line)
            except WireError as exc:
                self.close(str(exc))
                return
            rank.on_event(code, microbatch, t_ns, chunk)
            accepted += 1
        if accepted:
            counter.inc(accepted)

    def _handshake(self, line: bytes) -> Rank | None:
        try:
            rank_id, token = wire.parse_hello(line)
            rank = self._node.authenticate_rank(rank_id, token, self._peer_ip)
        except (WireError, AuthError) as exc:
            self.close(str(exc))
            return None
        others = [p for p in rank.listeners if isinstance(p, EventProtocol)]
        if len(others) >= self._limits.max_per_rank:
            min(others, key=lambda p: p._opened_mono).close("replaced by a newer connection")
        self._rank = rank
        rank.listeners.add(self)
        self._write(wire.hello_reply(rank.controlled))
        asyncio.get_running_loop().call_later(self._limits.idle_timeout_s, self._idle_check)
        return rank

    def _write(self, data: bytes) -> None:
        if self._transport is not None and not self._closed:
            self._transport.write(data)

    def notify(self, active: bool) -> None:
        self._write(wire.notice(active))

    def close(self, reason: str) -> None:
        if self._closed:
            return
        self._write(wire.error_line(reason))
        self._closed = True
        self._uncount()
        if self._rank is not None:
            self._rank.listeners.discard(self)
        if self._transport is not None:
            self._transport.close()


async def start_event_server(
    node: Node, host: str, port: int, limits: EventLimits | None = None
) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    shared = limits if limits is not None else EventLimits()
    server = await loop.create_server(
        lambda: EventProtocol(node, shared),
        host,
        port,
        reuse_address=True,
        backlog=shared.backlog,
    )
    sockets = server.sockets
    if sockets:
        node.event_port = sockets[0].getsockname()[1]
    log.info("event transport listening", extra={"host": host, "port": node.event_port})
    return server
