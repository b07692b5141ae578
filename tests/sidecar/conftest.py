"""Fixtures for the sidecar tests: a 4-stage profile with distinct stages, the simulated backend
in a temporary state dir, the app under TestClient (lifespan included) and helpers to announce
a job and register ranks."""

from __future__ import annotations

import hashlib
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from perseus_profiles import StageProfile, load_example
from perseus_sidecar.app import create_app
from perseus_sidecar.gpu.base import GpuBackend, GpuError, GpuInfo, GpuNotFoundError
from perseus_sidecar.gpu.simulated import SimulatedBackend
from perseus_sidecar.node import Node
from perseus_sidecar.settings import Settings

OPERATOR_TOKEN = "operator-token-0123456789abcdef"
JOB_TOKEN = "job-token-0123456789abcdef"
JOB_SHA = hashlib.sha256(JOB_TOKEN.encode()).hexdigest()
OP = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
JOB = {"Authorization": f"Bearer {JOB_TOKEN}"}
NS, NAME = "team-a", "gpt3"


class FakeBackend(GpuBackend):
    """In-memory GPUs whose calls can be made to fail, for error paths the simulation cannot
    produce (permission denied, lost GPUs)."""

    def __init__(self, clocks_mhz: tuple[int, ...] = (1410, 1200, 1000), n: int = 2) -> None:
        self.clocks_mhz = clocks_mhz
        self.uuids = [f"GPU-fake-{i}" for i in range(n)]
        self.locked: dict[str, int] = {}
        self.calls: list[tuple[str, str, int | None]] = []
        self.fail: GpuError | None = None
        self.energy_mj = 0

    def list_gpus(self) -> list[GpuInfo]:
        if self.fail is not None:
            raise self.fail
        return [GpuInfo(i, u, "Fake", self.clocks_mhz) for i, u in enumerate(self.uuids)]

    def _check(self, uuid: str) -> None:
        if uuid not in self.uuids:
            raise GpuNotFoundError(uuid)
        if self.fail is not None:
            raise self.fail

    def set_locked_sm_clock(self, uuid: str, clock_mhz: int) -> None:
        self._check(uuid)
        self.calls.append(("lock", uuid, clock_mhz))
        self.locked[uuid] = clock_mhz

    def reset_locked_clocks(self, uuid: str) -> None:
        self._check(uuid)
        self.calls.append(("reset", uuid, None))
        self.locked.pop(uuid, None)

    def locked_sm_clock_mhz(self, uuid: str) -> int | None:
        return self.locked.get(uuid)

    def total_energy_mj(self, uuid: str) -> int:
        self._check(uuid)
        self.energy_mj += 1000
        return self.energy_mj

    def current_sm_clock_mhz(self, uuid: str) -> int:
        self._check(uuid)
        return self.locked.get(uuid, self.clocks_mhz[0])

    def power_w(self, uuid: str) -> float:
        self._check(uuid)
        return 100.0


@pytest.fixture(scope="session")
def profile() -> StageProfile:
    return load_example("gpt3-175b-a100").select_stages((0, 1, 2, 7))


def make_settings(state_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "operator_token": OPERATOR_TOKEN,
        "state_dir": state_dir,
        "host": "127.0.0.1",
        "event_port": 0,
        "node_name": "n1",
        "gpu_backend": "simulated",
        "example": "gpt3-175b-a100",
        "rank_timeout_s": 30.0,
        "pod_resources_socket": None,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def sim_backend(profile: StageProfile, tmp_path: Path) -> SimulatedBackend:
    return SimulatedBackend(profile, 4, tmp_path / "sim", node_name="n1", time_scale=1.0)


@pytest.fixture
def make_client(
    tmp_path: Path, sim_backend: SimulatedBackend
) -> Iterator[Callable[..., TestClient]]:
    clients: list[TestClient] = []

    def make(backend: GpuBackend | None = None, **overrides: Any) -> TestClient:
        settings = make_settings(tmp_path / "state", **overrides)
        client = TestClient(create_app(settings, backend or sim_backend))
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in reversed(clients):
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client()


def node_of(client: TestClient) -> Node:
    node: Node = client.app.state.node  # type: ignore[attr-defined]
    return node


def announce(
    client: TestClient,
    pods: list[tuple[str, str]] | None = None,
    *,
    host_network: bool = True,
    name: str = NAME,
    gpus: dict[str, list[str] | None] | None = None,
    microbatches: int | None = None,
) -> None:
    """Announce job NS/name with pods (name, ip); each pod's GPUs from `gpus`, else the first
    pod has all of the node's GPUs and the others none."""
    pods = pods if pods is not None else [("trainer-0", "testclient")]
    if gpus is None:
        gpus = {p: [] for p, _ in pods}
        gpus[pods[0][0]] = sorted(node_of(client).gpus)
    body: dict[str, Any] = {
        "token_sha256": JOB_SHA,
        "pods": [
            {
                "namespace": NS,
                "name": p,
                "uid": f"uid-{p}",
                "ip": ip,
                "host_network": host_network,
                "gpu_uuids": gpus.get(p),
            }
            for p, ip in pods
        ],
    }
    if microbatches is not None:
        body["microbatches"] = microbatches
    r = client.put(f"/v1/jobs/{NS}/{name}", json=body, headers=OP)
    assert r.status_code in (200, 201), r.text


def register(
    client: TestClient,
    *,
    rank: int = 0,
    pipeline_rank: int = 0,
    data_rank: int = 0,
    gpu: str = "GPU-sim-n1-0",
    pod: str = "trainer-0",
) -> str:
    body = {
        "namespace": NS,
        "pod": pod,
        "rank": rank,
        "pipeline_rank": pipeline_rank,
        "data_rank": data_rank,
        "tensor_rank": 0,
        "gpu_uuid": gpu,
    }
    r = client.post("/v1/ranks", json=body, headers=JOB)
    assert r.status_code == 201, r.text
    rank_id: str = r.json()["rank_id"]
    return rank_id


def schedule_body(
    entries: list[tuple[int, int]], clocks_mhz: tuple[int, ...], microbatches: int = 2
) -> dict[str, Any]:
    """1F1B-free simple order F0 F1 .. B0 B1 ..; clock i of the list for instruction i."""
    order = [f"F{m}" for m in range(microbatches)] + [f"B{m}" for m in range(microbatches)]
    freqs = [clocks_mhz[i % len(clocks_mhz)] for i in range(len(order))]
    return {
        "entries": [
            {"data_rank": d, "pipeline_rank": p, "order": order, "frequencies_mhz": freqs}
            for d, p in entries
        ]
    }


class EventSocket:
    """A raw TCP client of the event line protocol."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.file = self.sock.makefile("rb")

    def send(self, line: str) -> None:
        self.sock.sendall(line.encode() + b"\n")

    def readline(self) -> str:
        return self.file.readline().decode().rstrip("\n")

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def wait_for(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.005)
