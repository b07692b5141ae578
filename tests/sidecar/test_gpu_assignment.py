"""A rank registers only a GPU its pod was given: the kubelet's pod-resources API says which
where its socket is (served here by a fake kubelet speaking HTTP/2 + gRPC on a unix socket),
else the operator's announcement; a GPU announced for another pod is refused."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from perseus_sidecar.podresources import (
    PodResourcesError,
    list_pod_devices,
    parse_list_response,
)

from .conftest import JOB, NS, OP, announce, node_of

GPU0, GPU1, GPU2 = "GPU-sim-n1-0", "GPU-sim-n1-1", "GPU-sim-n1-2"


def _registration(pod: str = "trainer-0", gpu: str = GPU0, rank: int = 0) -> dict[str, object]:
    return {"namespace": NS, "pod": pod, "rank": rank, "pipeline_rank": 0, "data_rank": 0,
            "tensor_rank": 0, "gpu_uuid": gpu}  # fmt: skip


# ---- a fake kubelet ------------------------------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def list_response(pods: dict[tuple[str, str], dict[str, list[str]]]) -> bytes:
    """ListPodResourcesResponse with, per pod, {resource name: device IDs} in one container
    (plus a CPU list, a field the parser must skip)."""
    out = b""
    for (namespace, name), resources in pods.items():
        devices = b"".join(
            _field(2, _field(1, r.encode()) + b"".join(_field(2, d.encode()) for d in ids))
            for r, ids in resources.items()
        )
        container = _field(1, b"main") + devices + _varint(3 << 3 | 0) + _varint(7)
        out += _field(
            1, _field(1, name.encode()) + _field(2, namespace.encode()) + _field(3, container)
        )
    return out


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return (
        len(payload).to_bytes(3, "big") + bytes((kind, flags)) + stream.to_bytes(4, "big") + payload
    )


class FakeKubelet:
    """Answers each connection's List call with `reply` (None: a trailers-only gRPC error)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.reply: bytes | None = b""
        self.paths: list[bytes] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(path))
        self._sock.listen(8)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with conn:
                self._answer(conn)

    def _answer(self, conn: socket.socket) -> None:
        f = conn.makefile("rb")
        assert f.read(24) == b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
        while True:
            header = f.read(9)
            length, kind, flags = int.from_bytes(header[:3], "big"), header[3], header[4]
            payload = f.read(length)
            if kind == 0x1:
                self.paths.append(payload)
            if kind == 0x0 and flags & 0x1:
                break
        conn.sendall(_frame(0x4, 0, 0, b""))  # the server's SETTINGS, to be acknowledged
        ok_trailers = b"\x40\x0bgrpc-status\x010"
        if self.reply is None:
            error = b"\x88\x40\x0bgrpc-status\x0212"
            conn.sendall(_frame(0x1, 0x4 | 0x1, 1, error))
            return
        message = b"\x00" + len(self.reply).to_bytes(4, "big") + self.reply
        half = len(message) // 2
        conn.sendall(_frame(0x1, 0x4, 1, b"\x88"))  # :status 200
        conn.sendall(_frame(0x0, 0, 1, message[:half]))
        padded = bytes((3,)) + message[half:] + b"\x00\x00\x00"
        conn.sendall(_frame(0x0, 0x8, 1, padded))
        conn.sendall(_frame(0x1, 0x4 | 0x1, 1, ok_trailers))
        while f.read(1):  # like a real server: stay until the client hangs up
            pass
        f.close()

    def close(self) -> None:
        self._sock.close()


@pytest.fixture
def kubelet(tmp_path: Path) -> Iterator[FakeKubelet]:
    fake = FakeKubelet(tmp_path / "kubelet.sock")
    yield fake
    fake.close()


def test_parse_list_response_reads_gpus_per_pod() -> None:
    data = list_response(
        {
            (NS, "a"): {"nvidia.com/gpu": ["GPU-x", "GPU-y"], "example.com/nic": ["eth9"]},
            (NS, "b"): {"nvidia.com/gpu.shared": ["GPU-z::3"]},
            ("other", "c"): {},
        }
    )
    assert parse_list_response(data) == {
        (NS, "a"): frozenset({"GPU-x", "GPU-y"}),
        (NS, "b"): frozenset({"GPU-z::3"}),
        ("other", "c"): frozenset(),
    }
    with pytest.raises(PodResourcesError, match="malformed"):
        parse_list_response(b"\x0a\x7f")


def test_client_speaks_grpc_over_the_unix_socket(kubelet: FakeKubelet) -> None:
    kubelet.reply = list_response({(NS, "a"): {"nvidia.com/gpu": ["GPU-x"]}})
    assert list_pod_devices(kubelet.path) == {(NS, "a"): frozenset({"GPU-x"})}
    assert b"/v1.PodResourcesLister/List" in kubelet.paths[0]
    kubelet.reply = None
    with pytest.raises(PodResourcesError, match="error and no data"):
        list_pod_devices(kubelet.path)


def test_unreachable_kubelet_is_one_line(tmp_path: Path) -> None:
    dead = tmp_path / "dead.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(dead))
    sock.close()  # the file exists, nobody listens
    with pytest.raises(PodResourcesError, match="cannot read the kubelet's pod resources"):
        list_pod_devices(dead, timeout_s=1)


# ---- registration ----------------------------------------------------------------------------


def test_gpu_of_another_pod_is_refused(client: TestClient) -> None:
    """Job pod trainer-0 holds GPU0; trainer-1 (same job, same token) cannot take it over."""
    announce(
        client,
        [("trainer-0", "testclient"), ("trainer-1", "testclient")],
        gpus={"trainer-0": [GPU0], "trainer-1": [GPU1]},
    )
    r = client.post("/v1/ranks", json=_registration("trainer-1", GPU0), headers=JOB)
    assert r.status_code == 403, r.text
    assert f"GPU {GPU0} is not assigned to pod {NS}/trainer-1" in r.json()["detail"]
    assert (
        client.post("/v1/ranks", json=_registration("trainer-1", GPU1), headers=JOB).status_code
        == 201
    )


def test_pod_without_a_known_assignment_cannot_register(client: TestClient) -> None:
    announce(client, gpus={"trainer-0": None})
    r = client.post("/v1/ranks", json=_registration(), headers=JOB)
    assert r.status_code == 403
    assert "no record of the GPUs" in r.json()["detail"]


def test_gpu_announced_for_another_jobs_pod_is_refused(client: TestClient) -> None:
    """An older announcement of another job gave GPU2 to its pod: this job's pod, told by a
    stale announcement that it holds GPU2 too, cannot register it."""
    announce(client, [("other-0", "testclient")], name="other", gpus={"other-0": [GPU2]})
    announce(client, gpus={"trainer-0": [GPU2]})
    r = client.post("/v1/ranks", json=_registration(gpu=GPU2), headers=JOB)
    assert r.status_code == 409
    assert f"announced for pod {NS}/other-0" in r.json()["detail"]


def test_reannouncement_without_the_gpu_drops_its_rank(client: TestClient) -> None:
    announce(client, gpus={"trainer-0": [GPU0]})
    assert client.post("/v1/ranks", json=_registration(), headers=JOB).status_code == 201
    announce(client, gpus={"trainer-0": [GPU1]})
    assert node_of(client).ranks == {}


def test_kubelet_is_the_source_of_truth_where_its_socket_is(
    make_client: Callable[..., TestClient], kubelet: FakeKubelet
) -> None:
    """The announcement says GPU0, the kubelet says GPU1 (as an index: the device plugin's
    index ID strategy): GPU1 it is."""
    client = make_client(pod_resources_socket=kubelet.path)
    kubelet.reply = list_response(
        {(NS, "trainer-0"): {"nvidia.com/gpu": ["1"]}, (NS, "x"): {"nvidia.com/gpu": [GPU0]}}
    )
    announce(client, gpus={"trainer-0": [GPU0]})
    r = client.post("/v1/ranks", json=_registration(gpu=GPU0), headers=JOB)
    assert r.status_code == 403
    assert "per the kubelet" in r.json()["detail"]
    assert client.post("/v1/ranks", json=_registration(gpu=GPU1), headers=JOB).status_code == 201


def test_kubelet_failure_refuses_registration_with_503(
    make_client: Callable[..., TestClient], kubelet: FakeKubelet
) -> None:
    client = make_client(pod_resources_socket=kubelet.path)
    kubelet.reply = None
    announce(client)
    r = client.post("/v1/ranks", json=_registration(), headers=JOB)
    assert r.status_code == 503
    assert "kubelet" in r.json()["detail"]


def test_announcement_gives_a_gpu_to_one_pod_only(client: TestClient) -> None:
    body = {
        "token_sha256": "0" * 64,
        "pods": [
            {"namespace": NS, "name": n, "uid": n, "ip": "x", "gpu_uuids": [GPU0]}
            for n in ("a", "b")
        ],
    }
    r = client.put(f"/v1/jobs/{NS}/j", json=body, headers=OP)
    assert r.status_code == 422
    assert "only one pod" in r.json()["message"]
