"""Profiling a job through its sidecars: a downward clock sweep in chunks, with early stop.

Like the Perseus profiler, the sweep starts at the maximum clock and goes down; lower clocks stop
paying off at some point (the instruction gets so slow that static power dominates), so once
every stage's energy rose at `earlyStopAfter` clocks in a row the rest of the sweep is skipped.
Each chunk is one `ProfilingRequest` per sidecar; the session is polled by the reconcile loop and
never blocks it.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from perseus_operator.model import Measure
from perseus_profiles import INSTRUCTIONS, Measurement, ProfileError, StageProfile
from perseus_sidecar.api import ProfilingMeasurement, ProfilingRequest, ProfilingStatus

__all__ = ["ProfileSession", "ProfilingCalls", "sweep_clocks"]


class ProfilingCalls(Protocol):
    async def start_profiling(
        self, address: str, namespace: str, name: str, request: ProfilingRequest
    ) -> None: ...

    async def profiling(
        self, address: str, namespace: str, name: str
    ) -> ProfilingStatus | None: ...


def sweep_clocks(clocks: frozenset[int], measure: Measure) -> list[int]:
    """Supported clocks to visit, highest first, within the range and at least `step` apart."""
    rng = measure.frequencies
    pool = sorted(
        (c for c in clocks if rng is None or rng.min_mhz <= c <= rng.max_mhz), reverse=True
    )
    step = rng.step_mhz if rng is not None else 1
    out: list[int] = []
    for c in pool:
        if not out or out[-1] - c >= step:
            out.append(c)
    if not out:
        raise ProfileError("no supported clock lies in spec.profile.measure.frequencies")
    return out


@dataclass
class ProfileSession:
    plan: list[int]
    iterations: int
    early_stop_after: int
    stages: int
    done_clocks: list[int] = field(default_factory=list)
    in_flight: list[int] = field(default_factory=list)
    samples: dict[tuple[int, int, int], list[ProfilingMeasurement]] = field(default_factory=dict)
    stopped_early: bool = False
    blocking_samples_w: list[float] = field(default_factory=list)

    def blocking_power_w(self) -> float | None:
        """The sidecars' estimate of GPU power while waiting, averaged over chunks and nodes."""
        found = [w for w in self.blocking_samples_w if w > 0]
        return sum(found) / len(found) if found else None

    @classmethod
    def create(cls, clocks: frozenset[int], measure: Measure, *, stages: int) -> ProfileSession:
        return cls(
            plan=sweep_clocks(clocks, measure),
            iterations=measure.iterations_per_frequency,
            early_stop_after=measure.early_stop_after,
            stages=stages,
        )

    def progress(self) -> str:
        note = " (stopped early: energy kept rising)" if self.stopped_early else ""
        return f"profiled {len(self.done_clocks)} of {len(self.plan)} clocks{note}"

    def _remaining(self) -> list[int]:
        return [c for c in self.plan if c not in self.done_clocks and c not in self.in_flight]

    async def step(
        self, calls: ProfilingCalls, addresses: Mapping[str, str], namespace: str, name: str
    ) -> bool:
        """Advance the sweep; True when it is finished."""
        if self.in_flight:
            statuses = [await calls.profiling(a, namespace, name) for a in addresses.values()]
            if any(s is None for s in statuses):
                self.in_flight = []  # a sidecar restarted and lost the request: redo this chunk
                return False
            if not all(s is not None and s.state == "done" for s in statuses):
                return False
            for s in statuses:
                assert s is not None
                if s.blocking_power_w is not None:
                    self.blocking_samples_w.append(s.blocking_power_w)
                for m in s.measurements:
                    key = (m.pipeline_rank, INSTRUCTIONS.index(m.instruction), m.frequency_mhz)
                    self.samples.setdefault(key, []).append(m)
            self.done_clocks += self.in_flight
            self.in_flight = []
            if self._energy_keeps_rising():
                self.stopped_early = True
                return True
        chunk = self._remaining()[: self.early_stop_after]
        if not chunk:
            return True
        request = ProfilingRequest(frequencies_mhz=chunk, iterations_per_frequency=self.iterations)
        for address in addresses.values():
            await calls.start_profiling(address, namespace, name, request)
        self.in_flight = chunk
        return False

    def _stage_energy(self, stage: int, clock: int) -> float | None:
        total = 0.0
        for i in range(len(INSTRUCTIONS)):
            m = self._mean(stage, i, clock)
            if m is None:
                return None
            total += m.energy_j
        return total

    def _energy_keeps_rising(self) -> bool:
        n = self.early_stop_after
        if len(self.done_clocks) <= n:
            return False
        tail = self.done_clocks[-(n + 1) :]
        for stage in range(self.stages):
            energies = [self._stage_energy(stage, c) for c in tail]
            if any(e is None for e in energies):
                return False
            rising = itertools.pairwise(e for e in energies if e is not None)
            if not all(b > a for a, b in rising):
                return False
        return True

    def _mean(self, stage: int, instruction: int, clock: int) -> Measurement | None:
        found = self.samples.get((stage, instruction, clock))
        if not found:
            return None
        weight = sum(max(m.samples, 1) for m in found)
        time_s = sum(m.time_s * max(m.samples, 1) for m in found) / weight
        energy_j = sum(m.energy_j * max(m.samples, 1) for m in found) / weight
        return Measurement(clock, time_s, energy_j)

    def result(self) -> StageProfile:
        """The measured profile over the clocks every stage and instruction has."""
        clocks = [
            c
            for c in sorted(self.done_clocks, reverse=True)
            if all(
                self._mean(s, i, c) is not None
                for s in range(self.stages)
                for i in range(len(INSTRUCTIONS))
            )
        ]
        if not clocks:
            raise ProfileError("no clock has measurements for every stage")
        options = []
        for s in range(self.stages):
            per = []
            for i in range(len(INSTRUCTIONS)):
                found = [self._mean(s, i, c) for c in clocks]
                per.append(tuple(m for m in found if m is not None))
            options.append((per[0], per[1]))
        return StageProfile(tuple(options))
