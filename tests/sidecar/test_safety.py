"""Clock safety: the lock-state file, reset on start/stop/delete/timeout, re-apply on resume,
administrator locks left alone, backend failures contained; and the real process killed -9."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from perseus_profiles import StageProfile
from perseus_sidecar.app import create_app
from perseus_sidecar.gpu.base import GpuPermissionError
from perseus_sidecar.gpu.simnode import open_node
from perseus_sidecar.gpu.simulated import SimulatedBackend
from perseus_sidecar.lockstate import FILENAME, LockState

from .conftest import (
    JOB,
    JOB_SHA,
    JOB_TOKEN,
    NAME,
    NS,
    OP,
    OPERATOR_TOKEN,
    EventSocket,
    FakeBackend,
    announce,
    make_settings,
    node_of,
    register,
    schedule_body,
    wait_for,
)

GPU0, GPU1 = "GPU-sim-n1-0", "GPU-sim-n1-1"


def _fb(client: TestClient, rank_id: str, m: int = 0, kind: str = "FB") -> None:
    r = client.post(
        f"/v1/ranks/{rank_id}/events",
        json={"events": [{"kind": kind, "microbatch": m, "t_ns": time.time_ns()}]},
        headers=JOB,
    )
    assert r.status_code == 200, r.text


def _scheduled(client: TestClient, profile: StageProfile, clock_index: int = 3) -> str:
    announce(client)
    rank_id = register(client)
    body = schedule_body([(0, 0)], (profile.frequencies_mhz[clock_index],))
    assert client.put(f"/v1/jobs/{NS}/{NAME}/schedule", json=body, headers=OP).status_code == 200
    _fb(client, rank_id)
    return rank_id


def test_lock_state_file_round_trip_and_corruption(tmp_path: Path) -> None:
    state = LockState(tmp_path)
    state.add("GPU-a")
    state.add("GPU-b")
    state.discard("GPU-a")
    assert LockState(tmp_path).locked == {"GPU-b"}
    (tmp_path / FILENAME).write_text("{not json")
    corrupt = LockState(tmp_path)  # no exception: the node resets every locked GPU instead
    assert corrupt.unknown is not None and "not a lock-state file" in corrupt.unknown
    assert corrupt.locked == set()
    assert (tmp_path / (FILENAME + ".corrupt")).read_text() == "{not json"


def test_corrupt_lock_state_resets_every_locked_gpu_and_starts(
    make_client: Callable[..., TestClient],
    sim_backend: SimulatedBackend,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With the record unreadable nobody can tell a killed sidecar's locks from an
    administrator's: every locked GPU is reset (and logged), and the sidecar starts."""
    sim_backend.set_locked_sm_clock(GPU0, 1200)
    sim_backend.set_locked_sm_clock(GPU1, 1005)
    state = tmp_path / "state"
    state.mkdir()
    (state / FILENAME).write_text('{"locked_gpus": [')
    client = make_client()
    assert client.get("/healthz").status_code == 200
    assert sim_backend.locked_sm_clock_mhz(GPU0) is None
    assert sim_backend.locked_sm_clock_mhz(GPU1) is None
    resets = 'perseus_sidecar_clock_resets_total{reason="startup-unknown-owner"} 2.0'
    assert resets in client.get("/metrics").text
    assert any("cannot tell who locked" in r.getMessage() for r in caplog.records)
    fresh = LockState(state)
    assert fresh.unknown is None and fresh.locked == set()


def test_start_resets_only_what_a_killed_sidecar_locked(
    make_client: Callable[..., TestClient], sim_backend: SimulatedBackend, tmp_path: Path
) -> None:
    # A previous sidecar locked GPU0 and was SIGKILLed; an administrator locked GPU1 by hand.
    sim_backend.set_locked_sm_clock(GPU0, 1200)
    sim_backend.set_locked_sm_clock(GPU1, 1005)
    LockState(tmp_path / "state").add(GPU0)
    client = make_client()
    assert sim_backend.locked_sm_clock_mhz(GPU0) is None
    assert sim_backend.locked_sm_clock_mhz(GPU1) == 1005
    assert LockState(tmp_path / "state").locked == set()
    assert 'perseus_sidecar_clock_resets_total{reason="startup"} 1.0' in client.get("/metrics").text


def test_shutdown_resets_clocks(
    profile: StageProfile, sim_backend: SimulatedBackend, tmp_path: Path
) -> None:
    app = create_app(make_settings(tmp_path / "state"), sim_backend)
    with TestClient(app) as client:
        _scheduled(client, profile)
        assert sim_backend.locked_sm_clock_mhz(GPU0) == profile.frequencies_mhz[3]
    assert sim_backend.locked_sm_clock_mhz(GPU0) is None
    assert LockState(tmp_path / "state").locked == set()


def test_job_delete_and_pod_removal_reset_clocks(
    client: TestClient, sim_backend: SimulatedBackend, profile: StageProfile
) -> None:
    _scheduled(client, profile)
    assert sim_backend.locked_sm_clock_mhz(GPU0) is not None
    # re-announcing the job without the rank's pod drops the rank and resets its GPU
    announce(client, [("other-pod", "testclient")])
    assert sim_backend.locked_sm_clock_mhz(GPU0) is None
    client.delete(f"/v1/jobs/{NS}/{NAME}", headers=OP)
    _scheduled(client, profile)
    assert sim_backend.locked_sm_clock_mhz(GPU0) is not None
    client.delete(f"/v1/jobs/{NS}/{NAME}", headers=OP)
    assert sim_backend.locked_sm_clock_mhz(GPU0) is None


def test_silent_rank_is_reset_and_reapplied_when_events_resume(
    make_client: Callable[..., TestClient], sim_backend: SimulatedBackend, profile: StageProfile
) -> None:
    client = make_client(rank_timeout_s=0.2)
    rank_id = _scheduled(client, profile)
    target = profile.frequencies_mhz[3]
    assert sim_backend.locked_sm_clock_mhz(GPU0) == target
    wait_for(lambda: sim_backend.locked_sm_clock_mhz(GPU0) is None, timeout_s=3)
    timings = client.get(f"/v1/jobs/{NS}/{NAME}/timings", headers=OP).json()
    assert timings["ranks"][0]["stale"] is True
    _fb(client, rank_id, m=1)
    assert sim_backend.locked_sm_clock_mhz(GPU0) == target
    assert node_of(client).ranks[rank_id].stale is False


def test_observe_mode_ranks_never_time_out_into_resets(
    make_client: Callable[..., TestClient], sim_backend: SimulatedBackend
) -> None:
    client = make_client(rank_timeout_s=0.05)
    announce(client)
    rank_id = register(client)
    _fb(client, rank_id)
    node = node_of(client)
    assert node.check_timeouts(time.monotonic() + 10) == []
    assert sim_backend.locked_sm_clock_mhz(GPU0) is None


def test_administrator_lock_is_left_alone(
    client: TestClient, sim_backend: SimulatedBackend, profile: StageProfile
) -> None:
    sim_backend.set_locked_sm_clock(GPU0, 1005)
    rank_id = _scheduled(client, profile)
    _fb(client, rank_id, kind="IE", m=-1)
    assert sim_backend.locked_sm_clock_mhz(GPU0) == 1005
    client.delete(f"/v1/jobs/{NS}/{NAME}/schedule", headers=OP)
    client.post("/v1/clocks/reset", headers=OP)
    assert sim_backend.locked_sm_clock_mhz(GPU0) == 1005


def test_backend_failures_on_the_hot_path_are_contained(
    make_client: Callable[..., TestClient],
) -> None:
    fake = FakeBackend()
    client = make_client(fake)
    client.put(
        f"/v1/jobs/{NS}/{NAME}",
        json={
            "token_sha256": JOB_SHA,
            "pods": [
                {
                    "namespace": NS,
                    "name": "trainer-0",
                    "uid": "u",
                    "ip": "x",
                    "host_network": True,
                    "gpu_uuids": ["GPU-fake-0"],
                }
            ],
        },
        headers=OP,
    )
    rank_id = register(client, gpu="GPU-fake-0")
    body = schedule_body([(0, 0)], (1200,))
    client.put(f"/v1/jobs/{NS}/{NAME}/schedule", json=body, headers=OP)
    fake.fail = GpuPermissionError("no permission")
    _fb(client, rank_id)
    _fb(client, rank_id, m=1)
    text = client.get("/metrics").text
    assert 'perseus_sidecar_gpu_errors_total{error="GpuPermissionError"} 2.0' in text
    fake.fail = None
    _fb(client, rank_id)
    assert fake.locked["GPU-fake-0"] == 1200
    # a failing reset on delete is logged, not raised
    fake.fail = GpuPermissionError("no permission")
    assert client.delete(f"/v1/jobs/{NS}/{NAME}/schedule", headers=OP).status_code == 204
    fake.fail = None


def test_clock_only_set_when_it_changes(make_client: Callable[..., TestClient]) -> None:
    fake = FakeBackend()
    client = make_client(fake)
    client.put(
        f"/v1/jobs/{NS}/{NAME}",
        json={
            "token_sha256": JOB_SHA,
            "pods": [
                {
                    "namespace": NS,
                    "name": "trainer-0",
                    "uid": "u",
                    "ip": "x",
                    "host_network": True,
                    "gpu_uuids": ["GPU-fake-0"],
                }
            ],
        },
        headers=OP,
    )
    rank_id = register(client, gpu="GPU-fake-0")
    client.put(f"/v1/jobs/{NS}/{NAME}/schedule", json=schedule_body([(0, 0)], (1200,)), headers=OP)
    for m in (0, 1, 0, 1):
        _fb(client, rank_id, m=m)
    assert [c for c in fake.calls if c[0] == "lock"] == [("lock", "GPU-fake-0", 1200)]


def test_gpu_backend_failure_at_start_is_a_readiness_reason(
    make_client: Callable[..., TestClient],
) -> None:
    fake = FakeBackend()
    fake.fail = GpuPermissionError("NVML says no")
    client = make_client(fake)
    r = client.get("/v1/readyz")
    assert r.status_code == 503 and "NVML says no" in r.json()["reason"]
    r = client.get("/v1/gpus", headers=OP)
    assert r.status_code == 503 and "NVML says no" in r.json()["detail"]
    fake.fail = None  # the driver came back: readiness and the inventory recover
    assert client.get("/v1/readyz").status_code == 200
    assert len(client.get("/v1/gpus", headers=OP).json()["gpus"]) == 2


# ---- the real process, killed -9 ---------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def sidecar_cmd(tmp_path: Path) -> Iterator[Callable[[], subprocess.Popen[bytes]]]:
    token_file = tmp_path / "token"
    token_file.write_text(OPERATOR_TOKEN + "\n")
    port, event_port = _free_port(), _free_port()
    procs: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        exe = Path(sys.executable).with_name("perseus-sidecar")
        cmd = [
            str(exe),
            "--gpu-backend", "simulated", "--example", "gpt3-175b-a100", "--gpus", "2",
            "--host", "127.0.0.1", "--port", str(port), "--event-port", str(event_port),
            "--token-file", str(token_file), "--state-dir", str(tmp_path / "state"),
            "--node-name", "n1",
        ]  # fmt: skip
        # A shell's background job inherits SIGINT ignored (so does a sidecar started from
        # one); the tests send SIGINT as a terminal or kubelet would, to a default disposition.
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=_default_sigint,  # noqa: PLW1509 (only signal.signal, before exec)
        )
        procs.append(proc)
        start.base = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
        start.event_port = event_port  # type: ignore[attr-defined]
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            try:
                if httpx.get(f"{start.base}/v1/readyz", timeout=1).status_code == 200:  # type: ignore[attr-defined]
                    return proc
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError("sidecar did not become ready")

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _clock(tmp_path: Path) -> int | None:
    """GPU 0's locked clock as the simulated driver (shared with the trainer) holds it."""
    _, _, gpus = open_node(tmp_path / "state")
    return gpus[0].locked_sm_clock_mhz()


def test_sigkilled_sidecar_resets_on_restart(
    sidecar_cmd: Callable[[], subprocess.Popen[bytes]], tmp_path: Path, profile: StageProfile
) -> None:
    proc = sidecar_cmd()
    base = sidecar_cmd.base  # type: ignore[attr-defined]
    target = profile.frequencies_mhz[4]
    with httpx.Client(base_url=base, timeout=5) as http:
        job = {
            "token_sha256": JOB_SHA,
            "pods": [
                {"namespace": NS, "name": "p0", "uid": "u", "ip": "127.0.0.1", "gpu_uuids": [GPU0]}
            ],
        }
        assert http.put(f"/v1/jobs/{NS}/{NAME}", json=job, headers=OP).status_code == 201
        reg = {
            "namespace": NS, "pod": "p0", "rank": 0, "pipeline_rank": 0, "data_rank": 0,
            "tensor_rank": 0, "gpu_uuid": GPU0,
        }  # fmt: skip
        r = http.post("/v1/ranks", json=reg, headers=JOB)
        assert r.status_code == 201, r.text
        rank_id, event_port = r.json()["rank_id"], r.json()["event_port"]
        sched = schedule_body([(0, 0)], (target,))
        assert http.put(f"/v1/jobs/{NS}/{NAME}/schedule", json=sched, headers=OP).status_code == 200
    sock = EventSocket(event_port)
    sock.send(f"PERSEUS1 {rank_id} {JOB_TOKEN}")
    assert sock.readline() == "OK 1"
    sock.send(f"FB 0 {time.time_ns()}")
    wait_for(lambda: _clock(tmp_path) == target)
    sock.close()
    lock_state = json.loads((tmp_path / "state" / FILENAME).read_text())
    assert lock_state == {"locked_gpus": [GPU0]}
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert _clock(tmp_path) == target  # the driver keeps the lock past our death
    proc = sidecar_cmd()
    assert _clock(tmp_path) is None
    # and a graceful stop (SIGTERM) of an idle sidecar exits promptly
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) in (0, -signal.SIGTERM)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_reset_clocks(
    sidecar_cmd: Callable[[], subprocess.Popen[bytes]],
    tmp_path: Path,
    profile: StageProfile,
    sig: signal.Signals,
) -> None:
    proc = sidecar_cmd()
    base = sidecar_cmd.base  # type: ignore[attr-defined]
    with httpx.Client(base_url=base, timeout=5) as http:
        job = {
            "token_sha256": JOB_SHA,
            "pods": [
                {
                    "namespace": NS,
                    "name": "p0",
                    "uid": "u",
                    "ip": "x",
                    "host_network": True,
                    "gpu_uuids": [GPU0],
                }
            ],
        }
        http.put(f"/v1/jobs/{NS}/{NAME}", json=job, headers=OP)
        reg = {
            "namespace": NS, "pod": "p0", "rank": 0, "pipeline_rank": 0, "data_rank": 0,
            "tensor_rank": 0, "gpu_uuid": GPU0,
        }  # fmt: skip
        rank_id = http.post("/v1/ranks", json=reg, headers=JOB).json()["rank_id"]
        sched = schedule_body([(0, 0)], (profile.frequencies_mhz[2],))
        http.put(f"/v1/jobs/{NS}/{NAME}/schedule", json=sched, headers=OP)
        events = {"events": [{"kind": "FB", "microbatch": 0, "t_ns": time.time_ns()}]}
        assert http.post(f"/v1/ranks/{rank_id}/events", json=events, headers=JOB).status_code == 200
    assert _clock(tmp_path) == profile.frequencies_mhz[2]
    proc.send_signal(sig)
    assert proc.wait(timeout=15) in (-signal.SIGTERM, 130)
    assert _clock(tmp_path) is None
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    logs = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    assert any(entry["msg"] == "sidecar stopped; clocks reset" for entry in logs)
    assert "Traceback" not in stderr
