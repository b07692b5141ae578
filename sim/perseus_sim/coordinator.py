"""The rendezvous and all-reduce point of a multi-process simulated job
(`perseus sim-train coordinator`), as torchrun's c10d store is for a real one.

It waits until all S x P ranks joined, hands each the address of its downstream neighbour
(``setup``), and once every rank's links are up (``ready``) starts the iteration at a common
instant of the job's timeline (``start``: the epoch is the coordinator's wall clock). Each rank
reports the end of its work (``arrive``); the last one closes the iteration: the next starts at
the latest end plus the all-reduce time. With each ``start`` every rank reports its GPU's exact
energy (the simulated GPU's ground-truth curve) at the iteration's first start instant, so an
iteration's energy is the sum over ranks of the difference between two such readings, however
many attempts it took.

When a rank's connection drops (its pod was deleted), the attempt is aborted for every rank;
once the rank joined again (a new pod, maybe a new address) the links are set up anew and the
interrupted iteration is redone from its beginning, as a job restarted from its last checkpoint.
Its time and energy then include the lost attempt and the wait. Every message is validated
(`wire`); a connection sending anything else is closed, never the coordinator.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from perseus_hooks.pipeline import Instruction, iteration_time_s, one_f_one_b_order
from perseus_sim import wire
from perseus_sim.spec import CoordinatorConfig, IterationResult

__all__ = ["Coordinator", "CoordinatorError"]

log = logging.getLogger(__name__)

_HELLO_TIMEOUT_S = 10.0
_TICK_S = 0.25
_PING_S = 2.0
_MAX_PENDING = 64
"""Connections that have not introduced themselves yet, at most."""


class CoordinatorError(Exception):
    """The job cannot go on; one readable line and the exit code."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class _Rank:
    """A joined rank's connection and what it said in its hello."""

    rank: int
    writer: asyncio.StreamWriter
    ip: str
    port: int
    pod: str
    max_clock_s: tuple[float, float]
    last_seen: float = field(default_factory=time.monotonic)

    def send(self, data: bytes) -> None:
        if not self.writer.is_closing():
            self.writer.write(data)


class Coordinator:
    """See the module doc. `say` gets one line per notable event (joins, drops, restarts)."""

    def __init__(
        self,
        config: CoordinatorConfig,
        *,
        on_iteration: Callable[[IterationResult], None] | None = None,
        say: Callable[[str], None] = log.info,
    ) -> None:
        self.config = config
        self.results: list[IterationResult] = []
        self.port = config.port
        self.restarts = 0
        self._on_iteration = on_iteration
        self._say = say
        self._ranks: dict[int, _Rank] = {}
        self._pending = 0
        self._time_scale = config.time_scale
        self._phase = "joining"
        self._deadline = time.monotonic() + config.join_timeout_s
        self._generation = 0
        self._iteration = 0
        self._iterations = config.iterations
        """The job's length: the configured iterations, fewer once the stop file appears."""
        self._ready: set[int] = set()
        self._arrived: dict[int, tuple[float, int]] = {}
        self._epoch_ns: int | None = None
        self._boundary_s: dict[int, float] = {}
        self._boundary_wall_s: dict[int, float] = {}
        self._readings: dict[int, dict[int, float]] = {}
        self._closed: dict[int, int] = {}
        """Iteration -> late starts, for iterations closed and not reported yet."""
        self._expected_s: list[float] = []
        self._finished: asyncio.Future[None] | None = None
        self._failure: CoordinatorError | None = None
        self._last_ping = 0.0
        self._clients: dict[asyncio.Task[None], asyncio.StreamWriter] = {}

    # Running ---------------------------------------------------------------------------------

    async def serve(self, ready: Callable[[int], None] | None = None) -> list[IterationResult]:
        """Run the job to its end; CoordinatorError when it fails. `ready` gets the port."""
        loop = asyncio.get_running_loop()
        self._finished = loop.create_future()
        try:
            server = await asyncio.start_server(
                self._client, self.config.host, self.config.port, limit=wire.MAX_LINE
            )
        except OSError as exc:
            raise CoordinatorError(f"cannot listen on port {self.config.port}: {exc}", 2) from None
        self.port = server.sockets[0].getsockname()[1]
        if ready is not None:
            ready(self.port)
        ticker = asyncio.create_task(self._tick())
        try:
            await self._finished
        finally:
            ticker.cancel()
            server.close()
            # Closed connections end their tasks (cancelling them instead makes asyncio's
            # stream callback log a traceback).
            for writer in self._clients.values():
                writer.close()
            if self._clients:
                await asyncio.wait(list(self._clients), timeout=2.0)
            with contextlib.suppress(Exception):
                await server.wait_closed()
        if self._failure is not None:
            raise self._failure
        return list(self.results)

    def _fail(self, message: str) -> None:
        if self._finished is None or self._finished.done():
            return
        self._failure = CoordinatorError(message)
        data = wire.encode("fail", reason=message[:1000])
        for r in self._ranks.values():
            r.send(data)
        self._finished.set_result(None)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(_TICK_S)
            now = time.monotonic()
            if self._phase == "finishing" and now > self._deadline:
                missing = sorted(
                    set(range(self.config.ranks)) - set(self._readings.get(self._iterations, {}))
                )
                self._fail(f"ranks {missing[:10]} did not report their last reading in time")
            elif self._phase in ("joining", "waiting") and now > self._deadline:
                missing = sorted(set(range(self.config.ranks)) - set(self._ranks))
                shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
                if self._phase == "joining":
                    self._fail(
                        f"ranks {shown} did not join within {self.config.join_timeout_s:g} s"
                    )
                else:
                    self._fail(
                        f"ranks {shown} did not rejoin within {self.config.rejoin_timeout_s:g} s"
                    )
            if now - self._last_ping >= _PING_S:
                self._last_ping = now
                ping = wire.encode("ping")
                for r in self._ranks.values():
                    r.send(ping)
            for r in list(self._ranks.values()):
                if now - r.last_seen > self.config.rank_timeout_s:
                    self._say(f"rank {r.rank} silent for {self.config.rank_timeout_s:g} s")
                    r.writer.close()
                    self._drop(r)

    # Connections -----------------------------------------------------------------------------

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        address = str(peer[0]) if isinstance(peer, tuple) else "?"
        joined: _Rank | None = None
        task = asyncio.current_task()
        if task is not None:
            self._clients[task] = writer
            task.add_done_callback(lambda done: self._clients.pop(done, None))
        if self._pending >= _MAX_PENDING:
            writer.close()
            return
        self._pending += 1
        try:
            try:
                line = await asyncio.wait_for(reader.readline(), _HELLO_TIMEOUT_S)
            finally:
                self._pending -= 1
            if not line:
                return
            joined = self._hello(wire.decode(line, ("hello",)), writer, address)
            if joined is None:
                await writer.drain()
                return
            while line := await reader.readline():
                joined.last_seen = time.monotonic()
                self._message(joined, wire.decode(line, ("ready", "reading", "arrive", "ping")))
                await writer.drain()
        except (ValueError, OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
            # ValueError: a WireError, or a line over the reader's limit.
            who = f"rank {joined.rank}" if joined is not None else address
            self._say(f"closing the connection of {who}: {str(exc)[:300]}")
        finally:
            writer.close()
            if joined is not None:
                self._drop(joined)

    def _hello(
        self, hello: wire.Message, writer: asyncio.StreamWriter, address: str
    ) -> _Rank | None:
        rank = hello.get_int("rank")
        reason = None
        if rank >= self.config.ranks:
            reason = (
                f"rank {rank} is not one of 0..{self.config.ranks - 1} "
                f"({self.config.pipelines} pipelines x {self.config.stages} stages)"
            )
        elif hello.get_int("stages") != self.config.stages:
            reason = (
                f"its node's profile has {hello.get_int('stages')} stages, "
                f"the job {self.config.stages}"
            )
        elif self._time_scale is not None and hello.get_float("time_scale") != self._time_scale:
            reason = (
                f"its node runs at time scale {hello.get_float('time_scale')}, "
                f"the job at {self._time_scale}"
            )
        elif self._phase == "done":
            reason = "the job is over"
        if reason is not None:
            self._say(f"refusing rank {rank} from {address}: {reason}")
            writer.write(wire.encode("reject", reason=reason))
            return None
        self._time_scale = hello.get_float("time_scale")
        clock = hello.get_floats("max_clock_s")
        joined = _Rank(
            rank=rank,
            writer=writer,
            ip=hello.opt_str("ip") or address,
            port=hello.get_int("port"),
            pod=hello.get_str("pod"),
            max_clock_s=(clock[0], clock[1]),
        )
        old = self._ranks.get(rank)
        if old is not None:
            self._say(f"rank {rank} joined again from {joined.ip}: dropping its old connection")
            old.writer.close()
            self._drop(old)
        self._ranks[rank] = joined
        joined.send(
            wire.encode(
                "welcome",
                stages=self.config.stages,
                pipelines=self.config.pipelines,
                microbatches=self.config.microbatches,
                iterations=self.config.iterations,
            )
        )
        self._say(f"rank {rank} joined from {joined.ip}:{joined.port} (pod {joined.pod})")
        if self._phase == "finishing":
            self._send_finish(joined)
        elif self._phase in ("joining", "waiting") and len(self._ranks) == self.config.ranks:
            self._setup()
        return joined

    def _drop(self, gone: _Rank) -> None:
        if self._ranks.get(gone.rank) is not gone:
            return
        del self._ranks[gone.rank]
        if self._phase in ("joining", "waiting", "done"):
            return
        if self._phase == "finishing":
            if gone.rank not in self._readings.get(self._iterations, {}):
                self._deadline = time.monotonic() + self.config.rejoin_timeout_s
            return
        self.restarts += 1
        reason = (
            f"rank {gone.rank} left during iteration {self._iteration} (attempt "
            f"{self._generation}); redoing the iteration once it rejoins"
        )
        self._say(f"{reason}; waiting up to {self.config.rejoin_timeout_s:g} s")
        abort = wire.encode("abort", generation=self._generation, reason=reason)
        for r in self._ranks.values():
            r.send(abort)
        self._phase = "waiting"
        self._deadline = time.monotonic() + self.config.rejoin_timeout_s

    # The job ---------------------------------------------------------------------------------

    def _setup(self) -> None:
        self._generation += 1
        self._phase = "setup"
        self._ready = set()
        self._expected_s = [self._all_max_s(p) for p in range(self.config.pipelines)]
        stages = self.config.stages
        for r in self._ranks.values():
            stage = r.rank % stages
            after = self._ranks[r.rank + 1] if stage < stages - 1 else None
            r.send(
                wire.encode(
                    "setup",
                    generation=self._generation,
                    next_ip=None if after is None else after.ip,
                    next_port=None if after is None else after.port,
                    next_rank=None if after is None else after.rank,
                    prev_rank=r.rank - 1 if stage > 0 else None,
                )
            )

    def _all_max_s(self, pipeline: int) -> float:
        """The pipeline's iteration time with every GPU at maximum clock: the longest path of
        the 1F1B DAG, each stage's times as its rank's node profiles them."""
        stages = self.config.stages
        ranks = [self._ranks[pipeline * stages + s] for s in range(stages)]

        def duration(stage: int, instruction: Instruction) -> float:
            return ranks[stage].max_clock_s[0 if instruction[0] else 1]

        return iteration_time_s(one_f_one_b_order(stages, self.config.microbatches), duration)

    def _message(self, r: _Rank, message: wire.Message) -> None:
        if message.kind == "ready":
            if self._phase == "setup" and message.get_int("generation") == self._generation:
                self._ready.add(r.rank)
                if len(self._ready) == self.config.ranks:
                    self._start()
        elif message.kind == "reading":
            boundary = message.get_int("iteration")
            if boundary in self._boundary_s:
                self._readings.setdefault(boundary, {}).setdefault(
                    r.rank, message.get_float("energy_j")
                )
                self._report()
        elif message.kind == "arrive" and (
            self._phase == "running"
            and message.get_int("generation") == self._generation
            and message.get_int("iteration") == self._iteration
            and r.rank not in self._arrived
        ):
            self._arrived[r.rank] = (message.get_float("end_s"), message.get_int("late"))
            if len(self._arrived) == self.config.ranks:
                self._close()

    def _now_s(self) -> float:
        assert self._epoch_ns is not None and self._time_scale is not None
        return (time.time_ns() - self._epoch_ns) / 1e9 / self._time_scale

    def _start(self) -> None:
        """Every rank's links are up: start (or redo) the current iteration."""
        assert self._time_scale is not None
        if self._epoch_ns is None:
            self._epoch_ns = time.time_ns()
        start = self._now_s() + self.config.start_margin_s / self._time_scale
        k = self._iteration
        if k not in self._boundary_s:
            self._boundary_s[k] = start
            self._boundary_wall_s[k] = self._epoch_ns / 1e9 + start * self._time_scale
        self._phase = "running"
        self._arrived = {}
        self._send_start(start)

    def _send_start(self, start: float) -> None:
        k = self._iteration
        for r in self._ranks.values():
            r.send(
                wire.encode(
                    "start",
                    generation=self._generation,
                    iteration=k,
                    start_s=start,
                    epoch_ns=self._epoch_ns,
                    factor=self.config.factor(r.rank // self.config.stages, k),
                    read_at_s=self._boundary_s[k],
                )
            )

    def _close(self) -> None:
        """Every rank arrived: the all-reduce, then the next iteration (or the end)."""
        assert self._epoch_ns is not None and self._time_scale is not None
        k = self._iteration
        latest_end = max(end for end, _ in self._arrived.values())
        next_start = latest_end + self.config.allreduce_s
        wall_s = max(time.time(), self._epoch_ns / 1e9 + next_start * self._time_scale)
        self._closed[k] = sum(late for _, late in self._arrived.values())
        self._boundary_s[k + 1] = next_start
        self._boundary_wall_s[k + 1] = wall_s
        self._iteration = k + 1
        if self.config.stop_file is not None and self.config.stop_file.exists():
            if self._iterations > self._iteration:
                self._say(f"{self.config.stop_file} exists: the job ends after {k + 1} iterations")
            self._iterations = min(self._iterations, self._iteration)
        if self._iteration < self._iterations:
            self._arrived = {}
            self._send_start(next_start)
        else:
            self._phase = "finishing"
            self._deadline = math.inf
            for r in self._ranks.values():
                self._send_finish(r)
        self._report()

    def _send_finish(self, r: _Rank) -> None:
        r.send(
            wire.encode(
                "finish",
                generation=self._generation,
                epoch_ns=self._epoch_ns,
                iteration=self._iterations,
                read_at_s=self._boundary_s[self._iterations],
            )
        )

    def _report(self) -> None:
        """Report every closed iteration whose energy readings are all in."""
        ranks = self.config.ranks
        while (k := len(self.results)) in self._closed:
            start, end = self._readings.get(k, {}), self._readings.get(k + 1, {})
            if len(start) < ranks or len(end) < ranks:
                return
            assert self._time_scale is not None
            expected = max(t * self.config.factor(p, k) for p, t in enumerate(self._expected_s))
            result = IterationResult(
                iteration=k,
                time_s=(self._boundary_wall_s[k + 1] - self._boundary_wall_s[k]) / self._time_scale,
                timeline_s=self._boundary_s[k + 1] - self._boundary_s[k],
                expected_s=expected + self.config.allreduce_s,
                energy_j=sum(end[r] - start[r] for r in range(ranks)),
                late_starts=self._closed.pop(k),
            )
            self.results.append(result)
            if self._on_iteration is not None:
                self._on_iteration(result)
        if len(self.results) == self._iterations and self._finished is not None:
            self._phase = "done"
            if not self._finished.done():
                self._finished.set_result(None)
