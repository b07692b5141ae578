"""Every endpoint through TestClient with the simulated backend: happy paths and the 4xx paths."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from perseus_profiles import StageProfile
from perseus_sidecar.api import EventsIn, ScheduleIn
from perseus_sidecar.deps import get_node
from perseus_sidecar.gpu.simulated import SimulatedBackend
from perseus_sidecar.lockstate import LockState
from perseus_sidecar.node import Node

from .conftest import (
    JOB,
    JOB_SHA,
    NAME,
    NS,
    OP,
    OPERATOR_TOKEN,
    FakeBackend,
    announce,
    node_of,
    register,
    schedule_body,
)

GPU0 = "GPU-sim-n1-0"


def test_health_and_readiness_need_no_token(client: TestClient) -> None:
    assert client.get("/v1/healthz").json() == {"status": "ok"}
    r = client.get("/v1/readyz")
    assert r.status_code == 200
    assert r.json()["ready"] is True
    assert r.json()["usable_gpus"] == 4
    assert client.get("/healthz").status_code == 200  # root aliases for kubelet probes
    assert client.get("/readyz").status_code == 200


def test_readiness_reports_zero_gpus(
    make_client: Callable[..., TestClient], profile: StageProfile, tmp_path: Path
) -> None:
    client = make_client(SimulatedBackend(profile, 0, tmp_path / "empty", node_name="n1"))
    r = client.get("/v1/readyz")
    assert r.status_code == 503
    assert "no GPU visible" in r.json()["reason"]
    assert client.get("/v1/gpus", headers=OP).json()["gpus"] == []


def test_gpu_inventory(client: TestClient, profile: StageProfile) -> None:
    r = client.get("/v1/gpus", headers=OP)
    assert r.status_code == 200
    body = r.json()
    assert body["node_name"] == "n1"
    assert [g["uuid"] for g in body["gpus"]] == [f"GPU-sim-n1-{i}" for i in range(4)]
    assert body["gpus"][0]["supported_sm_clocks_mhz"] == list(profile.frequencies_mhz)
    assert body["gpus"][0]["max_sm_clock_mhz"] == profile.max_frequency_mhz
    assert body["gpus"][0]["locked_by_sidecar"] is False


def test_job_announcement_lifecycle(client: TestClient) -> None:
    body = {
        "token_sha256": JOB_SHA,
        "pods": [{"namespace": NS, "name": "p0", "uid": "u0", "ip": "10.0.0.5"}],
    }
    assert client.put(f"/v1/jobs/{NS}/{NAME}", json=body, headers=OP).status_code == 201
    assert client.put(f"/v1/jobs/{NS}/{NAME}", json=body, headers=OP).status_code == 200
    got = client.get(f"/v1/jobs/{NS}/{NAME}", headers=OP).json()
    assert got["pods"][0]["ip"] == "10.0.0.5"
    assert got["pods"][0]["host_network"] is False
    assert [j["name"] for j in client.get("/v1/jobs", headers=OP).json()] == [NAME]
    assert client.delete(f"/v1/jobs/{NS}/{NAME}", headers=OP).status_code == 204
    assert client.get(f"/v1/jobs/{NS}/{NAME}", headers=OP).status_code == 404
    assert client.delete(f"/v1/jobs/{NS}/{NAME}", headers=OP).status_code == 404


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"token_sha256": "xyz", "pods": []}, "token_sha256"),
        (
            {
                "token_sha256": JOB_SHA,
                "pods": [{"namespace": "other", "name": "p", "uid": "u", "ip": "1.2.3.4"}],
            },
            "not in the job's namespace",
        ),
        (
            {
                "token_sha256": JOB_SHA,
                "pods": [{"namespace": NS, "name": "p", "uid": "u", "ip": "1.2.3.4"}] * 2,
            },
            "distinct",
        ),
        ({"token_sha256": JOB_SHA, "pods": [], "extra": 1}, "extra"),
    ],
)
def test_bad_announcements_are_422(client: TestClient, body: object, message: str) -> None:
    r = client.put(f"/v1/jobs/{NS}/{NAME}", json=body, headers=OP)
    assert r.status_code == 422
    assert message in r.text


def test_a_validators_refusal_reads_without_pydantics_prefix(client: TestClient) -> None:
    """The message the operator puts into the policy's condition, in plain words."""
    pod = {"namespace": NS, "name": "p", "uid": "u", "ip": "1.2.3.4"}
    r = client.put(
        f"/v1/jobs/{NS}/{NAME}", json={"token_sha256": JOB_SHA, "pods": [pod] * 2}, headers=OP
    )
    assert r.status_code == 422
    assert r.json()["message"] == "body: pods must be distinct (namespace, name) pairs"
    assert "Value error" not in r.text


def test_bad_path_names_are_422(client: TestClient) -> None:
    body = {"token_sha256": JOB_SHA, "pods": []}
    assert client.put("/v1/jobs/Team_A/x", json=body, headers=OP).status_code == 422


def test_rank_registration_and_reregistration(client: TestClient) -> None:
    announce(client)
    rank_id = register(client)
    assert register(client) == rank_id  # a restarted process gets the same id
    r = client.post(
        "/v1/ranks",
        json={
            "namespace": NS,
            "pod": "trainer-0",
            "rank": 0,
            "pipeline_rank": 0,
            "data_rank": 0,
            "tensor_rank": 0,
            "gpu_uuid": GPU0,
        },
        headers=JOB,
    )
    assert r.json()["event_port"] == node_of(client).event_port
    assert r.json()["schedule_active"] is False
    assert client.get(f"/v1/jobs/{NS}/{NAME}", headers=OP).json()["ranks"] == [rank_id]


def _registration(**overrides: object) -> dict[str, object]:
    body: dict[str, object] = {
        "namespace": NS,
        "pod": "trainer-0",
        "rank": 0,
        "pipeline_rank": 0,
        "data_rank": 0,
        "tensor_rank": 0,
        "gpu_uuid": GPU0,
    }
    body.update(overrides)
    return body


def test_registration_refusals(client: TestClient) -> None:
    announce(client, [("trainer-0", "testclient"), ("trainer-1", "10.9.9.9")], host_network=False)
    other = {"Authorization": "Bearer some-other-token-of-nobody"}
    # unknown token: the front door refuses it
    assert client.post("/v1/ranks", json=_registration(), headers=other).status_code == 401
    # operator token is not a job token
    assert client.post("/v1/ranks", json=_registration(), headers=OP).status_code == 401
    # pod not announced
    r = client.post("/v1/ranks", json=_registration(pod="ghost"), headers=JOB)
    assert r.status_code == 401
    # announced pod, but the request does not come from its IP
    r = client.post("/v1/ranks", json=_registration(pod="trainer-1"), headers=JOB)
    assert r.status_code == 403
    assert "10.9.9.9" in r.json()["detail"]
    # GPU not on this node
    r = client.post("/v1/ranks", json=_registration(gpu_uuid="GPU-elsewhere"), headers=JOB)
    assert r.status_code == 422
    # GPU held by another announced pod's rank
    register(client)
    client.put(
        f"/v1/jobs/{NS}/{NAME}",
        json={
            "token_sha256": JOB_SHA,
            "pods": [
                {"namespace": NS, "name": n, "uid": n, "ip": "testclient", "gpu_uuids": g}
                for n, g in (("trainer-0", None), ("trainer-2", [GPU0]))
            ],
        },
        headers=OP,
    )
    r = client.post("/v1/ranks", json=_registration(pod="trainer-2", rank=5), headers=JOB)
    assert r.status_code == 409


def test_http_events_record_timings(client: TestClient) -> None:
    announce(client)
    rank_id = register(client)
    t0 = time.time_ns()
    events = []
    for it in range(3):
        base = t0 + it * 1_000_000_000
        events += [
            {"kind": "FB", "microbatch": 0, "t_ns": base},
            {"kind": "FE", "microbatch": 0, "t_ns": base + 100_000_000},
            {"kind": "BB", "microbatch": 0, "t_ns": base + 200_000_000},
            {"kind": "BE", "microbatch": 0, "t_ns": base + 500_000_000},
            {"kind": "IE", "microbatch": -1, "t_ns": base + 600_000_000},
        ]
    r = client.post(f"/v1/ranks/{rank_id}/events", json={"events": events}, headers=JOB)
    assert r.status_code == 200
    assert r.json() == {"accepted": 15, "schedule_active": False}
    t = client.get(f"/v1/jobs/{NS}/{NAME}/timings", params={"window_s": 3600}, headers=OP).json()
    (rank,) = t["ranks"]
    assert rank["iterations"] == 3
    fwd = next(i for i in rank["instructions"] if i["instruction"] == "forward")
    bwd = next(i for i in rank["instructions"] if i["instruction"] == "backward")
    assert fwd["count"] == 3 and fwd["mean_s"] == pytest.approx(0.1)
    assert bwd["mean_s"] == pytest.approx(0.3)
    assert rank["iteration_time_mean_s"] == pytest.approx(1.0)
    assert rank["compute_span_mean_s"] == pytest.approx(0.5)
    assert rank["energy_per_iteration_mean_j"] is not None
    (stage,) = t["stages"]
    assert stage["pipeline_rank"] == 0 and stage["ranks"] == 1
    assert stage["instructions"][0]["mean_s"] == pytest.approx(0.1)
    assert stage["energy_per_iteration_mean_j"] == rank["energy_per_iteration_mean_j"]
    (pipe,) = t["pipelines"]
    assert pipe["data_rank"] == 0
    assert pipe["stage0_span_mean_s"] == pytest.approx(0.5)
    assert pipe["stage0_span_last_s"] == pytest.approx(0.5)


def test_http_event_refusals(client: TestClient) -> None:
    announce(client)
    rank_id = register(client)
    ok = {"events": [{"kind": "FB", "microbatch": 0, "t_ns": 1}]}
    assert client.post("/v1/ranks/nope/events", json=ok, headers=JOB).status_code == 401
    assert client.post(f"/v1/ranks/{rank_id}/events", json=ok, headers=OP).status_code == 401
    bad_events = [
        {"events": []},
        {"events": [{"kind": "XX", "microbatch": 0, "t_ns": 1}]},
        {"events": [{"kind": "IE", "microbatch": 0, "t_ns": 1}]},
        {"events": [{"kind": "FB", "microbatch": -1, "t_ns": 1}]},
        {"events": [{"kind": "FB", "microbatch": 0, "t_ns": -5}]},
        {"events": [{"kind": "FB", "microbatch": 0.5, "t_ns": 1}]},
    ]
    for body in bad_events:
        r = client.post(f"/v1/ranks/{rank_id}/events", json=body, headers=JOB)
        assert r.status_code == 422, body
        assert r.json()["message"]


def test_schedule_put_get_delete_and_clock_application(
    client: TestClient, sim_backend: SimulatedBackend, profile: StageProfile
) -> None:
    announce(client)
    rank_id = register(client)
    clocks = profile.frequencies_mhz
    body = schedule_body([(0, 0)], (clocks[3], clocks[5]))
    r = client.put(f"/v1/jobs/{NS}/{NAME}/schedule", json=body, headers=OP)
    assert r.status_code == 200, r.text
    assert r.json()["active_ranks"] == [rank_id]
    assert client.get(f"/v1/jobs/{NS}/{NAME}/schedule", headers=OP).json()["entries"] == [
        ScheduleIn.model_validate(body).entries[0].model_dump()
    ]
    now = time.time_ns()

    def send(kind: str, m: int) -> httpx.Response:
        return client.post(
            f"/v1/ranks/{rank_id}/events",
            json={"events": [{"kind": kind, "microbatch": m, "t_ns": now}]},
            headers=JOB,
        )

    assert send("FB", 0).json()["schedule_active"] is True
    assert sim_backend.locked_sm_clock_mhz(GPU0) == clocks[3]  # F0 -> order index 0
    send("FB", 1)
    assert sim_backend.locked_sm_clock_mhz(GPU0) == clocks[5]  # F1 -> index 1
    send("BB", 0)
    assert sim_backend.locked_sm_clock_mhz(GPU0) == clocks[3]  # B0 -> index 2
    send("IE", -1)
    assert sim_backend.locked_sm_clock_mhz(GPU0) == clocks[0]  # max at iteration end
    assert client.delete(f"/v1/jobs/{NS}/{NAME}/schedule", headers=OP).status_code == 204
    assert sim_backend.locked_sm_clock_mhz(GPU0) is None  # reset on delete
    assert client.get(f"/v1/jobs/{NS}/{NAME}/schedule", headers=OP).status_code == 404
    assert client.delete(f"/v1/jobs/{NS}/{NAME}/schedule", headers=OP).status_code == 404


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda e: e.update(frequencies_mhz=e["frequencies_mhz"][:-1]), "has 4 instructions"),
        (lambda e: e.update(order=["F0", "F0", "B0", "B1"]), "appears twice"),
        (lambda e: e.update(order=["B0", "F0", "F1", "B1"]), "B0 comes before F0"),
        (lambda e: e.update(order=["F0", "F1", "B0", "B7"]), "out of range"),
        (lambda e: e.update(order=["F0", "X1", "B0", "B1"]), "not F<m> or B<m>"),
        (lambda e: e.update(order=["F0", "F1", "B0"], frequencies_mhz=[1410] * 3), "one F<m>"),
        (lambda e: e.update(frequencies_mhz=[1410, 1410, 1410, 1411]), "not supported"),
        (lambda e: e.update(frequencies_mhz=[1410, 1410, 1410, -5]), "greater than 0"),
    ],
)
def test_bad_schedules_are_422_and_not_applied(
    client: TestClient,
    profile: StageProfile,
    mutate: Callable[[dict[str, object]], None],
    message: str,
) -> None:
    announce(client)
    register(client)
    good = schedule_body([(0, 0)], (profile.frequencies_mhz[2],))
    assert client.put(f"/v1/jobs/{NS}/{NAME}/schedule", json=good, headers=OP).status_code == 200
    bad = schedule_body([(0, 0), (0, 1)], (profile.max_frequency_mhz,))
    mutate(bad["entries"][1])
    r = client.put(f"/v1/jobs/{NS}/{NAME}/schedule", json=bad, headers=OP)
    assert r.status_code == 422, r.text
    assert message in r.text
    # the previous schedule stays whole
    got = client.get(f"/v1/jobs/{NS}/{NAME}/schedule", headers=OP).json()
    assert got["entries"] == good["entries"]


def test_schedule_refusals(client: TestClient, profile: StageProfile) -> None:
    body = schedule_body([(0, 0)], (profile.max_frequency_mhz,))
    assert client.put(f"/v1/jobs/{NS}/nojob/schedule", json=body, headers=OP).status_code == 404
    announce(client)
    dup = schedule_body([(0, 0), (0, 0)], (profile.max_frequency_mhz,))
    r = client.put(f"/v1/jobs/{NS}/{NAME}/schedule", json=dup, headers=OP)
    assert r.status_code == 422 and "distinct" in r.text
    mixed = schedule_body([(0, 0)], (profile.max_frequency_mhz,))
    mixed["entries"] += schedule_body([(0, 1)], (profile.max_frequency_mhz,), 3)["entries"]
    r = client.put(f"/v1/jobs/{NS}/{NAME}/schedule", json=mixed, headers=OP)
    assert r.status_code == 422 and "same number of microbatches" in r.text


def test_reset_endpoint_drops_schedules_and_resets(
    client: TestClient, sim_backend: SimulatedBackend, profile: StageProfile
) -> None:
    announce(client)
    rank_id = register(client)
    body = schedule_body([(0, 0)], (profile.frequencies_mhz[4],))
    client.put(f"/v1/jobs/{NS}/{NAME}/schedule", json=body, headers=OP)
    client.post(
        f"/v1/ranks/{rank_id}/events",
        json={"events": [{"kind": "FB", "microbatch": 0, "t_ns": time.time_ns()}]},
        headers=JOB,
    )
    assert sim_backend.locked_sm_clock_mhz(GPU0) == profile.frequencies_mhz[4]
    r = client.post("/v1/clocks/reset", headers=OP)
    assert r.json() == {"reset_gpus": [GPU0], "schedules_removed": 1}
    assert sim_backend.locked_sm_clock_mhz(GPU0) is None
    assert client.get(f"/v1/jobs/{NS}/{NAME}/schedule", headers=OP).status_code == 404


def test_timings_window_and_unknown_job(client: TestClient) -> None:
    assert client.get(f"/v1/jobs/{NS}/{NAME}/timings", headers=OP).status_code == 404
    announce(client)
    for bad in ("0", "-1", "nan", "inf", "abc"):
        r = client.get(f"/v1/jobs/{NS}/{NAME}/timings", params={"window_s": bad}, headers=OP)
        assert r.status_code == 422, bad
    r = client.get(f"/v1/jobs/{NS}/{NAME}/timings", headers=OP)
    assert r.status_code == 200 and r.json()["ranks"] == []


def test_metrics_exposes_clock_energy_and_schedule_state(client: TestClient) -> None:
    announce(client)
    rank_id = register(client)
    client.post(
        f"/v1/ranks/{rank_id}/events",
        json=EventsIn.model_validate(
            {"events": [{"kind": "IE", "microbatch": -1, "t_ns": time.time_ns()}]}
        ).model_dump(),
        headers=JOB,
    )
    text = client.get("/metrics").text
    assert 'perseus_sidecar_gpu_sm_clock_mhz{gpu="GPU-sim-n1-0"}' in text
    assert 'perseus_sidecar_gpu_energy_joules{gpu="GPU-sim-n1-0"}' in text
    assert 'perseus_sidecar_gpu_schedule_active{gpu="GPU-sim-n1-0"} 0.0' in text
    assert 'perseus_sidecar_events_total{transport="http"} 1.0' in text
    assert "perseus_sidecar_iteration_seconds_bucket" in text


def test_metrics_name_tenants_only_when_enabled(make_client: Callable[..., TestClient]) -> None:
    """GET /metrics has no auth: namespaces and job names appear only with the setting on;
    per-GPU series are there either way."""
    for enabled in (False, True):
        client = make_client(metrics_tenant_labels=enabled)
        announce(client)
        register(client)
        text = client.get("/metrics").text
        assert 'perseus_sidecar_gpu_schedule_active{gpu="GPU-sim-n1-0"} 0.0' in text
        assert ('namespace="team-a"' in text) is enabled
        assert ('job="gpt3"' in text) is enabled


def test_openapi_stays_at_its_path(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert "/v1/jobs/{namespace}/{name}/schedule" in spec["paths"]


def test_dependency_override_swaps_the_node(
    make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    """Routers reach the node only through `deps.get_node`, so a test can swap it."""
    client = make_client()
    fake = FakeBackend(n=3)
    other = Node(
        backend=fake,
        lock_state=LockState(tmp_path / "other"),
        operator_token=OPERATOR_TOKEN,
        node_name="other",
    )
    other.discover()
    client.app.dependency_overrides[get_node] = lambda: other  # type: ignore[attr-defined]
    body = client.get("/v1/gpus", headers=OP).json()
    assert body["node_name"] == "other"
    assert [g["uuid"] for g in body["gpus"]] == fake.uuids


def test_per_stage_and_per_pipeline_timings(client: TestClient) -> None:
    """Two pipelines (data ranks) of two stages; pipeline 1's stage 0 runs slower."""
    announce(client)
    layout = {(0, 0): 0.1, (0, 1): 0.2, (1, 0): 0.16, (1, 1): 0.2}  # (data, stage) -> fwd s
    t0 = time.time_ns()
    for i, ((data, stage), fwd_s) in enumerate(layout.items()):
        rank_id = register(
            client, rank=i, pipeline_rank=stage, data_rank=data, gpu=f"GPU-sim-n1-{i}"
        )
        events = []
        for it in range(2):
            base = t0 + it * 2_000_000_000
            fe = base + int(fwd_s * 1e9)
            events += [
                {"kind": "FB", "microbatch": 0, "t_ns": base},
                {"kind": "FE", "microbatch": 0, "t_ns": fe},
                {"kind": "BB", "microbatch": 0, "t_ns": fe},
                {"kind": "BE", "microbatch": 0, "t_ns": fe + 2 * int(fwd_s * 1e9)},
                {"kind": "IE", "microbatch": -1, "t_ns": base + 1_000_000_000},
            ]
        r = client.post(f"/v1/ranks/{rank_id}/events", json={"events": events}, headers=JOB)
        assert r.status_code == 200
    t = client.get(f"/v1/jobs/{NS}/{NAME}/timings", params={"window_s": 600}, headers=OP).json()
    assert [s["pipeline_rank"] for s in t["stages"]] == [0, 1]
    stage0, stage1 = t["stages"]
    assert stage0["ranks"] == 2
    fwd0 = next(i for i in stage0["instructions"] if i["instruction"] == "forward")
    assert fwd0["count"] == 4 and fwd0["mean_s"] == pytest.approx(0.13)
    fwd1 = next(i for i in stage1["instructions"] if i["instruction"] == "forward")
    assert fwd1["mean_s"] == pytest.approx(0.2)
    spans = {p["data_rank"]: p["stage0_span_mean_s"] for p in t["pipelines"]}
    assert spans == {0: pytest.approx(0.3), 1: pytest.approx(0.48)}


def test_quoted_numbers_and_booleans_are_not_coerced(client: TestClient) -> None:
    """Strict request models: a client that sends "1410" or "0" has a bug; it gets a 422."""
    announce(client)
    body = schedule_body([(0, 0)], (1410,))
    body["entries"][0]["frequencies_mhz"] = ["1410"] * len(body["entries"][0]["order"])
    r = client.put(f"/v1/jobs/{NS}/{NAME}/schedule", json=body, headers=OP)
    assert r.status_code == 422
    assert "valid integer" in r.json()["message"]
    reg = {"namespace": NS, "pod": "trainer-0", "rank": "0", "pipeline_rank": 0,
           "data_rank": 0, "tensor_rank": 0, "gpu_uuid": GPU0}  # fmt: skip
    assert client.post("/v1/ranks", json=reg, headers=JOB).status_code == 422
    profiling = {"frequencies_mhz": [1410], "iterations_per_frequency": 1.0}
    r = client.post(f"/v1/jobs/{NS}/{NAME}/profiling", json=profiling, headers=OP)
    assert r.status_code == 422
