"""The hot-path event transport: a TCP line protocol on the same event loop as the HTTP server.

    client: PERSEUS1 <rank_id> <job_token>\\n    server: OK <0|1>\\n  or  ERR <message>\\n + close
    client: <FB|FE|BB|BE|IE> <microbatch> <t_ns>\\n  (one per event)
    server: S 1\\n / S 0\\n when the rank's clock control starts / stops

A malformed line gets `ERR <message>` and the connection closes. Parsing is a byte split and
two int() calls per event (three with a chunk): no per-event allocation beyond that, no pydantic."""

from __future__ import annotations

import asyncio
import logging
import time

from perseus_sidecar.node import AuthError, Node
from perseus_sidecar.ranks import EVENT_CODES_BYTES, ITERATION_END, MAX_CHUNKS, Rank

__all__ = ["MAX_LINE_BYTES", "EventProtocol", "start_event_server"]

log = logging.getLogger(__name__)

MAX_LINE_BYTES = 512
HANDSHAKE_TIMEOUT_S = 10.0
BATCH_LINES = 256
"""Lines handled per loop callback; with more pending, reading pauses and the rest is handled
in later callbacks, so a flooding client cannot starve HTTP or other ranks (and feels TCP
backpressure instead)."""
MAX_T_NS = 2**63 - 1
MAX_MICROBATCH = 1_000_000


class EventProtocol(asyncio.Protocol):
    def __init__(self, node: Node) -> None:
        self._node = node
        self._transport: asyncio.Transport | None = None
        self._peer_ip: str | None = None
        self._rank: Rank | None = None
        self._buffer = b""
        self._closed = False
        self._paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        peer = transport.get_extra_info("peername")
        self._peer_ip = peer[0] if isinstance(peer, tuple) else None
        asyncio.get_running_loop().call_later(HANDSHAKE_TIMEOUT_S, self._handshake_deadline)

    def _handshake_deadline(self) -> None:
        if self._rank is None:
            self.close("no handshake in time")

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if self._rank is not None:
            self._rank.listeners.discard(self)

    def data_received(self, data: bytes) -> None:
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
            parts = line.split()
            code = EVENT_CODES_BYTES.get(parts[0]) if 3 <= len(parts) <= 4 else None
            if code is None:
                self.close("expected '<FB|FE|BB|BE|IE> <microbatch> <t_ns> [<chunk>]'")
                return
            try:
                microbatch = int(parts[1])
                t_ns = int(parts[2])
                chunk = int(parts[3]) if len(parts) == 4 else 0
            except ValueError:
                self.close("microbatch, t_ns and chunk must be integers")
                return
            if not (0 <= t_ns <= MAX_T_NS) or microbatch > MAX_MICROBATCH:
                self.close("t_ns or microbatch out of range")
                return
            if (code == ITERATION_END) != (microbatch == -1) or microbatch < -1:
                self.close("microbatch must be -1 exactly for IE and >= 0 otherwise")
                return
            if not 0 <= chunk < MAX_CHUNKS or (chunk and code == ITERATION_END):
                self.close(f"chunk must be 0-{MAX_CHUNKS - 1}, and 0 for IE")
                return
            rank.on_event(code, microbatch, t_ns, chunk)
            accepted += 1
        if accepted:
            counter.inc(accepted)

    def _handshake(self, line: bytes) -> Rank | None:
        parts = line.split()
        if len(parts) != 3 or parts[0] != b"PERSEUS1":
            self.close("expected 'PERSEUS1 <rank_id> <job_token>'")
            return None
        try:
            rank = self._node.authenticate_rank(
                parts[1].decode("ascii"), parts[2].decode("utf-8"), self._peer_ip
            )
        except (AuthError, UnicodeDecodeError) as exc:
            message = str(exc) if isinstance(exc, AuthError) else "rank_id and token must be text"
            self.close(message)
            return None
        self._rank = rank
        rank.listeners.add(self)
        self._write(b"OK 1\n" if rank.controlled else b"OK 0\n")
        return rank

    def _write(self, data: bytes) -> None:
        if self._transport is not None and not self._closed:
            self._transport.write(data)

    def notify(self, active: bool) -> None:
        self._write(b"S 1\n" if active else b"S 0\n")

    def close(self, reason: str) -> None:
        if self._closed:
            return
        self._write(b"ERR " + reason.replace("\n", " ").encode("utf-8", "replace") + b"\n")
        self._closed = True
        if self._rank is not None:
            self._rank.listeners.discard(self)
        if self._transport is not None:
            self._transport.close()


async def start_event_server(node: Node, host: str, port: int) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: EventProtocol(node), host, port, reuse_address=True)
    sockets = server.sockets
    if sockets:
        node.event_port = sockets[0].getsockname()[1]
    log.info("event transport listening", extra={"host": host, "port": node.event_port})
    return server
