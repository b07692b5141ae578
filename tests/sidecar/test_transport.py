"""The TCP line transport: handshake, events, schedule notifications, malformed input."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient

from perseus_profiles import StageProfile
from perseus_sidecar.gpu.simulated import SimulatedBackend

from .conftest import (
    JOB_TOKEN,
    NAME,
    NS,
    OP,
    EventSocket,
    announce,
    node_of,
    register,
    schedule_body,
    wait_for,
)

GPU0 = "GPU-sim-n1-0"


def _connect(client: TestClient, rank_id: str, token: str = JOB_TOKEN) -> EventSocket:
    sock = EventSocket(node_of(client).event_port)
    sock.send(f"PERSEUS1 {rank_id} {token}")
    return sock


def test_events_lock_clocks_and_schedule_changes_are_pushed(
    client: TestClient, sim_backend: SimulatedBackend, profile: StageProfile
) -> None:
    announce(client)
    rank_id = register(client)
    sock = _connect(client, rank_id)
    assert sock.readline() == "OK 0"
    clocks = profile.frequencies_mhz
    body = schedule_body([(0, 0)], (clocks[6], clocks[2]))
    assert client.put(f"/v1/jobs/{NS}/{NAME}/schedule", json=body, headers=OP).status_code == 200
    assert sock.readline() == "S 1"
    now = time.time_ns()
    sock.send(f"FB 0 {now}")
    wait_for(lambda: sim_backend.locked_sm_clock_mhz(GPU0) == clocks[6])
    sock.send(f"FE 0 {now + 1000}")
    sock.send(f"FB 1 {now + 2000}")
    wait_for(lambda: sim_backend.locked_sm_clock_mhz(GPU0) == clocks[2])
    sock.send(f"IE -1 {now + 3000}")
    wait_for(lambda: sim_backend.locked_sm_clock_mhz(GPU0) == clocks[0])
    client.delete(f"/v1/jobs/{NS}/{NAME}/schedule", headers=OP)
    assert sock.readline() == "S 0"
    assert sim_backend.locked_sm_clock_mhz(GPU0) is None
    wait_for(lambda: node_of(client).metrics.events_tcp._value.get() == 4)
    sock.close()


def test_connection_made_while_a_schedule_is_active_says_so(
    client: TestClient, profile: StageProfile
) -> None:
    announce(client)
    rank_id = register(client)
    body = schedule_body([(0, 0)], (profile.max_frequency_mhz,))
    client.put(f"/v1/jobs/{NS}/{NAME}/schedule", json=body, headers=OP)
    sock = _connect(client, rank_id)
    assert sock.readline() == "OK 1"
    sock.close()


@pytest.mark.parametrize(
    ("hello", "message"),
    [
        ("HELLO", "expected 'PERSEUS1"),
        ("PERSEUS1 unknown-rank {token}", "unknown rank"),
        ("PERSEUS1 {rank_id} wrong-token", "unknown rank or wrong job token"),
        ("PERSEUS1 {rank_id}", "expected 'PERSEUS1"),
    ],
)
def test_bad_handshakes_get_err_and_close(client: TestClient, hello: str, message: str) -> None:
    announce(client)
    rank_id = register(client)
    sock = EventSocket(node_of(client).event_port)
    sock.send(hello.format(rank_id=rank_id, token=JOB_TOKEN))
    line = sock.readline()
    assert line.startswith("ERR ") and message in line
    assert sock.readline() == ""  # closed
    sock.close()


def test_pod_ip_is_checked_on_the_event_port(client: TestClient) -> None:
    announce(client, [("trainer-0", "testclient")], host_network=False)
    rank_id = register(client)
    sock = _connect(client, rank_id)  # comes from 127.0.0.1, not the pod's IP
    line = sock.readline()
    assert line.startswith("ERR ") and "must come from" in line
    sock.close()


@pytest.mark.parametrize(
    "line",
    [
        "XX 0 1",
        "FB 0",
        "FB zero 1",
        "FB 0 -1",
        "IE 0 1",
        "FB -1 1",
        "FB -2 1",
        "FB 0 99999999999999999999999",
        "",
        "FB 0 1 extra",
        "FB 0 " + "9" * 600,
    ],
)
def test_malformed_event_lines_get_err_and_close(client: TestClient, line: str) -> None:
    announce(client)
    rank_id = register(client)
    sock = _connect(client, rank_id)
    assert sock.readline() == "OK 0"
    sock.send(line)
    reply = sock.readline()
    assert reply.startswith("ERR "), reply
    assert sock.readline() == ""
    sock.close()


def test_deleting_the_job_closes_its_connections(client: TestClient) -> None:
    announce(client)
    rank_id = register(client)
    sock = _connect(client, rank_id)
    assert sock.readline() == "OK 0"
    client.delete(f"/v1/jobs/{NS}/{NAME}", headers=OP)
    assert sock.readline().startswith("ERR rank removed")
    sock.close()


def test_events_split_across_packets(client: TestClient) -> None:
    announce(client)
    rank_id = register(client)
    sock = _connect(client, rank_id)
    assert sock.readline() == "OK 0"
    now = time.time_ns()
    payload = f"FB 0 {now}\nFE 0 {now + 50_000_000}\nIE -1 {now + 60_000_000}\n".encode()
    for i in range(0, len(payload), 7):
        sock.sock.sendall(payload[i : i + 7])
        time.sleep(0.001)
    node = node_of(client)
    wait_for(lambda: len(node.ranks[rank_id].history) == 1)
    (record,) = node.ranks[rank_id].history
    assert record.forward_s == pytest.approx((0.05,))
    sock.close()


def test_silent_connection_is_closed_after_the_handshake_timeout(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(http_header_timeout_s=0.05)
    sock = EventSocket(node_of(client).event_port)
    assert sock.readline() == "ERR no handshake in time"
    sock.close()
