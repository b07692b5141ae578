"""The simulated pipeline trainer: P data-parallel pipelines x S stages, one thread per rank,
playing synchronous 1F1B on simulated GPUs and calling the real training hooks; interleaved 1F1B
(Megatron-LM's) when the ground-truth profile has v > 1 model chunks per stage.

Each rank follows its stage's order, waits for the upstream activation (forward) or the
downstream gradient (backward), reads the clock its simulated GPU is locked to, and "runs" the
instruction for the ground-truth profile's time at that clock (of its stage's chunk), recording
its energy on the GPU.
All ranks meet at an all-reduce barrier at the end of each iteration.

Timeline. The GPUs' work follows a simulated timeline paced to the wall clock: an instruction
starts when its dependencies end on that timeline, not when a thread happens to wake up, as a real
GPU runs its queued kernels regardless of host jitter. A thread that wakes more than `max_lag_s`
late really starts late (the host fell behind its queue); such starts are counted, and the
iteration time reported is measured on the wall clock, so an overloaded host shows as lost
fidelity. A clock the sidecar applies while an instruction runs takes over the rest of its
work from the begin plus the sidecar's wall-clock reaction time: the time scale compresses GPU
time but not the sidecar's latency, which must not be magnified into simulated seconds at the
wrong clock. Events carry the timeline's timestamps, so the sidecar times the GPUs' work, not
the threads' wake-up jitter.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import perseus_hooks as hooks_mod
from perseus_hooks.pipeline import Instruction, iteration_time_s, pipeline_order
from perseus_profiles import INSTRUCTIONS, StageProfile
from perseus_sidecar.gpu.simnode import NodeSettings, SimulatedGpu, open_node
from perseus_sim.links import Barrier, Links, QueueLinks, StoppedError
from perseus_sim.spec import (
    Crash,
    IterationResult,
    NodeSpec,
    RankPlacement,
    SimConfig,
    SimulationError,
)

__all__ = ["SimTrainer"]

log = logging.getLogger(__name__)

_CHUNK_S = 0.1
"""Longest uninterrupted sleep, so a stop request is noticed promptly."""
_CLOCK_CHECKS_S = (0.001, 0.003, 0.01)
"""When, after an instruction's begin event (wall seconds), to look for the sidecar's clock."""


@dataclass
class _Node:
    spec: NodeSpec
    settings: NodeSettings
    truth: StageProfile
    gpus: list[SimulatedGpu]
    offset_s: float = 0.0
    """Node simulated time = trainer timeline + offset."""
    table: dict[tuple[int, bool, int], tuple[float, float]] = field(default_factory=dict)
    """(unit = stage * chunks + chunk, forward, clock) -> (time, energy) of the ground truth."""


class SimTrainer:
    """Attach to the simulated nodes, place the ranks, run; see the module doc."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.nodes: list[_Node] = []
        for spec in config.nodes:
            try:
                settings, truth, gpus = open_node(spec.state_dir)
            except Exception as exc:
                raise SimulationError(str(exc)) from None
            self.nodes.append(_Node(spec, settings, truth, gpus))
        first = self.nodes[0]
        self.time_scale = first.settings.time_scale
        self.stages = first.truth.num_stages
        for node in self.nodes[1:]:
            if node.settings.time_scale != self.time_scale:
                raise SimulationError(
                    f"every node needs the same time scale: {node.spec.state_dir} has "
                    f"{node.settings.time_scale}, {first.spec.state_dir} has {self.time_scale}"
                )
            if node.truth.num_stages != self.stages:
                raise SimulationError(
                    f"every node's profile needs the same stages: {node.spec.state_dir} has "
                    f"{node.truth.num_stages}, {first.spec.state_dir} has {self.stages}"
                )
        self.chunks = first.truth.chunks
        for node in self.nodes[1:]:
            if node.truth.chunks != self.chunks:
                raise SimulationError(
                    f"every node's profile needs the same chunks per stage: {node.spec.state_dir}"
                    f" has {node.truth.chunks}, {first.spec.state_dir} has {self.chunks}"
                )
        for node in self.nodes:
            for u, per_kind in enumerate(node.truth.options):
                for i, _ in enumerate(INSTRUCTIONS):
                    for m in per_kind[i]:
                        node.table[(u, i == 0, m.frequency_mhz)] = (m.time_s, m.energy_j)
        try:
            self.orders = pipeline_order(self.stages, config.microbatches, self.chunks)
        except ValueError as exc:
            raise SimulationError(str(exc)) from None
        self.placements = self._place()
        self._stop = threading.Event()
        self._errors: list[BaseException] = []
        self._results: list[IterationResult] = []
        self._late = 0
        self._late_lock = threading.Lock()
        self._on_iteration: Callable[[IterationResult], None] | None = None
        self._acts: list[list[queue.SimpleQueue[tuple[int, float]]]] = []
        self._grads: list[list[queue.SimpleQueue[tuple[int, float]]]] = []
        self._rank_hooks: dict[int, hooks_mod.Hooks] = {}
        self._epoch_wall_s = 0.0
        self._closed: queue.SimpleQueue[tuple[float, float, int, float]] = queue.SimpleQueue()
        self._epoch_wall_ns = 0
        self._iteration_start = 0.0
        self._wall_start = 0.0
        self._energy_start = 0.0
        self._barrier = Barrier(len(self.placements), self._close_iteration)

    # Setup -----------------------------------------------------------------------------------

    def _place(self) -> list[RankPlacement]:
        needed = self.config.pipelines * self.stages
        available = sum(len(n.gpus) for n in self.nodes)
        if needed > available:
            raise SimulationError(
                f"{self.config.pipelines} pipelines x {self.stages} stages need {needed} GPUs; "
                f"the nodes have {available}"
            )
        slots = [(k, gpu) for k, node in enumerate(self.nodes) for gpu in node.gpus]
        placements = []
        for rank in range(needed):
            node_index, gpu = slots[rank]
            placements.append(
                RankPlacement(
                    rank=rank,
                    data_rank=rank // self.stages,
                    stage=rank % self.stages,
                    node=node_index,
                    gpu_index=gpu.index,
                    gpu_uuid=gpu.uuid,
                )
            )
        return placements

    @functools.cached_property
    def expected_per_pipeline_s(self) -> list[float]:
        """Each pipeline's all-max-clock iteration time (no straggler)."""
        return [self._all_max_time_s(p) for p in range(self.config.pipelines)]

    def _all_max_time_s(self, pipeline: int) -> float:
        nodes = {p.stage: self.nodes[p.node] for p in self.placements if p.data_rank == pipeline}

        def duration(stage: int, instruction: Instruction) -> float:
            node = nodes[stage]
            unit = stage * self.chunks + instruction[2]
            return node.table[(unit, instruction[0], node.truth.max_frequency_mhz)][0]

        return iteration_time_s(self.orders, duration)

    def expected_s(self, iteration: int) -> float:
        """All-max-clock iteration time, with the stragglers active at `iteration`."""
        return max(
            t * self.config.straggle_factor(p, iteration)
            for p, t in enumerate(self.expected_per_pipeline_s)
        )

    def pods_by_node(self) -> list[list[dict[str, object]]]:
        """Each node's pods as the sidecar's job announcement lists them (one pod per rank, its
        GPU the one this simulation, playing the kubelet, placed it on)."""
        out: list[list[dict[str, object]]] = [[] for _ in self.nodes]
        for p in self.placements:
            ip = self.config.pod_ip(p.rank)
            out[p.node].append(
                {
                    "namespace": self.config.namespace,
                    "name": self.config.pod_name(p.rank),
                    "uid": f"sim-{self.config.job}-{p.rank}",
                    "ip": ip or self.nodes[p.node].spec.host,
                    "host_network": ip is None,
                    "gpu_uuids": [p.gpu_uuid],
                }
            )
        return out

    def _hooks(self, p: RankPlacement) -> hooks_mod.Hooks:
        spec = self.nodes[p.node].spec
        return self._register(
            p,
            host=spec.host,
            port=spec.port,
            namespace=self.config.namespace,
            pod=self.config.pod_name(p.rank),
            job_token=self.config.job_token,
            source_ip=self.config.pod_ip(p.rank),
        )

    def _register(self, p: RankPlacement, **where: Any) -> hooks_mod.Hooks:
        """Hooks for rank `p`'s identity (rank, stage, data rank, GPU), registered where
        `where` says (sidecar address, pod, credentials, source address), and kept as the
        rank's."""
        self._rank_hooks[p.rank] = hooks = hooks_mod.register(
            rank=p.rank,
            pipeline_rank=p.stage,
            data_rank=p.data_rank,
            tensor_rank=0,
            gpu_uuid=p.gpu_uuid,
            sync=None,
            make_default=False,
            **where,
        )
        return hooks

    # Timeline --------------------------------------------------------------------------------

    def _now(self) -> float:
        return (time.time() - self._epoch_wall_s) / self.time_scale

    def _wall_ns(self, t: float) -> int:
        """The wall-clock instant of timeline time `t`, for the events' timestamps: the
        sidecar must see the simulated GPUs' timeline, not the threads' wake-up jitter
        magnified by the time scale."""
        return self._epoch_wall_ns + round(t * self.time_scale * 1e9)

    def _sleep_until(self, t: float) -> None:
        while True:
            if self._stop.is_set():
                raise StoppedError
            left_s = self._epoch_wall_s + t * self.time_scale - time.time()
            if left_s <= 0:
                return
            time.sleep(min(left_s, _CHUNK_S))

    def _sleep_wall(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if self._stop.is_set():
                raise StoppedError
            time.sleep(min(left, _CHUNK_S))

    # Running ---------------------------------------------------------------------------------

    def run(
        self, on_iteration: Callable[[IterationResult], None] | None = None
    ) -> list[IterationResult]:
        """Run the configured iterations; `on_iteration` sees each result as it completes."""
        self._on_iteration = on_iteration
        hooks = {p.rank: self._hooks(p) for p in self.placements}
        deadline = time.monotonic() + self.config.connect_timeout_s
        missing = [
            r for r, h in hooks.items() if not h.wait_connected(max(deadline - time.monotonic(), 0))
        ]
        if missing:
            log.warning(
                "ranks %s have no event stream to their sidecar yet; training starts anyway",
                missing,
            )
        # One queue per (pipeline, stage, chunk): the input of that model piece.
        pieces = range(self.stages * self.chunks)
        self._acts = [[queue.SimpleQueue() for _ in pieces] for _ in range(self.config.pipelines)]
        self._grads = [[queue.SimpleQueue() for _ in pieces] for _ in range(self.config.pipelines)]
        self._epoch_wall_ns = time.time_ns()
        self._epoch_wall_s = self._epoch_wall_ns / 1e9
        for node in self.nodes:
            node.offset_s = (self._epoch_wall_s - node.settings.epoch_wall_s) / self.time_scale
        start = self._now() + 0.02 / self.time_scale
        self._iteration_start = start
        self._wall_start = self._epoch_wall_s + start * self.time_scale
        self._energy_start = self._energy_at(start)
        threads = [
            threading.Thread(
                target=self._guard, args=(p, hooks[p.rank], start), name=f"sim-rank{p.rank}"
            )
            for p in self.placements
        ]
        threads.append(threading.Thread(target=self._guard_report, name="sim-reporter"))
        for t in threads:
            t.start()
        try:
            for t in threads:
                while t.is_alive():
                    t.join(_CHUNK_S)
        except KeyboardInterrupt:
            self._stop.set()
            for t in threads:
                t.join()
            raise
        if self._errors:
            raise self._errors[0]
        return list(self._results)

    def stop(self) -> None:
        self._stop.set()

    def _guard_report(self) -> None:
        try:
            self._report()
        except BaseException as exc:
            self._errors.append(exc)
            self._stop.set()

    def _guard(self, p: RankPlacement, hooks: hooks_mod.Hooks, start: float) -> None:
        try:
            self._run_rank(p, hooks, start)
        except StoppedError:
            pass
        except BaseException as exc:  # a broken rank stops the whole simulation
            self._errors.append(exc)
            self._stop.set()

    def _run_rank(self, p: RankPlacement, hooks: hooks_mod.Hooks, start: float) -> None:
        links = QueueLinks(
            p.stage,
            self.chunks,
            acts=self._acts[p.data_rank],
            grads=self._grads[p.data_rank],
            barrier=self._barrier,
            stop=self._stop,
        )
        crashes = {c.at_iteration: c for c in self.config.crashes if c.rank == p.rank}
        try:
            for iteration in range(self.config.iterations):
                crash = crashes.get(iteration)
                factor = self.config.straggle_factor(p.data_rank, iteration)
                end = self._play_iteration(
                    p,
                    links,
                    start,
                    factor,
                    pause=None if crash is None else functools.partial(self._crash, p, crash),
                )
                start = links.barrier(end)
                self._rank_hooks[p.rank].iteration_end(self._wall_ns(start))
        finally:
            self._rank_hooks[p.rank].close()

    def _crash(self, p: RankPlacement, crash: Crash, prev_end: float) -> float:
        """Rank `p` dies (its event stream closes) and comes back after `crash.down_s`,
        registering again; returns when its work may go on."""
        log.warning("rank %d crashes in iteration %d", p.rank, crash.at_iteration)
        self._rank_hooks[p.rank].close(0.0)
        self._sleep_wall(crash.down_s)
        self._hooks(p).wait_connected(self.config.connect_timeout_s)
        return max(prev_end, self._now())

    def _play_iteration(
        self,
        p: RankPlacement,
        links: Links,
        start: float,
        factor: float,
        *,
        pause: Callable[[float], float] | None = None,
    ) -> float:
        """Play rank `p`'s stage order of one iteration from `start` (its GPU `factor` times
        slower), taking each dependency from and handing each result to `links`; returns the
        end of its last instruction. `pause` (the in-process crash) runs halfway through."""
        node = self.nodes[p.node]
        gpu = node.gpus[p.gpu_index]
        order = self.orders[p.stage]
        max_lag = self.config.max_lag_s / self.time_scale
        prev_end = start
        for index, (forward, m, chunk) in enumerate(order):
            if pause is not None and index == len(order) // 2:
                prev_end = pause(prev_end)
            ready = max(prev_end, links.receive(forward, m, chunk))
            begin = max(ready, self._now() - max_lag)
            if begin > ready:
                with self._late_lock:
                    self._late += 1
            self._sleep_until(begin)
            hooks = self._rank_hooks[p.rank]
            kind: hooks_mod.InstructionKind = "forward" if forward else "backward"
            hooks.instruction_begin(kind, m, self._wall_ns(begin), chunk=chunk)
            unit = p.stage * self.chunks + chunk
            end = self._play(
                node, gpu, (unit, forward), factor=factor, begin=begin, sent_wall_s=time.time()
            )
            hooks.instruction_end(kind, m, self._wall_ns(end), chunk=chunk)
            links.send(forward, m, end, chunk)
            prev_end = end
        return prev_end

    def _play(
        self,
        node: _Node,
        gpu: SimulatedGpu,
        what: tuple[int, bool],
        *,
        factor: float,
        begin: float,
        sent_wall_s: float,
    ) -> float:
        """Run one instruction (`what`: its stage's chunk as a profile unit, and its kind) from
        `begin` on the timeline at the clock the GPU is locked to,
        recording its energy; returns its end. A clock the sidecar applies meanwhile (seen by
        polling, soon after the begin event and at the end) takes over the rest of the work. It
        counts from `begin` plus the sidecar's wall-clock reaction time, unscaled: the time
        scale compresses GPU work, not the sidecar's latency, which must not be magnified."""
        unit, forward = what
        clock = gpu.effective_clock_mhz()
        time_s, energy_j = node.table[(unit, forward, clock)]
        segment, left = begin, 1.0  # the fraction of the work left at `segment`
        end = begin + time_s * factor
        gpu.record_work(begin + node.offset_s, time_s * factor, energy_j * factor)
        checks = [sent_wall_s + delay_s for delay_s in _CLOCK_CHECKS_S]
        while True:
            check_at = (checks.pop(0) - self._epoch_wall_s) / self.time_scale if checks else end
            target = min(end, check_at)
            self._sleep_until(target)
            now_clock = gpu.effective_clock_mhz()
            if now_clock != clock:
                at = min(max(begin + (time.time() - sent_wall_s), segment), end)
                # a clock seen at the very end leaves nothing, not a rounding error below zero
                left = max(left - (at - segment) / (time_s * factor), 0.0)
                clock, segment = now_clock, at
                time_s, energy_j = node.table[(unit, forward, clock)]
                end = at + left * time_s * factor
                gpu.record_work(
                    at + node.offset_s, left * time_s * factor, left * energy_j * factor
                )
            elif target >= end:
                return end

    def _energy_at(self, t: float) -> float:
        return sum(
            self.nodes[p.node].gpus[p.gpu_index].energy_j(t + self.nodes[p.node].offset_s)
            for p in self.placements
        )

    def _close_iteration(self, latest_end: float) -> float:
        """Run by the last rank to reach the barrier: wait out the all-reduce and return the
        next iteration's start on the timeline. Only the GPUs' energy is read here; reporting
        goes to the reporter thread, so that no rank starts late for it."""
        next_start = latest_end + self.config.allreduce_s
        self._sleep_until(next_start)
        wall_s = time.time()
        with self._late_lock:
            late, self._late = self._late, 0
        self._closed.put((next_start, wall_s, late, self._energy_at(next_start)))
        return next_start

    def _report(self) -> None:
        """The reporter thread: one result per closed iteration."""
        for iteration in range(self.config.iterations):
            while True:
                try:
                    next_start, wall_s, late, energy = self._closed.get(timeout=_CHUNK_S)
                    break
                except queue.Empty:
                    if self._stop.is_set():
                        return
            result = IterationResult(
                iteration=iteration,
                time_s=(wall_s - self._wall_start) / self.time_scale,
                timeline_s=next_start - self._iteration_start,
                expected_s=self.expected_s(iteration) + self.config.allreduce_s,
                energy_j=energy - self._energy_start,
                late_starts=late,
            )
            self._results.append(result)
            self._iteration_start = next_start
            self._wall_start = wall_s
            self._energy_start = energy
            if self._on_iteration is not None:
                self._on_iteration(result)
