"""The profiling sweep: clock selection, chunked requests, early stop, the assembled profile."""

from __future__ import annotations

import itertools

import pytest

from perseus_operator.model import Measure
from perseus_operator.profiling import ProfileSession, sweep_clocks
from perseus_profiles import ProfileError
from perseus_sidecar.api import ProfilingMeasurement, ProfilingRequest, ProfilingStatus

CLOCKS = frozenset(range(900, 1411, 15))


def energy_j(stage: int, clock: int) -> float:
    """Distinct stages; energy falls down to 1200 MHz, then rises."""
    return (stage + 1) * (10.0 + abs(clock - 1200) / 100)


class Sidecars:
    def __init__(self, stages: int) -> None:
        self.stages = stages
        self.requests: list[list[int]] = []
        self.pending: ProfilingRequest | None = None
        self.polls = 0
        self.lose_next = False

    async def start_profiling(
        self, address: str, namespace: str, name: str, request: ProfilingRequest
    ) -> None:
        self.requests.append(list(request.frequencies_mhz))
        self.pending = request

    async def profiling(self, address: str, namespace: str, name: str) -> ProfilingStatus | None:
        if self.lose_next:
            self.lose_next = False
            return None
        assert self.pending is not None
        self.polls += 1
        done = self.polls % 2 == 0  # "running" once, then "done"
        ms = [
            ProfilingMeasurement(
                pipeline_rank=s,
                instruction=instr,
                frequency_mhz=f,
                time_s=0.1 * 1410 / f,
                time_stderr_s=0.001,
                energy_j=energy_j(s, f) * (1 if instr == "forward" else 2),
                energy_stderr_j=0.1,
                samples=3,
            )
            for s in range(self.stages)
            for instr in ("forward", "backward")
            for f in self.pending.frequencies_mhz
        ]
        return ProfilingStatus(
            namespace=namespace,
            name=name,
            state="done" if done else "running",
            frequencies_mhz=list(self.pending.frequencies_mhz),
            iterations_per_frequency=self.pending.iterations_per_frequency,
            warmup_iterations=1,
            ranks_done=1,
            ranks_total=1,
            measurements=ms if done else [],
            blocking_power_w=80.0 + len(self.requests) if done else None,
        )


def test_sweep_clocks_range_and_step() -> None:
    measure = Measure.model_validate(
        {"frequencies": {"minMHz": 1000, "maxMHz": 1300, "stepMHz": 30}}
    )
    clocks = sweep_clocks(CLOCKS, measure)
    assert clocks[0] == 1290 and clocks[-1] >= 1000
    assert all(a - b >= 30 for a, b in itertools.pairwise(clocks))
    assert sweep_clocks(CLOCKS, Measure())[0] == 1410
    with pytest.raises(ProfileError, match="no supported clock"):
        sweep_clocks(CLOCKS, Measure.model_validate({"frequencies": {"minMHz": 1, "maxMHz": 2}}))


async def test_sweep_stops_early_once_energy_keeps_rising() -> None:
    measure = Measure.model_validate({"iterationsPerFrequency": 2, "earlyStopAfter": 3})
    session = ProfileSession.create(CLOCKS, measure, stages=2)
    sidecars = Sidecars(stages=2)
    addresses = {"n0": "h:1"}
    for _ in range(200):
        if await session.step(sidecars, addresses, "ns", "p"):
            break
    assert session.stopped_early
    assert all(len(chunk) <= 3 for chunk in sidecars.requests)
    assert min(session.done_clocks) < 1200 and min(session.done_clocks) > 900
    profile = session.result()
    assert profile.num_stages == 2
    assert profile.frequencies_mhz == tuple(sorted(session.done_clocks, reverse=True))
    best = min(profile.instruction_options(1, "forward"), key=lambda m: m.energy_j)
    assert best.frequency_mhz == 1200
    assert "stopped early" in session.progress()
    chunks = len(sidecars.requests)
    assert session.blocking_power_w() == pytest.approx(80 + (chunks + 1) / 2)


async def test_lost_request_is_redone() -> None:
    session = ProfileSession.create(CLOCKS, Measure(), stages=1)
    sidecars = Sidecars(stages=1)
    assert not await session.step(sidecars, {"n": "h"}, "ns", "p")
    first = sidecars.requests[-1]
    sidecars.lose_next = True  # the sidecar restarted mid-chunk
    assert not await session.step(sidecars, {"n": "h"}, "ns", "p")
    assert not await session.step(sidecars, {"n": "h"}, "ns", "p")
    assert sidecars.requests[-1] == first and session.done_clocks == []


def test_result_without_measurements_is_an_error() -> None:
    session = ProfileSession.create(CLOCKS, Measure(), stages=1)
    with pytest.raises(ProfileError, match="no clock has measurements"):
        session.result()
