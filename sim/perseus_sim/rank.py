"""One rank of the simulated trainer as its own process (`perseus sim-train rank`): a pod of
a multi-process job. It plays its stage's 1F1B order on its simulated GPU with the
`SimTrainer`'s timeline, clock polling and hooks, exchanges activations and gradients with its
neighbours over TCP (`tcp_links`), and follows the coordinator (`coordinator`): join, set up
the links of an attempt, start each iteration at the instant it names, report the end and the
GPU's energy, abort an attempt when another rank drops, exit when told.

Exit codes: 0 when the job finished; 2 for bad input (unknown rank, a profile that disagrees
with the job, no sidecar, no coordinator, a malformed message); 1 when the job failed at run
time (the coordinator vanished or gave up).
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
import queue
import socket
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import perseus_hooks as hooks_mod
from perseus_sidecar.gpu.simnode import open_node
from perseus_sim import wire
from perseus_sim.links import StoppedError
from perseus_sim.spec import NodeSpec, RankPlacement, SimConfig
from perseus_sim.tcp_links import PeerListener, TcpLinks
from perseus_sim.trainer import SimTrainer

__all__ = ["RankError", "RankOptions", "run_rank"]

log = logging.getLogger(__name__)

_PING_S = 2.0
_FROM_COORDINATOR = ("welcome", "reject", "setup", "start", "finish", "abort", "fail", "ping")


class RankError(Exception):
    """The rank cannot go on; one readable line and its exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class RankOptions:
    rank: int
    coordinator: tuple[str, int]
    state_dir: Path
    sidecar: tuple[str, int]
    job_token_file: str
    namespace: str
    pod: str
    gpu_index: int | None = None
    gpu_uuid: str | None = None
    """The GPU the kubelet gave the pod (PERSEUS_GPU_UUID from the device plugin): the rank
    plays that one. An explicit gpu_index wins; with neither, the rank's slot on the node."""
    listen_port: int = 29401
    advertise_ip: str | None = None
    max_lag_s: float = 0.05
    connect_timeout_s: float = 60.0
    """How long to retry reaching the coordinator (and the node's sidecar)."""
    coordinator_timeout_s: float = 30.0
    """Silence from the coordinator after which it counts as gone (it pings every 2 s)."""
    peer_timeout_s: float = 30.0


class _RankTrainer(SimTrainer):
    """A `SimTrainer` holding one rank: its node is this pod's node, its GPU the rank's."""

    def __init__(self, config: SimConfig, options: RankOptions, stage: int, pipeline: int) -> None:
        self._options = options
        self._stage_pipeline = (stage, pipeline)
        super().__init__(config)

    def _place(self) -> list[RankPlacement]:
        gpus = self.nodes[0].gpus
        index = self._options.gpu_index
        if index is None:
            index = self._options.rank % len(gpus)
        stage, pipeline = self._stage_pipeline
        return [RankPlacement(self._options.rank, pipeline, stage, 0, index, gpus[index].uuid)]

    def _hooks(self, p: RankPlacement) -> hooks_mod.Hooks:
        return self._register(
            p,
            host=self._options.sidecar[0],
            port=self._options.sidecar[1],
            namespace=self._options.namespace,
            pod=self._options.pod,
            job_token_file=self._options.job_token_file,
            source_ip=self._options.advertise_ip,
        )

    def set_epoch(self, epoch_ns: int) -> None:
        """The job's timeline origin (the coordinator's), on this node's simulated clock."""
        if self._epoch_wall_ns == epoch_ns:
            return
        self._epoch_wall_ns = epoch_ns
        self._epoch_wall_s = epoch_ns / 1e9
        for node in self.nodes:
            node.offset_s = (self._epoch_wall_s - node.settings.epoch_wall_s) / self.time_scale

    def energy_at(self, t: float) -> float:
        p = self.placements[0]
        node = self.nodes[p.node]
        return node.gpus[p.gpu_index].energy_j(t + node.offset_s)

    def take_late(self) -> int:
        with self._late_lock:
            late, self._late = self._late, 0
        return late


def _check_sidecar(options: RankOptions) -> None:
    """Bounded wait until the node's sidecar answers HTTP at all."""
    host, port = options.sidecar
    deadline = time.monotonic() + options.connect_timeout_s
    while True:
        connection = http.client.HTTPConnection(host, port, timeout=2.0)
        try:
            connection.request("GET", "/v1/healthz")
            connection.getresponse().read()
            return
        except (OSError, http.client.HTTPException) as exc:
            if time.monotonic() > deadline:
                raise RankError(
                    f"cannot reach the node's sidecar at {host}:{port} within "
                    f"{options.connect_timeout_s:g} s: {exc}",
                    2,
                ) from None
        finally:
            connection.close()
        time.sleep(0.5)


def _open_node(options: RankOptions) -> tuple[float, int, list[str]]:
    """(time scale, stages, GPU UUIDs) of the node, waiting (bounded) for its sidecar to
    create the state."""
    deadline = time.monotonic() + options.connect_timeout_s
    while True:
        try:
            settings, truth, gpus = open_node(options.state_dir)
        except Exception as exc:  # the GPU layer's errors carry one readable line
            if time.monotonic() > deadline or options.state_dir.joinpath("node.json").exists():
                raise RankError(str(exc), 2) from None
            time.sleep(0.5)
            continue
        for gpu in gpus:
            gpu.close()
        if truth.chunks != 1:
            raise RankError(
                f"the simulated node plays {truth.chunks} model chunks per stage (interleaved "
                "1F1B); rank processes play plain 1F1B only: use the in-process trainer",
                2,
            )
        return settings.time_scale, truth.num_stages, [g.uuid for g in gpus]


def _dial_coordinator(options: RankOptions) -> socket.socket:
    host, port = options.coordinator
    deadline = time.monotonic() + options.connect_timeout_s
    backoff_s = 0.1
    while True:
        try:
            return socket.create_connection((host, port), timeout=2.0)
        except OSError as exc:
            if time.monotonic() > deadline:
                raise RankError(
                    f"cannot reach the coordinator at {host}:{port} within "
                    f"{options.connect_timeout_s:g} s: {exc}",
                    2,
                ) from None
        time.sleep(backoff_s)
        backoff_s = min(backoff_s * 2, 2.0)


class _Session:
    """The coordinator connection: a reader thread queueing validated messages (and stopping
    the play at an abort), a pinger, and the rank's replies."""

    def __init__(self, sock: socket.socket, options: RankOptions, stop: threading.Event) -> None:
        self.sock = sock
        self.options = options
        self.stop = stop
        self.inbox: queue.SimpleQueue[wire.Message | RankError] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._abort_lock = threading.Lock()
        self._aborted = -1
        """The newest attempt (generation) the coordinator aborted."""
        self._done = threading.Event()
        sock.settimeout(options.coordinator_timeout_s)

    def start(self) -> None:
        threading.Thread(target=self._read, name="sim-coordinator-reader", daemon=True).start()
        threading.Thread(target=self._ping, name="sim-coordinator-ping", daemon=True).start()

    def send(self, kind: str, **fields: object) -> None:
        with contextlib.suppress(OSError):  # the reader sees the connection end, reports it
            wire.send(self.sock, self._lock, wire.encode(kind, **fields))

    def next(self) -> wire.Message:
        item = self.inbox.get()
        if isinstance(item, RankError):
            raise item
        return item

    def begin_attempt(self, generation: int) -> None:
        """Let attempt `generation` play unless the coordinator already aborted it."""
        with self._abort_lock:
            if generation > self._aborted:
                self.stop.clear()

    def close(self) -> None:
        self._done.set()
        with contextlib.suppress(OSError):  # wakes the reader: a bare close would not
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()

    def _read(self) -> None:
        host, port = self.options.coordinator
        reader = wire.LineReader(self.sock)
        try:
            while (line := reader.line()) is not None:
                message = wire.decode(line, _FROM_COORDINATOR)
                if message.kind == "abort":
                    with self._abort_lock:
                        self._aborted = max(self._aborted, message.get_int("generation"))
                        self.stop.set()
                self.inbox.put(message)
            error = RankError(f"the coordinator at {host}:{port} closed the connection", 1)
        except TimeoutError:
            error = RankError(
                f"no word from the coordinator at {host}:{port} for "
                f"{self.options.coordinator_timeout_s:g} s",
                1,
            )
        except wire.WireError as exc:
            error = RankError(f"malformed message from the coordinator: {exc}", 2)
        except OSError as exc:
            error = RankError(f"lost the coordinator at {host}:{port}: {exc}", 1)
        if not self._done.is_set():
            self.stop.set()
            self.inbox.put(error)

    def _ping(self) -> None:
        while not self._done.wait(_PING_S):
            self.send("ping")


def run_rank(options: RankOptions) -> None:
    """Run one rank until the job ends; RankError says why it cannot."""
    time_scale, stages, uuids = _open_node(options)
    if options.gpu_index is not None and not 0 <= options.gpu_index < len(uuids):
        raise RankError(
            f"--gpu-index {options.gpu_index} is not one of the node's GPUs 0..{len(uuids) - 1}", 2
        )
    if not uuids:
        raise RankError(f"the simulated node in {options.state_dir} has no GPUs", 2)
    if options.gpu_index is None and options.gpu_uuid is not None:
        if options.gpu_uuid not in uuids:
            raise RankError(
                f"GPU {options.gpu_uuid[:80]!r} is not one of the simulated node's GPUs", 2
            )
        options = replace(options, gpu_index=uuids.index(options.gpu_uuid))
    index = options.rank % len(uuids) if options.gpu_index is None else options.gpu_index
    energy = options.state_dir / f"gpu-{index}.energy"
    if energy.exists() and not os.access(energy, os.R_OK | os.W_OK):
        raise RankError(
            f"cannot write the simulated GPU's energy record {energy}: run the rank as the "
            "sidecar's user (the state is the sidecar's)",
            2,
        )
    _check_sidecar(options)
    try:
        listener = PeerListener(options.advertise_ip or "0.0.0.0", options.listen_port)
    except OSError as exc:
        raise RankError(f"cannot listen on port {options.listen_port}: {exc}", 2) from None
    stop = threading.Event()
    session = _Session(_dial_coordinator(options), options, stop)
    try:
        _run(options, session, listener, (time_scale, stages, uuids))
    except OSError as exc:  # the node's state files; network errors are handled where they occur
        raise RankError(f"rank {options.rank}: {exc}", 2) from None
    finally:
        session.close()
        listener.close()


def _max_clock_s(options: RankOptions, stage: int) -> list[float]:
    _, truth, gpus = open_node(options.state_dir)
    for gpu in gpus:
        gpu.close()
    top = truth.max_frequency_mhz
    return [truth.measurement(stage, name, top).time_s for name in ("forward", "backward")]


def _run(
    options: RankOptions,
    session: _Session,
    listener: PeerListener,
    node: tuple[float, int, list[str]],
) -> None:
    time_scale, stages, uuids = node
    stage = options.rank % stages
    gpu_index = options.rank % len(uuids) if options.gpu_index is None else options.gpu_index
    session.send(
        "hello",
        rank=options.rank,
        stages=stages,
        time_scale=time_scale,
        gpu_uuid=uuids[gpu_index],
        pod=options.pod[:253],
        ip=options.advertise_ip,
        port=listener.port,
        max_clock_s=_max_clock_s(options, stage),
    )
    session.start()
    welcome = session.next()
    while welcome.kind == "ping":
        welcome = session.next()
    if welcome.kind == "reject":
        raise RankError(f"the coordinator refused rank {options.rank}: "
                        f"{welcome.get_str('reason')}", 2)  # fmt: skip
    if welcome.kind != "welcome":
        raise RankError(f"the coordinator sent {welcome.kind} before welcoming the rank", 2)
    config = SimConfig(
        nodes=(NodeSpec(options.sidecar[0], options.sidecar[1], options.state_dir),),
        pipelines=welcome.get_int("pipelines"),
        microbatches=welcome.get_int("microbatches"),
        iterations=welcome.get_int("iterations"),
        job_token="",
        namespace=options.namespace,
        max_lag_s=options.max_lag_s,
    )
    trainer = _RankTrainer(config, options, stage, options.rank // stages)
    trainer._stop = session.stop
    placement = trainer.placements[0]
    hooks = trainer._hooks(placement)
    try:
        _follow(options, session, listener, trainer, placement)
    finally:
        hooks.close()


def _follow(
    options: RankOptions,
    session: _Session,
    listener: PeerListener,
    trainer: _RankTrainer,
    placement: RankPlacement,
) -> None:
    """The rank's life after joining: one coordinator message at a time."""
    links: TcpLinks | None = None
    playing = False
    try:
        while True:
            message = session.next()
            kind = message.kind
            if kind == "ping":
                continue
            if kind == "fail":
                raise RankError(f"the job failed: {message.get_str('reason')}", 1)
            if kind == "abort":
                log.warning("attempt aborted: %s", message.get_str("reason"))
                if playing:
                    # The GPU waits for the job to come back: at maximum clock, as after an
                    # iteration.
                    trainer._rank_hooks[placement.rank].iteration_end()
                    playing = False
                if links is not None:
                    links.close()
                    links = None
                continue
            if kind == "setup":
                if links is not None:
                    links.close()
                generation = message.get_int("generation")
                next_ip, next_port = message.opt_str("next_ip"), message.opt_int("next_port")
                links = TcpLinks(
                    rank=options.rank,
                    generation=generation,
                    next_address=None
                    if next_ip is None or next_port is None
                    else (next_ip, next_port),
                    prev_rank=message.opt_int("prev_rank"),
                    listener=listener,
                    stop=session.stop,
                    fail=lambda line: session.inbox.put(RankError(line, 2)),
                )
                session.begin_attempt(generation)
                try:
                    links.connect(options.peer_timeout_s)
                except StoppedError:
                    continue
                except TimeoutError as exc:
                    raise RankError(str(exc), 1) from None
                session.send("ready", generation=generation)
                continue
            if kind == "finish":
                trainer.set_epoch(message.get_int("epoch_ns"))
                at = message.get_float("read_at_s")
                if playing:
                    trainer._rank_hooks[placement.rank].iteration_end(trainer._wall_ns(at))
                session.send("reading", iteration=message.get_int("iteration"),
                             energy_j=trainer.energy_at(at))  # fmt: skip
                return
            if kind != "start":
                raise RankError(f"unexpected {kind} from the coordinator", 2)
            if links is None or message.get_int("generation") != links.generation:
                continue  # a start of an attempt already aborted
            trainer.set_epoch(message.get_int("epoch_ns"))
            start = message.get_float("start_s")
            iteration = message.get_int("iteration")
            if playing:
                trainer._rank_hooks[placement.rank].iteration_end(trainer._wall_ns(start))
            session.send(
                "reading",
                iteration=iteration,
                energy_j=trainer.energy_at(message.get_float("read_at_s")),
            )
            playing = True
            try:
                end = trainer._play_iteration(placement, links, start, message.get_float("factor"))
            except StoppedError:
                if links.fatal is not None:
                    raise RankError(links.fatal, 2) from None
                continue
            session.send(
                "arrive",
                generation=links.generation,
                iteration=iteration,
                end_s=end,
                late=trainer.take_late(),
            )
    finally:
        if links is not None:
            links.close()
