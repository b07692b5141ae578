"""The hooks' background thread: register the rank over HTTP, hold one TCP event stream to the
sidecar, send the queued events in batches, read schedule notices, and reconnect with backoff
when anything fails (training never waits for it)."""

from __future__ import annotations

import contextlib
import http.client
import logging
import queue
import select
import socket
import time
from collections import deque
from typing import TYPE_CHECKING

from perseus_hooks import wire
from perseus_hooks.config import HooksConfig, RefusedError
from perseus_hooks.wire import Event

if TYPE_CHECKING:
    from perseus_hooks.hooks import Hooks

__all__ = ["STOP", "Sender"]

log = logging.getLogger("perseus.hooks")

STOP: Event = ("", 0, 0, 0)
"""Queued by `Hooks.close`: send what is pending, then end the thread."""
_BATCH = 256
_POLL_S = 0.05
"""How often an idle sender checks the socket for schedule notices."""


class Sender:
    """The background thread: register, connect, stream, reconnect with backoff."""

    def __init__(self, hooks: Hooks, config: HooksConfig) -> None:
        self.hooks = hooks
        self.config = config
        self.pending: deque[Event] = deque()
        self.sock: socket.socket | None = None
        self.inbox = b""
        self.backoff_s = config.min_backoff_s
        self.retry_at = 0.0
        self.warned = False
        self.stopping = False
        self.event_port = 0

    def run(self) -> None:
        try:
            while not (self.stopping and not self.pending):
                wait_s = _POLL_S
                if self.sock is None:
                    wait_s = min(max(self.retry_at - time.monotonic(), 0.0), _POLL_S)
                self._collect(wait_s)
                if self.sock is None and time.monotonic() >= self.retry_at:
                    self._try_connect()
                if self.sock is not None:
                    self._exchange()
                elif self.stopping:
                    self._drop(len(self.pending))
                    self.pending.clear()
        finally:
            self._disconnect()

    def _collect(self, wait_s: float) -> None:
        """Move queued events into the bounded buffer, waiting up to `wait_s` for the first."""
        q = self.hooks._queue
        try:
            item = q.get(timeout=wait_s) if not self.stopping else q.get_nowait()
        except queue.Empty:
            return
        while True:
            if item is STOP:
                self.stopping = True
            else:
                self.pending.append(item)
            try:
                item = q.get_nowait()
            except queue.Empty:
                break
        overflow = len(self.pending) - self.config.buffer_events
        if overflow > 0:
            for _ in range(overflow):
                self.pending.popleft()
            self._drop(overflow)

    def _drop(self, count: int) -> None:
        if count:
            self.hooks._account(0, count)

    def _fail(self, reason: str) -> None:
        self._disconnect()
        if not self.warned:
            self.warned = True
            log.warning(
                "perseus hooks (rank %d): sidecar at %s:%d unavailable: %s; training continues, "
                "retrying with backoff",
                self.config.rank,
                self.config.host,
                self.config.port,
                reason,
            )
        else:
            log.debug("perseus hooks (rank %d): %s", self.config.rank, reason)
        self.retry_at = time.monotonic() + self.backoff_s
        self.backoff_s = min(self.backoff_s * 2, self.config.max_backoff_s)

    def _try_connect(self) -> None:
        try:
            token = self.config.token()
            if self.hooks.rank_id is None:
                self.hooks.rank_id, announced_port, active = self._register(token)
                self.event_port = self.config.event_port or announced_port
            self.sock, active = self._open_stream(self.hooks.rank_id, token)
        except (RefusedError, OSError, ValueError, KeyError) as exc:
            if isinstance(exc, RefusedError) and exc.forget_rank:
                self.hooks.rank_id = None
            self._fail(str(exc) or type(exc).__name__)
            return
        self.hooks._set_schedule_active(active)
        self.backoff_s = self.config.min_backoff_s
        if self.warned:
            log.info("perseus hooks (rank %d): connected to the sidecar again", self.config.rank)
            self.warned = False
        self.hooks._connected.set()

    def _register(self, token: str) -> tuple[str, int, bool]:
        c = self.config
        conn = http.client.HTTPConnection(
            c.host, c.port, timeout=c.connect_timeout_s, source_address=c.source_address()
        )
        body = wire.registration_body(
            namespace=c.namespace,
            pod=c.pod,
            rank=c.rank,
            pipeline_rank=c.pipeline_rank,
            data_rank=c.data_rank,
            tensor_rank=c.tensor_rank,
            gpu_uuid=c.gpu_uuid,
        )
        try:
            conn.request(
                "POST",
                wire.REGISTER_PATH,
                body=body,
                headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            )
            response = conn.getresponse()
            payload = response.read(65536)
        finally:
            conn.close()
        if response.status != 201:
            detail = payload.decode("utf-8", "replace")[:300]
            raise RefusedError(f"registration refused with HTTP {response.status}: {detail}")
        return wire.parse_registered(payload)

    def _open_stream(self, rank_id: str, token: str) -> tuple[socket.socket, bool]:
        c = self.config
        sock = socket.create_connection(
            (c.host, self.event_port),
            timeout=c.connect_timeout_s,
            source_address=c.source_address(),
        )
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(wire.hello(rank_id, token))
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    raise RefusedError("connection closed during the handshake", forget_rank=True)
                reply += chunk
                if len(reply) > 4096:
                    raise RefusedError("handshake reply too long")
            line, _, rest = reply.partition(b"\n")
            text = line.decode("utf-8", "replace")
            try:
                active = wire.parse_hello_reply(text)
            except wire.WireError as exc:
                raise RefusedError(str(exc), forget_rank=True) from None
            self.inbox = rest
            sock.settimeout(c.connect_timeout_s)
            return sock, active
        except BaseException:
            sock.close()
            raise

    def _exchange(self) -> None:
        """Send what is pending, then read any schedule notices."""
        sock = self.sock
        assert sock is not None
        while self.pending:
            # Bounded batches keep each stretch holding the GIL short for the training thread.
            batch = [self.pending.popleft() for _ in range(min(len(self.pending), _BATCH))]
            data = wire.encode_events(batch)
            try:
                sock.sendall(data)
            except OSError as exc:
                self._drop(len(batch))
                self._fail(f"sending events failed: {exc}")
                return
            self.hooks._account(len(batch), 0)
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                chunk = sock.recv(4096)
                if not chunk:
                    self._fail("the sidecar closed the event stream")
                    return
                self.inbox += chunk
        except OSError as exc:
            self._fail(f"reading from the sidecar failed: {exc}")
            return
        self._handle_lines()

    def _handle_lines(self) -> None:
        while b"\n" in self.inbox:
            line, _, self.inbox = self.inbox.partition(b"\n")
            text = line.decode("utf-8", "replace").strip()
            if text == wire.SCHEDULE_ON:
                self.hooks._set_schedule_active(True)
            elif text == wire.SCHEDULE_OFF:
                self.hooks._set_schedule_active(False)
            elif text.startswith(wire.ERROR_PREFIX):
                self.hooks.rank_id = None
                self._fail(f"the sidecar ended the event stream: {text[:300]}")
                return
            else:
                log.debug("perseus hooks: ignoring unknown line %r", text[:100])

    def _disconnect(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
            self.sock = None
            self.inbox = b""
            self.hooks._connected.clear()
            self.hooks._set_schedule_active(False)
