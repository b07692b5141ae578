"""Authentication comes first; bodies are capped and validated: every bad request is a 4xx."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from perseus_profiles import StageProfile
from perseus_sidecar.app import create_app
from perseus_sidecar.gpu.simulated import SimulatedBackend

from .conftest import (
    JOB,
    JOB_SHA,
    NAME,
    NS,
    OP,
    OPERATOR_TOKEN,
    announce,
    make_settings,
    register,
    wait_for,
)

WRITES = [
    ("PUT", f"/v1/jobs/{NS}/{NAME}"),
    ("DELETE", f"/v1/jobs/{NS}/{NAME}"),
    ("POST", "/v1/ranks"),
    ("POST", "/v1/ranks/abc/events"),
    ("PUT", f"/v1/jobs/{NS}/{NAME}/schedule"),
    ("DELETE", f"/v1/jobs/{NS}/{NAME}/schedule"),
    ("POST", f"/v1/jobs/{NS}/{NAME}/profiling"),
    ("DELETE", f"/v1/jobs/{NS}/{NAME}/profiling"),
    ("POST", "/v1/clocks/reset"),
    ("POST", "/v1/does/not/exist"),
    ("PATCH", "/v1/gpus"),
]
BAD_AUTH: list[dict[str, str]] = [
    {},
    {"Authorization": "Bearer"},
    {"Authorization": "Basic dXNlcjpwYXNz"},
    {"Authorization": "Bearer wrong-token-wrong-token"},
    {"Authorization": f"Bearer {JOB_SHA}"},  # the hash is not the token
]


@pytest.fixture(scope="module")
def shared_client(
    profile: StageProfile, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TestClient]:
    root: Path = tmp_path_factory.mktemp("auth")
    backend = SimulatedBackend(profile, 2, root / "sim", node_name="n1")
    with TestClient(create_app(make_settings(root / "state"), backend)) as client:
        announce(client)
        yield client


@pytest.mark.parametrize(("method", "path"), WRITES)
@pytest.mark.parametrize("headers", BAD_AUTH)
@pytest.mark.parametrize("body", [b"{}", b"\xff\xfe not json", b"x" * 2_000_000])
def test_unauthenticated_writes_are_401_whatever_path_and_body(
    shared_client: TestClient, method: str, path: str, headers: dict[str, str], body: bytes
) -> None:
    r = shared_client.request(method, path, content=body, headers=headers)
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(
    "path",
    [
        "/v1/gpus",
        "/v1/jobs",
        f"/v1/jobs/{NS}/{NAME}",
        f"/v1/jobs/{NS}/{NAME}/schedule",
        f"/v1/jobs/{NS}/{NAME}/profiling",
        f"/v1/jobs/{NS}/{NAME}/timings",
    ],
)
def test_operator_reads_need_the_operator_token(client: TestClient, path: str) -> None:
    announce(client)
    assert client.get(path).status_code == 401
    assert client.get(path, headers=JOB).status_code == 401


def test_job_token_cannot_use_control_endpoints(client: TestClient) -> None:
    announce(client)
    assert client.post("/v1/clocks/reset", headers=JOB).status_code == 401
    r = client.put(f"/v1/jobs/{NS}/{NAME}/schedule", json={"entries": []}, headers=JOB)
    assert r.status_code == 401
    assert client.delete(f"/v1/jobs/{NS}/{NAME}", headers=JOB).status_code == 401


def test_token_of_a_deleted_job_is_refused(client: TestClient) -> None:
    announce(client)
    rank_id = register(client)
    client.delete(f"/v1/jobs/{NS}/{NAME}", headers=OP)
    r = client.post(
        f"/v1/ranks/{rank_id}/events",
        json={"events": [{"kind": "FB", "microbatch": 0, "t_ns": 1}]},
        headers=JOB,
    )
    assert r.status_code == 401


def test_body_size_cap(make_client: Callable[..., TestClient]) -> None:
    client = make_client(max_body_bytes=2048)
    r = client.put(f"/v1/jobs/{NS}/{NAME}", content=b"{" + b" " * 4096 + b"}", headers=OP)
    assert r.status_code == 413
    # also when the client streams without a Content-Length
    r = client.put(f"/v1/jobs/{NS}/{NAME}", content=iter([b"{", b" " * 4096, b"}"]), headers=OP)
    assert r.status_code == 413


@pytest.mark.parametrize(
    "body",
    [
        b"\xff\xfe\xfa",
        b'{"token_sha256": "\xc3\x28", "pods": []}',
        b"not json",
        b"",
        b"[]",
        b"null",
        b'{"token_sha256": NaN, "pods": []}',
        b'{"token_sha256": "' + b"a" * 64 + b'", "pods": Infinity}',
        b'{"token_sha256": "' + b"a" * 64 + b'", "pods": [' + b"[" * 2000 + b"]" * 2000 + b"]}",
    ],
)
def test_malformed_json_bodies_are_4xx(client: TestClient, body: bytes) -> None:
    r = client.put(
        f"/v1/jobs/{NS}/{NAME}",
        content=body,
        headers={**OP, "Content-Type": "application/json"},
    )
    assert 400 <= r.status_code < 500, r.text


@pytest.mark.parametrize(
    "body",
    [
        b'{"frequencies_mhz": [NaN], "iterations_per_frequency": 1}',
        b'{"frequencies_mhz": [1410.5], "iterations_per_frequency": 1}',
        b'{"frequencies_mhz": [1410], "iterations_per_frequency": Infinity}',
        b'{"frequencies_mhz": [1410, 1410], "iterations_per_frequency": 1}',
        b'{"frequencies_mhz": [], "iterations_per_frequency": 1}',
    ],
)
def test_nan_and_bad_numbers_are_422(client: TestClient, body: bytes) -> None:
    announce(client)
    r = client.post(
        f"/v1/jobs/{NS}/{NAME}/profiling",
        content=body,
        headers={**OP, "Content-Type": "application/json"},
    )
    assert r.status_code == 422, r.text


def test_rotated_operator_token_is_picked_up(
    make_client: Callable[..., TestClient], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("perseus_sidecar.app.TOKEN_POLL_S", 0.01)
    token_file = tmp_path / "token"
    token_file.write_text(OPERATOR_TOKEN)
    client = make_client(token_file=token_file)
    assert client.get("/v1/gpus", headers=OP).status_code == 200
    rotated = "rotated-operator-token-0123456789"
    token_file.write_text(rotated + "\n")
    new = {"Authorization": f"Bearer {rotated}"}
    wait_for(lambda: client.get("/v1/gpus", headers=new).status_code == 200)
    assert client.get("/v1/gpus", headers=OP).status_code == 401
    token_file.write_text("bad")  # too short: the previous token stays
    time.sleep(0.1)
    assert client.get("/v1/gpus", headers=new).status_code == 200
