"""Interleaved schedules on the sidecar: per-chunk clock tables, chunked events (HTTP and the
TCP line protocol), and chunked orders that are malformed."""

from __future__ import annotations

import time

import httpx
import pytest
from fastapi.testclient import TestClient

from perseus_profiles import StageProfile
from perseus_sidecar.gpu.simulated import SimulatedBackend
from tests.sidecar.conftest import (
    JOB,
    JOB_TOKEN,
    NAME,
    NS,
    OP,
    EventSocket,
    announce,
    node_of,
    register,
    wait_for,
)

GPU0 = "GPU-sim-n1-0"
# Stage 1 of 2 stages x 2 microbatches x 2 chunks (Megatron's order: M = S, all warm-up).
ORDER = ["F0c0", "F1c0", "F0c1", "F1c1", "B0c1", "B1c1", "B0c0", "B1c0"]


def chunked_body(clocks: tuple[int, ...]) -> dict[str, object]:
    freqs = [clocks[i % len(clocks)] for i in range(len(ORDER))]
    return {
        "entries": [{"data_rank": 0, "pipeline_rank": 0, "order": ORDER, "frequencies_mhz": freqs}]
    }


def test_http_events_lock_each_chunks_clock(
    client: TestClient, sim_backend: SimulatedBackend, profile: StageProfile
) -> None:
    announce(client)
    rank_id = register(client)
    clocks = profile.frequencies_mhz[1:9]  # one distinct clock per instruction of ORDER
    r = client.put(f"/v1/jobs/{NS}/{NAME}/schedule", json=chunked_body(clocks), headers=OP)
    assert r.status_code == 200, r.text
    now = time.time_ns()

    def send(kind: str, m: int, chunk: int | None = None) -> httpx.Response:
        event: dict[str, object] = {"kind": kind, "microbatch": m, "t_ns": now}
        if chunk is not None:
            event["chunk"] = chunk
        return client.post(f"/v1/ranks/{rank_id}/events", json={"events": [event]}, headers=JOB)

    for text, clock in zip(ORDER, clocks, strict=True):
        kind = "FB" if text[0] == "F" else "BB"
        m, chunk = (int(x) for x in text[1:].split("c"))
        assert send(kind, m, chunk).status_code == 200
        assert sim_backend.locked_sm_clock_mhz(GPU0) == clock, text
        send("FE" if kind == "FB" else "BE", m, chunk)
    send("FB", 1)  # no chunk: chunk 0
    assert sim_backend.locked_sm_clock_mhz(GPU0) == clocks[1]
    for bad in ({"chunk": 64}, {"chunk": -1}, {"kind": "IE", "microbatch": -1, "chunk": 1}):
        event = {"kind": "FB", "microbatch": 0, "t_ns": now, **bad}
        r = client.post(f"/v1/ranks/{rank_id}/events", json={"events": [event]}, headers=JOB)
        assert r.status_code == 422, bad
    t = client.get(f"/v1/jobs/{NS}/{NAME}/timings", params={"window_s": 3600}, headers=OP)
    assert t.status_code == 200


def test_tcp_events_carry_the_chunk(
    client: TestClient, sim_backend: SimulatedBackend, profile: StageProfile
) -> None:
    announce(client)
    rank_id = register(client)
    clocks = profile.frequencies_mhz[1:9]
    client.put(f"/v1/jobs/{NS}/{NAME}/schedule", json=chunked_body(clocks), headers=OP)
    sock = EventSocket(node_of(client).event_port)
    sock.send(f"PERSEUS1 {rank_id} {JOB_TOKEN}")
    assert sock.readline() == "OK 1"
    now = time.time_ns()
    sock.send(f"FB 1 {now} 1")  # F1c1: position 3
    wait_for(lambda: sim_backend.locked_sm_clock_mhz(GPU0) == clocks[3])
    sock.send(f"FE 1 {now + 10} 1")
    sock.send(f"BB 0 {now + 20} 0")  # B0c0: position 6
    wait_for(lambda: sim_backend.locked_sm_clock_mhz(GPU0) == clocks[6])
    sock.send(f"BE 0 {now + 30}")
    sock.send(f"FB 0 {now + 40}")  # F0c0: position 0
    wait_for(lambda: sim_backend.locked_sm_clock_mhz(GPU0) == clocks[0])
    sock.send(f"FB 0 {now + 50} 7")  # a chunk the schedule does not have: no clock change
    sock.send(f"IE -1 {now + 60}")
    wait_for(lambda: sim_backend.locked_sm_clock_mhz(GPU0) == profile.max_frequency_mhz)
    sock.close()


@pytest.mark.parametrize(
    ("line", "message"), [("FB 0 1 64", "chunk must be 0-63"), ("IE -1 1 2", "0 for IE"),
                          ("FB 0 1 x", "must be integers"), ("FB 0 1 1 1", "expected")],
)  # fmt: skip
def test_bad_chunks_on_the_event_port_get_err(client: TestClient, line: str, message: str) -> None:
    announce(client)
    rank_id = register(client)
    sock = EventSocket(node_of(client).event_port)
    sock.send(f"PERSEUS1 {rank_id} {JOB_TOKEN}")
    assert sock.readline() == "OK 0"
    sock.send(line)
    got = sock.readline()
    assert got.startswith("ERR ") and message in got
    sock.close()


@pytest.mark.parametrize(
    ("order", "message"),
    [
        (["F0c0", "B0", "F0c1", "B0c1"], "mixes F<m> and F<m>c<chunk>"),
        (["F0c0", "B0c0", "F0c1"], "each of 2 chunks"),
        (["F0c0", "F0c0", "B0c0", "B0c0"], "F0c0 appears twice"),
        (["B0c1", "F0c0", "B0c0", "F0c1"], "B0c1 comes before F0c1"),
        (["F0c0", "F0c64", "B0c0", "B0c64"], "chunk < 64"),
    ],
)
def test_bad_chunked_orders_are_422(
    client: TestClient, profile: StageProfile, order: list[str], message: str
) -> None:
    announce(client)
    body = {
        "entries": [
            {
                "data_rank": 0,
                "pipeline_rank": 0,
                "order": order,
                "frequencies_mhz": [profile.max_frequency_mhz] * len(order),
            }
        ]
    }
    r = client.put(f"/v1/jobs/{NS}/{NAME}/schedule", json=body, headers=OP)
    assert r.status_code == 422 and message in r.text, r.text


def test_entries_must_agree_on_chunks(client: TestClient, profile: StageProfile) -> None:
    announce(client)
    top = profile.max_frequency_mhz
    plain = {"data_rank": 0, "pipeline_rank": 1, "order": ["F0", "F1", "B0", "B1"]}
    body = {
        "entries": [
            {"data_rank": 0, "pipeline_rank": 0, "order": ["F0c0", "F0c1", "B0c1", "B0c0"],
             "frequencies_mhz": [top] * 4},
            {**plain, "frequencies_mhz": [top] * 4},
        ]
    }  # fmt: skip
    r = client.put(f"/v1/jobs/{NS}/{NAME}/schedule", json=body, headers=OP)
    assert r.status_code == 422 and "same number of" in r.text, r.text
