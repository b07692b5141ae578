"""Profiling sessions: the energy estimator against the simulated GPU's ground truth, and the
HTTP endpoints' paths."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from perseus_profiles import StageProfile
from perseus_sidecar.api import JobAnnouncement, ProfilingRequest, RankRegistration
from perseus_sidecar.estimator import estimate_energy
from perseus_sidecar.gpu.simnode import perturbed_profile
from perseus_sidecar.gpu.simulated import SimulatedBackend
from perseus_sidecar.lockstate import LockState
from perseus_sidecar.node import Node
from perseus_sidecar.ranks import (
    BACKWARD_BEGIN,
    BACKWARD_END,
    FORWARD_BEGIN,
    FORWARD_END,
    ITERATION_END,
)

from .conftest import JOB, JOB_SHA, JOB_TOKEN, NAME, NS, OP, announce, node_of, register

GPU0 = "GPU-sim-n1-0"


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 1_700_000_000.0

    def time(self) -> float:
        return self.now_s

    def time_ns(self) -> int:
        return int(self.now_s * 1e9)


def _play(
    node: Node,
    backend: SimulatedBackend,
    truth: StageProfile,
    stage: int,
    clock: FakeClock,
    iterations: int,
    poll_s: float = 0.002,
) -> None:
    """Play `iterations` of one stage on GPU0 the way the simulated trainer does (work recorded
    in the driver's energy curve at the locked clock, blocking power in between), emitting the
    events and polling the energy counter as the sidecar's sampler would."""
    (rank,) = node.ranks.values()
    gpu = backend.gpu(GPU0)
    rng = random.Random(3)
    order = [(True, 0), (True, 1), (False, 0), (True, 2), (False, 1), (True, 3), (False, 2)]
    order += [(False, 3)]

    def advance(duration_s: float) -> None:
        end = clock.now_s + duration_s
        while clock.now_s < end:
            clock.now_s = min(end, clock.now_s + poll_s)
            node.sample_energy()

    for _ in range(iterations):
        for forward, m in order:
            advance(rng.uniform(0.0, 0.04))  # waiting on the neighbours: blocking power
            rank.on_event(FORWARD_BEGIN if forward else BACKWARD_BEGIN, m, clock.time_ns())
            clock_mhz = gpu.effective_clock_mhz()
            truth_m = truth.measurement(stage, "forward" if forward else "backward", clock_mhz)
            start_s = backend.settings.now_s()
            gpu.record_work(start_s, truth_m.time_s, truth_m.energy_j)
            advance(truth_m.time_s)
            rank.on_event(FORWARD_END if forward else BACKWARD_END, m, clock.time_ns())
        advance(rng.uniform(0.01, 0.05))
        rank.on_event(ITERATION_END, -1, clock.time_ns())


def test_profiled_energy_matches_the_simulated_ground_truth(
    profile: StageProfile, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock()
    monkeypatch.setattr("perseus_sidecar.gpu.simulated.time.time", clock.time)
    monkeypatch.setattr("perseus_sidecar.profiling.time.time_ns", clock.time_ns)
    backend = SimulatedBackend(
        profile,
        1,
        tmp_path / "sim",
        node_name="n1",
        blocking_power_w=83.64,
        energy_update_interval_s=0.05,
        perturbation=0.03,
        seed=11,
    )
    truth = perturbed_profile(profile, 0.03, 11)
    node = Node(
        backend=backend,
        lock_state=LockState(tmp_path / "state"),
        operator_token="x" * 32,
        node_name="n1",
    )
    node.discover()
    node.announce(
        NS,
        NAME,
        JobAnnouncement.model_validate(
            {
                "token_sha256": JOB_SHA,
                "pods": [
                    {
                        "namespace": NS,
                        "name": "p",
                        "uid": "u",
                        "ip": "x",
                        "host_network": True,
                        "gpu_uuids": [GPU0],
                    }
                ],
            }
        ),
    )
    stage = 3
    node.register(
        RankRegistration(
            namespace=NS,
            pod="p",
            rank=3,
            pipeline_rank=stage,
            data_rank=0,
            tensor_rank=0,
            gpu_uuid=GPU0,
        ),
        JOB_TOKEN,
        None,
    )
    freqs = [profile.frequencies_mhz[0], profile.frequencies_mhz[20]]
    session = node.start_profiling(
        NS, NAME, ProfilingRequest(frequencies_mhz=freqs, iterations_per_frequency=12)
    )
    _play(node, backend, truth, stage, clock, iterations=1 + 2 * (1 + 12))
    status = session.status()
    assert status.state == "done"
    assert backend.locked_sm_clock_mhz(GPU0) is None  # no schedule: released to the driver
    assert len(status.measurements) == 4
    for m in status.measurements:
        assert m.pipeline_rank == stage
        true = truth.measurement(stage, m.instruction, m.frequency_mhz)
        assert m.samples == 48
        assert m.time_s == pytest.approx(true.time_s, rel=1e-3)
        # within 2% of the truth, and the reported uncertainty is honest about the error
        assert m.energy_j == pytest.approx(true.energy_j, rel=0.02)
        assert abs(m.energy_j - true.energy_j) < 4 * m.energy_stderr_j + 0.005 * true.energy_j
    assert status.blocking_power_w == pytest.approx(83.64, rel=0.05)


def test_estimator_needs_enough_data() -> None:
    assert estimate_energy([], [(0, 0)] * 10) is None
    assert estimate_energy([(True, 0, 10)], [(0, 0), (5, 1)]) is None
    samples = [(i * 50, i * 10) for i in range(20)]
    assert estimate_energy([(True, 0, 100), (True, 200, 300)], samples) is None  # no backward


def test_profiling_endpoints(
    client: TestClient, sim_backend: SimulatedBackend, profile: StageProfile
) -> None:
    url = f"/v1/jobs/{NS}/{NAME}/profiling"
    body = {"frequencies_mhz": [profile.frequencies_mhz[2]], "iterations_per_frequency": 2}
    assert client.post(url, json=body, headers=OP).status_code == 404  # no such job
    announce(client)
    r = client.post(url, json=body, headers=OP)
    assert r.status_code == 409 and "no registered rank" in r.text
    assert client.get(url, headers=OP).status_code == 404
    rank_id = register(client)
    bad = {"frequencies_mhz": [1], "iterations_per_frequency": 2}
    assert client.post(url, json=bad, headers=OP).status_code == 422
    r = client.post(url, json=body, headers=OP)
    assert r.status_code == 202, r.text
    assert r.json()["state"] == "running" and r.json()["ranks_total"] == 1
    assert client.post(url, json=body, headers=OP).status_code == 409
    events = [
        {"kind": "IE", "microbatch": -1, "t_ns": time.time_ns()},
        {"kind": "FB", "microbatch": 0, "t_ns": time.time_ns()},
    ]
    client.post(f"/v1/ranks/{rank_id}/events", json={"events": events}, headers=JOB)
    assert sim_backend.locked_sm_clock_mhz(GPU0) == profile.frequencies_mhz[2]
    assert node_of(client).ranks[rank_id].controlled
    r = client.delete(url, headers=OP)
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    assert sim_backend.locked_sm_clock_mhz(GPU0) is None
    assert client.delete(url, headers=OP).status_code == 404


def test_profiling_runs_to_completion_over_http(
    make_client: Callable[..., TestClient], profile: StageProfile, sim_backend: SimulatedBackend
) -> None:
    client = make_client(energy_poll_s=0.001)
    announce(client)
    rank_id = register(client)
    url = f"/v1/jobs/{NS}/{NAME}/profiling"
    body = {
        "frequencies_mhz": [profile.frequencies_mhz[0], profile.frequencies_mhz[1]],
        "iterations_per_frequency": 1,
        "warmup_iterations": 0,
    }
    client.post(url, json=body, headers=OP)
    t = time.time_ns()
    for _ in range(3):
        events = [
            {"kind": "FB", "microbatch": 0, "t_ns": t},
            {"kind": "FE", "microbatch": 0, "t_ns": t + 10_000_000},
            {"kind": "BB", "microbatch": 0, "t_ns": t + 20_000_000},
            {"kind": "BE", "microbatch": 0, "t_ns": t + 40_000_000},
            {"kind": "IE", "microbatch": -1, "t_ns": t + 50_000_000},
        ]
        client.post(f"/v1/ranks/{rank_id}/events", json={"events": events}, headers=JOB)
        t += 60_000_000
    status = client.get(url, headers=OP).json()
    assert status["state"] == "done"
    assert status["ranks_done"] == 1
    assert not node_of(client).ranks[rank_id].controlled
    assert sim_backend.locked_sm_clock_mhz(GPU0) is None
    # a rank registering after the session finished is not drawn into it
    late = register(client, rank=1, gpu="GPU-sim-n1-1")
    assert not node_of(client).ranks[late].controlled
    assert client.get(url, headers=OP).json()["state"] == "done"


def test_restarted_rank_resumes_its_profiling(client: TestClient, profile: StageProfile) -> None:
    announce(client)
    rank_id = register(client)
    url = f"/v1/jobs/{NS}/{NAME}/profiling"
    body = {"frequencies_mhz": list(profile.frequencies_mhz[:3]), "iterations_per_frequency": 1}
    client.post(url, json=body, headers=OP)
    node = node_of(client)
    progress = node.ranks[rank_id].profiling
    assert progress is not None
    events = [{"kind": "IE", "microbatch": -1, "t_ns": time.time_ns() + i} for i in range(3)]
    client.post(f"/v1/ranks/{rank_id}/events", json={"events": events}, headers=JOB)
    assert progress.index == 1
    assert register(client) == rank_id  # the process restarted and registered again
    assert node.ranks[rank_id].profiling is progress
