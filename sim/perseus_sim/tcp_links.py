"""`Links` between rank processes over TCP (`perseus sim-train rank`).

Stage s of a pipeline connects to stage s+1's listening port and introduces itself with a
``peer`` message naming the attempt (generation) and its rank; the attempt takes only the
connection of the rank it expects, and drops those of older attempts. On that one connection
activations (``act``) flow downstream and gradients (``grad``) upstream, each with the timeline
instant its instruction ended. A malformed message from the peer is fatal to the rank (one line,
exit 2); a closed connection is not (the peer died: the coordinator aborts the attempt).
"""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import socket
import threading
import time
from collections.abc import Callable

from perseus_sim import wire
from perseus_sim.links import StoppedError, get_in_order

__all__ = ["PeerListener", "TcpLinks"]

log = logging.getLogger(__name__)

_HELLO_TIMEOUT_S = 5.0
_RETRY_S = 0.1
_MAX_WAITING = 8
"""Introduced connections kept for an attempt to take, at most (the oldest go first)."""


class PeerListener:
    """The rank's listening socket, for its whole life: keeps the connections that introduced
    themselves properly until the attempt expecting one takes it (a neighbour may connect
    before this rank heard of the attempt)."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_server((host, port))
        self.port: int = self.sock.getsockname()[1]
        self._cond = threading.Condition()
        self._waiting: list[tuple[int, int, socket.socket, wire.LineReader]] = []
        threading.Thread(target=self._accept, name="sim-peer-listener", daemon=True).start()

    def take(
        self, generation: int, rank: int, deadline: float, stop: threading.Event
    ) -> tuple[socket.socket, wire.LineReader]:
        """The connection of `rank` for attempt `generation` (with its reader, which may hold
        what the peer sent after its introduction); connections of older attempts are dropped
        on the way."""
        with self._cond:
            while True:
                for item in list(self._waiting):
                    if item[0] < generation:
                        self._waiting.remove(item)
                        item[2].close()
                    elif item[:2] == (generation, rank):
                        self._waiting.remove(item)
                        return item[2], item[3]
                if stop.is_set():
                    raise StoppedError
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"rank {rank} (the previous stage) did not connect in time")
                self._cond.wait(min(left, _RETRY_S))

    def close(self) -> None:
        self.sock.close()
        with self._cond:
            for item in self._waiting:
                item[2].close()
            self._waiting.clear()

    def _accept(self) -> None:
        while True:
            try:
                conn, address = self.sock.accept()
            except OSError:
                return
            threading.Thread(
                target=self._greet, args=(conn, address[0]), name="sim-peer-greet", daemon=True
            ).start()

    def _greet(self, conn: socket.socket, address: str) -> None:
        try:
            conn.settimeout(_HELLO_TIMEOUT_S)
            reader = wire.LineReader(conn)
            line = reader.line()
            if line is None:
                raise wire.WireError("closed before introducing itself")
            hello = wire.decode(line, ("peer",))
            conn.settimeout(None)
        except (OSError, wire.WireError) as exc:
            log.warning("refused a connection from %s: %s", address, exc)
            conn.close()
            return
        with self._cond:
            self._waiting.append((hello.get_int("generation"), hello.get_int("rank"), conn, reader))
            if len(self._waiting) > _MAX_WAITING:
                self._waiting.pop(0)[2].close()
            self._cond.notify_all()


class TcpLinks:
    """One attempt's links of one rank: to the next stage (ours to open) and from the previous
    one (through the listener). `fail` hears of a malformed message even while the rank is not
    waiting on a link."""

    def __init__(
        self,
        *,
        rank: int,
        generation: int,
        next_address: tuple[str, int] | None,
        prev_rank: int | None,
        listener: PeerListener,
        stop: threading.Event,
        fail: Callable[[str], None],
    ) -> None:
        self.rank = rank
        self.generation = generation
        self.fatal: str | None = None
        self._next_address = next_address
        self._prev_rank = prev_rank
        self._listener = listener
        self._stop = stop
        self._fail = fail
        self._closed = False
        self._down: socket.socket | None = None
        self._up: socket.socket | None = None
        self._down_lock = threading.Lock()
        self._up_lock = threading.Lock()
        self._acts: queue.SimpleQueue[tuple[int, float]] = queue.SimpleQueue()
        self._grads: queue.SimpleQueue[tuple[int, float]] = queue.SimpleQueue()

    def connect(self, timeout_s: float) -> None:
        """Open the link downstream and take the one from upstream; StoppedError when the
        attempt is aborted meanwhile, TimeoutError when a neighbour stays out of reach."""
        deadline = time.monotonic() + timeout_s
        if self._next_address is not None:
            self._down = self._dial(self._next_address, deadline)
            self._start_reader(wire.LineReader(self._down), "grad", self._grads, self.rank + 1)
        if self._prev_rank is not None:
            self._up, reader = self._listener.take(
                self.generation, self._prev_rank, deadline, self._stop
            )
            self._start_reader(reader, "act", self._acts, self._prev_rank)

    def _dial(self, address: tuple[str, int], deadline: float) -> socket.socket:
        hello = wire.encode("peer", generation=self.generation, rank=self.rank)
        while True:
            if self._stop.is_set():
                raise StoppedError
            try:
                sock = socket.create_connection(address, timeout=1.0)
                sock.settimeout(None)
                sock.sendall(hello)
                return sock
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"cannot reach the next stage at {address[0]}:{address[1]}: {exc}"
                    ) from None
                time.sleep(_RETRY_S)

    def _start_reader(
        self,
        reader: wire.LineReader,
        kind: str,
        into: queue.SimpleQueue[tuple[int, float]],
        peer_rank: int,
    ) -> None:
        threading.Thread(
            target=self._read,
            args=(reader, kind, into, peer_rank),
            name=f"sim-peer-{kind}",
            daemon=True,
        ).start()

    def _read(
        self,
        reader: wire.LineReader,
        kind: str,
        into: queue.SimpleQueue[tuple[int, float]],
        peer_rank: int,
    ) -> None:
        try:
            while (line := reader.line()) is not None:
                message = wire.decode(line, (kind,))
                into.put((message.get_int("microbatch"), message.get_float("end_s")))
        except wire.WireError as exc:
            if not self._closed:
                self.fatal = f"malformed message from rank {peer_rank}: {exc}"
                self._stop.set()
                self._fail(self.fatal)
        except OSError:
            pass  # the peer went away: the coordinator sees it too and aborts the attempt

    def receive(self, forward: bool, microbatch: int, chunk: int = 0) -> float:
        _plain_1f1b(chunk)
        into = self._acts if forward else self._grads
        if (self._up if forward else self._down) is None:
            return -math.inf
        try:
            return get_in_order(into, microbatch, self._stop)
        except ValueError as exc:
            self.fatal = f"rank {self.rank}: {exc}"
            raise StoppedError from None

    def send(self, forward: bool, microbatch: int, end: float, chunk: int = 0) -> None:
        _plain_1f1b(chunk)
        sock, lock = (self._down, self._down_lock) if forward else (self._up, self._up_lock)
        if sock is None:
            return
        data = wire.encode("act" if forward else "grad", microbatch=microbatch, end_s=end)
        try:
            wire.send(sock, lock, data)
        except OSError:
            # The neighbour is gone; the coordinator aborts the attempt. Until then this rank
            # goes on, as a real one would until its collective times out.
            log.debug("rank %d: lost a neighbour while sending", self.rank)

    def close(self) -> None:
        self._closed = True
        for sock in (self._down, self._up):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()


def _plain_1f1b(chunk: int) -> None:
    """Links between rank processes join neighbouring stages only; interleaved 1F1B would also
    need the last stage to feed the first (rank processes refuse per-chunk profiles up front)."""
    if chunk != 0:
        raise ValueError("rank processes play plain 1F1B only (one model chunk per stage)")
