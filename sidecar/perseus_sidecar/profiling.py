"""Profiling sessions: lock each requested clock in turn during real iterations of the job's ranks
on this node and measure every instruction's time (from events) and energy (estimated from the
coarse energy counter, see estimator.py).

Each rank moves through the clocks on its own iteration ends: its first iteration end starts the
session for it, then `warmup_iterations` are skipped and `iterations_per_frequency` measured per
clock. The clock stays locked for the whole period, idle time included, so the idle power
estimated alongside is the blocking power at that clock.

What one clock's measurement keeps is capped (instructions and counter samples), and its energy
is solved in a worker thread when the clock's period ends: the hot path only hands the data
over. `await ProfilingSession.settled()` before `status()` on the event loop."""

from __future__ import annotations

import asyncio
import math
import time
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from perseus_sidecar.api import ProfilingMeasurement, ProfilingRequest, ProfilingStatus
from perseus_sidecar.estimator import EnergyEstimate, estimate_energy

__all__ = [
    "MAX_INSTRUCTIONS",
    "MAX_SAMPLES",
    "FrequencyResult",
    "ProfilingSession",
    "RankProfiling",
]

MAX_INSTRUCTIONS = 50_000
"""Instructions measured per rank and clock (beyond: ignored); a few hundred are plenty."""
MAX_SAMPLES = 50_000
"""Energy counter updates kept per rank and clock (at 20 ms per update: over 15 minutes)."""
_ESTIMATOR = ThreadPoolExecutor(max_workers=1, thread_name_prefix="perseus-estimator")


@dataclass
class FrequencyResult:
    frequency_mhz: int
    forward_s: list[float]
    backward_s: list[float]
    estimate: Future[EnergyEstimate | None]

    @property
    def energy(self) -> EnergyEstimate | None:
        """The energy estimate (waits for the worker thread if it is still solving)."""
        return self.estimate.result()


@dataclass
class RankProfiling:
    """One rank's progress through a session; `samples` is filled by the session's sampler."""

    gpu_uuid: str
    pipeline_rank: int
    frequencies_mhz: tuple[int, ...]
    warmup_iterations: int
    iterations_per_frequency: int
    seconds_per_ns: float
    index: int = 0
    started: bool = False
    iterations: int = 0
    measure_start_ns: int | None = None
    instructions: list[tuple[bool, int, int]] = field(default_factory=list)
    samples: list[tuple[int, int]] = field(default_factory=list)
    last_poll_ns: int | None = None
    last_mj: int | None = None
    results: list[FrequencyResult] = field(default_factory=list)
    done: bool = False

    @property
    def clock_mhz(self) -> int:
        return self.frequencies_mhz[self.index]

    @property
    def measuring(self) -> bool:
        return self.measure_start_ns is not None

    def record_instruction(self, forward: bool, begin_ns: int, end_ns: int) -> None:
        if (
            self.measure_start_ns is not None
            and begin_ns >= self.measure_start_ns
            and len(self.instructions) < MAX_INSTRUCTIONS
        ):
            self.instructions.append((forward, begin_ns, end_ns))

    def record_energy(self, mj: int) -> None:
        """A counter reading; kept only when it moved, stamped midway since the last poll."""
        now = time.time_ns()
        if (
            self.last_mj is not None
            and mj != self.last_mj
            and self.last_poll_ns is not None
            and len(self.samples) < MAX_SAMPLES
        ):
            self.samples.append(((self.last_poll_ns + now) // 2, mj))
        self.last_mj = mj
        self.last_poll_ns = now

    def end_iteration(self, t_ns: int) -> int | None:
        """Count an iteration end; returns the clock to lock next, or None when finished."""
        if not self.started:
            self.started = True
            self._begin_frequency(t_ns)
            return self.clock_mhz
        self.iterations += 1
        if self.iterations == self.warmup_iterations:
            self.measure_start_ns = t_ns
        if self.iterations < self.warmup_iterations + self.iterations_per_frequency:
            return self.clock_mhz
        self._finish_frequency(t_ns)
        self.index += 1
        if self.index >= len(self.frequencies_mhz):
            self.done = True
            return None
        self._begin_frequency(t_ns)
        return self.clock_mhz

    def _begin_frequency(self, t_ns: int) -> None:
        self.iterations = 0
        self.instructions = []
        self.samples = []
        self.measure_start_ns = t_ns if self.warmup_iterations == 0 else None

    def _finish_frequency(self, t_ns: int) -> None:
        start = self.measure_start_ns if self.measure_start_ns is not None else t_ns
        samples = [s for s in self.samples if start <= s[0] <= t_ns]
        spn = self.seconds_per_ns
        self.results.append(
            FrequencyResult(
                frequency_mhz=self.clock_mhz,
                forward_s=[(e - b) * spn for f, b, e in self.instructions if f],
                backward_s=[(e - b) * spn for f, b, e in self.instructions if not f],
                estimate=_ESTIMATOR.submit(estimate_energy, self.instructions, samples, spn),
            )
        )
        self.instructions = []
        self.samples = []
        self.measure_start_ns = None


class ProfilingSession:
    def __init__(self, namespace: str, name: str, request: ProfilingRequest) -> None:
        self.namespace = namespace
        self.name = name
        self.request = request
        self.ranks: dict[str, RankProfiling] = {}
        self.cancelled = False

    def add_rank(
        self, rank_id: str, gpu_uuid: str, pipeline_rank: int, seconds_per_ns: float
    ) -> RankProfiling:
        rp = RankProfiling(
            gpu_uuid=gpu_uuid,
            pipeline_rank=pipeline_rank,
            frequencies_mhz=tuple(self.request.frequencies_mhz),
            warmup_iterations=self.request.warmup_iterations,
            iterations_per_frequency=self.request.iterations_per_frequency,
            seconds_per_ns=seconds_per_ns,
        )
        self.ranks[rank_id] = rp
        return rp

    @property
    def done(self) -> bool:
        return all(rp.done for rp in self.ranks.values())

    async def settled(self) -> None:
        """Wait (without blocking the loop) for the energy estimates still being solved."""
        pending = [
            asyncio.wrap_future(res.estimate)
            for rp in self.ranks.values()
            for res in rp.results
            if not res.estimate.done()
        ]
        if pending:
            await asyncio.gather(*pending)

    def active(self) -> list[RankProfiling]:
        if self.cancelled:
            return []
        return [rp for rp in self.ranks.values() if not rp.done]

    def status(self) -> ProfilingStatus:
        state = "cancelled" if self.cancelled else ("done" if self.done else "running")
        measurements, blocking_w = self._aggregate()
        return ProfilingStatus(
            namespace=self.namespace,
            name=self.name,
            state=state,
            frequencies_mhz=list(self.request.frequencies_mhz),
            iterations_per_frequency=self.request.iterations_per_frequency,
            warmup_iterations=self.request.warmup_iterations,
            ranks_done=sum(rp.done for rp in self.ranks.values()),
            ranks_total=len(self.ranks),
            measurements=measurements,
            blocking_power_w=blocking_w,
        )

    def _aggregate(self) -> tuple[list[ProfilingMeasurement], float | None]:
        """Pool ranks of the same stage: times are pooled samples; energies are the mean of the
        per-GPU estimates with their standard errors combined."""
        times: dict[tuple[int, str, int], list[float]] = defaultdict(list)
        energies: dict[tuple[int, str, int], list[tuple[float, float]]] = defaultdict(list)
        idle: list[float] = []
        for rp in self.ranks.values():
            for res in rp.results:
                for name, durations in (("forward", res.forward_s), ("backward", res.backward_s)):
                    key = (rp.pipeline_rank, name, res.frequency_mhz)
                    times[key].extend(durations)
                    if res.energy is not None:
                        est = res.energy
                        pair = (
                            (est.forward_j, est.forward_stderr_j)
                            if name == "forward"
                            else (est.backward_j, est.backward_stderr_j)
                        )
                        energies[key].append(pair)
                if res.energy is not None and res.energy.idle_w is not None:
                    idle.append(res.energy.idle_w)
        out: list[ProfilingMeasurement] = []
        for key in sorted(times, key=lambda k: (k[0], k[1] != "forward", -k[2])):
            durations = times[key]
            estimates = energies.get(key)
            if not durations or not estimates:
                continue
            n = len(durations)
            mean_s = sum(durations) / n
            std_s = math.sqrt(sum((d - mean_s) ** 2 for d in durations) / (n - 1)) if n > 1 else 0.0
            k = len(estimates)
            out.append(
                ProfilingMeasurement(
                    pipeline_rank=key[0],
                    instruction=key[1],
                    frequency_mhz=key[2],
                    time_s=mean_s,
                    time_stderr_s=std_s / math.sqrt(n),
                    energy_j=sum(e for e, _ in estimates) / k,
                    energy_stderr_j=math.sqrt(sum(s * s for _, s in estimates)) / k,
                    samples=n,
                )
            )
        return out, (sum(idle) / len(idle) if idle else None)
