"""The sidecar gateway (over the sidecar's own client) against a mocked transport: status codes
map to clear errors, steady polls stay at two requests, bodies are the sidecar's own models."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from perseus_operator import reconcile as rc
from perseus_operator.sidecars import (
    SidecarGateway,
    SidecarRejectedError,
    SidecarUnreachableError,
)
from tests.sidecar.fake_sidecar import FakeSidecar

GPUS = {
    "node_name": "n0",
    "gpus": [
        {
            "index": 0,
            "uuid": "GPU-0",
            "name": "A100",
            "supported_sm_clocks_mhz": [1410, 1395, 1380],
            "max_sm_clock_mhz": 1410,
            "usable": True,
        },
        {
            "index": 1,
            "uuid": "GPU-1",
            "name": "A100",
            "supported_sm_clocks_mhz": [1410, 1395],
            "max_sm_clock_mhz": 1410,
            "usable": True,
        },
    ],
}
JOB = {
    "namespace": "ns",
    "name": "p",
    "pods": [],
    "ranks": [],
    "schedule_entries": 0,
    "profiling": False,
}
TIMINGS = {
    "namespace": "ns",
    "name": "p",
    "window_s": 5.0,
    "ranks": [],
    "stages": [],
    "pipelines": [],
}


class Sidecar:
    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []
        self.job: dict[str, object] | None = dict(JOB)
        self.schedule: dict[str, object] | None = None
        self.fail: int | None = None
        self.announced: list[dict[str, object]] = []
        self.announced_microbatches: int | None = None

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        self.requests.append((request.method, path))
        assert request.headers["authorization"] == "Bearer tok"
        if self.fail is not None:
            return httpx.Response(self.fail, json={"detail": "refused: bad schedule"})
        status, body = self.route(
            request.method, path, json.loads(request.content) if request.content else None
        )
        return httpx.Response(status, json=body)

    def route(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        if path == "/v1/gpus":
            return 200, GPUS
        if path.endswith("/timings"):
            return 200, TIMINGS
        if path.endswith("/schedule"):
            if method == "PUT":
                self.schedule = {"namespace": "ns", "name": "p", "active_ranks": [], **body}
                assert self.job is not None
                self.job["schedule_entries"] = len(body["entries"])
            if self.schedule is None:
                return 404, {"detail": "none"}
            return 200, self.schedule
        if method == "PUT":
            assert body["token_sha256"] == "0" * 64
            self.announced = body["pods"]
            self.announced_microbatches = body.get("microbatches")
            return 200, self.job
        if self.job is None:
            return 404, {"detail": "no job"}
        return 200, self.job


def gateway(sidecar: Sidecar) -> SidecarGateway:
    return SidecarGateway("tok", transport=httpx.MockTransport(sidecar))


ENTRY = rc.Entry(0, 0, ("F0", "B0"), (1410, 1395))


async def test_snapshot_and_steady_polls() -> None:
    sidecar = Sidecar()
    gw = gateway(sidecar)
    snap = await gw.snapshot("h:1", "ns", "p", 5)
    assert snap.gpu_model == ("A100", frozenset({1410, 1395}))  # clocks every GPU supports
    assert snap.entries == frozenset() and snap.timings is not None
    await gw.apply("h:1", "ns", "p", [ENTRY])
    sidecar.requests.clear()
    snap = await gw.snapshot("h:1", "ns", "p", 5)
    assert snap.entries == frozenset({ENTRY})
    assert len(sidecar.requests) == 2  # job + timings; gpus cached, schedule known
    pod = rc.PodView("p0", "uid0", "Running", "10.0.0.1", "10.1.0.1", "n0")
    await gw.announce("h:1", "ns", "p", "0" * 64, [pod])
    assert sidecar.announced == [
        {
            "namespace": "ns",
            "name": "p0",
            "uid": "uid0",
            "ip": "10.0.0.1",
            "host_network": False,
            "gpu_uuids": None,
        }
    ]
    assigned = rc.PodView("p0", "uid0", "Running", "10.0.0.1", "10.1.0.1", "n0", False, ("G-1",))
    await gw.announce("h:1", "ns", "p", "0" * 64, [assigned], microbatches=12)
    assert sidecar.announced[0]["gpu_uuids"] == ["G-1"]
    assert sidecar.announced_microbatches == 12
    assert sidecar.job is not None
    sidecar.job["pods"] = sidecar.announced
    snap = await gw.snapshot("h:1", "ns", "p", 5)
    assert snap.announced_pods == frozenset({pod.identity})
    sidecar.job = None  # the sidecar restarted and forgot the job
    snap = await gw.snapshot("h:1", "ns", "p", 5)
    assert snap.announced_pods == frozenset() and snap.entries == frozenset()
    await gw.close()


@pytest.mark.parametrize(
    ("code", "error", "text"),
    [(503, SidecarUnreachableError, "HTTP 503"), (422, SidecarRejectedError, "bad schedule")],
)
async def test_errors_are_one_line(code: int, error: type[Exception], text: str) -> None:
    sidecar = Sidecar()
    gw = gateway(sidecar)
    await gw.gpu_model("h:1")
    sidecar.fail = code
    with pytest.raises(error) as info:
        await gw.apply("h:1", "ns", "p", [ENTRY])
    assert text in str(info.value) and "\n" not in str(info.value)
    await gw.close()


async def test_connection_refused_is_unreachable() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    gw = SidecarGateway("tok", transport=httpx.MockTransport(refuse))
    with pytest.raises(SidecarUnreachableError, match="connection refused"):
        await gw.snapshot("h:1", "ns", "p", 5)
    await gw.close()


async def test_no_usable_gpu_is_unreachable() -> None:
    def no_gpus(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"node_name": "n", "gpus": []})

    gw = SidecarGateway("tok", transport=httpx.MockTransport(no_gpus))
    with pytest.raises(SidecarUnreachableError, match="no usable GPU"):
        await gw.gpu_model("h:1")
    await gw.close()


async def test_real_http_with_the_token() -> None:
    """Over real HTTP, against the tests' fake sidecar (the one the operator benchmark runs):
    the bearer token and the timing window arrive as sent, a schedule pushed is read back, a
    wrong token is refused."""
    fake = FakeSidecar(operator_token="tok", gpu_name="A100", clocks_mhz=(1410, 1395)).start()
    address = f"127.0.0.1:{fake.http_port}"
    pod = rc.PodView("p0", "u0", "Running", "10.0.0.1", "10.1.0.1", "n0")
    gw = SidecarGateway("tok")
    try:
        snap = await gw.snapshot(address, "ns", "p", 2.5)
        assert snap.gpu_model == ("A100", frozenset({1410, 1395})) and snap.timings is None
        await gw.announce(address, "ns", "p", "0" * 64, [pod])
        await gw.apply(address, "ns", "p", [ENTRY])
        gw._applied.clear()  # read the schedule back from the sidecar, not from the cache
        snap = await gw.snapshot(address, "ns", "p", 2.5)
        assert snap.announced_pods == {pod.identity} and snap.entries == {ENTRY}
        assert snap.timings is not None
        timings = [r for r in fake.control_requests if r.path == "/v1/jobs/ns/p/timings"]
        assert [(r.authorization, r.query["window_s"]) for r in timings] == [
            ("Bearer tok", ["2.5"])
        ]
        await gw.forget(address, "ns", "p")
        assert fake.jobs == {} and fake.schedules == {}
        intruder = SidecarGateway("not-the-operator")
        with pytest.raises(SidecarRejectedError, match="HTTP 401"):
            await intruder.announce(address, "ns", "p", "0" * 64, [pod])
        await intruder.close()
        assert fake.jobs == {}
    finally:
        await gw.close()
        fake.stop()
