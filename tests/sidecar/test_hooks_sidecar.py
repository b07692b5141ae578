"""The hooks against a real `perseus-sidecar --gpu-backend simulated` process: registration, the
event stream and timings, schedule notices driving the sync callable, pod-IP checks, and a
SIGKILLed sidecar coming back."""

from __future__ import annotations

import logging
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import perseus_hooks as hooks
from tests.sidecar.fake_sidecar import wait_until
from tests.sim.sidecar_process import JOB_TOKEN, SidecarProcess, sidecar_process

pytestmark = pytest.mark.slow


@pytest.fixture
def real_sidecar(tmp_path: Path) -> Iterator[SidecarProcess]:
    with sidecar_process(tmp_path, gpus=2, time_scale=1.0) as sidecar:
        yield sidecar


def _pod(
    name: str, ip: str = "127.0.0.1", host_network: bool = True, gpu: str = "GPU-sim-n0-0"
) -> dict[str, object]:
    return {"namespace": "ml", "name": name, "uid": f"uid-{name}", "ip": ip,
            "host_network": host_network, "gpu_uuids": [gpu]}  # fmt: skip


def _hooks(sidecar: SidecarProcess, pod: str = "trainer-0", **kwargs: object) -> hooks.Hooks:
    args: dict[str, object] = {
        "rank": 0,
        "pipeline_rank": 0,
        "data_rank": 0,
        "gpu_uuid": "GPU-sim-n0-0",
        "host": sidecar.host,
        "port": sidecar.port,
        "namespace": "ml",
        "pod": pod,
        "job_token": JOB_TOKEN,
        "sync": None,
        "make_default": False,
        "min_backoff_s": 0.05,
        "max_backoff_s": 0.2,
    }
    args.update(kwargs)
    return hooks.register(**args)  # type: ignore[arg-type]


def _schedule() -> dict[str, object]:
    return {
        "entries": [
            {
                "data_rank": 0,
                "pipeline_rank": 0,
                "order": ["F0", "F1", "B0", "B1"],
                "frequencies_mhz": [1005, 1110, 1215, 1320],
            }
        ]
    }


def test_events_reach_the_sidecars_timings(real_sidecar: SidecarProcess) -> None:
    real_sidecar.announce("ml", "job", [_pod("trainer-0")])
    with _hooks(real_sidecar) as h:
        assert h.wait_connected(10)
        for _ in range(3):
            for kind, m in (("forward", 0), ("forward", 1), ("backward", 0), ("backward", 1)):
                with h.instruction(kind, m):  # type: ignore[arg-type]
                    pass
            h.iteration_end()
        assert h.flush(5)

        def seen() -> bool:
            ranks = real_sidecar.timings("ml", "job")["ranks"]
            return bool(ranks) and ranks[0]["iterations"] == 3

        wait_until(seen, 10)
    rank = real_sidecar.timings("ml", "job")["ranks"][0]
    assert rank["rank_id"] == h.rank_id
    assert {i["instruction"]: i["count"] for i in rank["instructions"]} == {
        "forward": 6,
        "backward": 6,
    }


def test_schedule_notices_turn_sync_on_and_off(real_sidecar: SidecarProcess) -> None:
    real_sidecar.announce("ml", "job", [_pod("trainer-0")])
    calls: list[int] = []
    with _hooks(real_sidecar, sync=lambda: calls.append(1)) as h:
        assert h.wait_connected(10)
        h.instruction_begin("forward", 0)
        assert calls == []
        response = real_sidecar.request("PUT", "/v1/jobs/ml/job/schedule", json=_schedule())
        assert response.status_code == 200, response.text
        wait_until(lambda: h.schedule_active, 10)
        h.instruction_begin("forward", 1)
        assert calls == [1]
        gpus = real_sidecar.request("GET", "/v1/gpus").json()["gpus"]
        wait_until(
            lambda: real_sidecar.request("GET", "/v1/gpus").json()["gpus"][0]["locked_by_sidecar"],
            10,
        )
        assert gpus[0]["uuid"] == "GPU-sim-n0-0"
        response = real_sidecar.request("DELETE", "/v1/jobs/ml/job/schedule")
        assert response.status_code == 204
        wait_until(lambda: not h.schedule_active, 10)
        h.instruction_begin("backward", 0)
        assert calls == [1]


def test_pod_ip_is_checked(real_sidecar: SidecarProcess, caplog: pytest.LogCaptureFixture) -> None:
    """A pod off the host network must register from its own IP: bound hooks get in, a
    process elsewhere on the host is refused (and keeps training, with one warning)."""
    real_sidecar.announce(
        "ml",
        "job",
        [_pod("pod-a", "127.0.0.31", False), _pod("pod-b", "127.0.0.32", False, "GPU-sim-n0-1")],
    )
    with caplog.at_level(logging.WARNING, logger="perseus.hooks"):
        with _hooks(real_sidecar, pod="pod-a", source_ip="127.0.0.31") as good:
            assert good.wait_connected(10)
        with _hooks(real_sidecar, pod="pod-b", rank=1, gpu_uuid="GPU-sim-n0-1") as bad:
            bad.instruction_begin("forward", 0)
            assert not bad.wait_connected(1)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "(rank 1)" in warnings[0]
    assert "registration refused with HTTP 403" in warnings[0]


def test_hooks_come_back_after_the_sidecar_is_killed(tmp_path: Path) -> None:
    """SIGKILL the sidecar mid-training and start a new one on the same ports: the hooks
    reconnect and register again once the operator re-announced the job."""
    with sidecar_process(tmp_path, gpus=2, time_scale=1.0) as first:
        first.announce("ml", "job", [_pod("trainer-0")])
        h = _hooks(first)
        assert h.wait_connected(10)
        first.process.send_signal(signal.SIGKILL)
        first.process.wait()
        wait_until(lambda: not h.wait_connected(0), 10)
        for m in range(5):
            h.instruction_begin("forward", m)  # training goes on meanwhile
        with (tmp_path / "sidecar-restarted.log").open("wb") as log:
            second = subprocess.Popen(first.command, stdout=log, stderr=subprocess.STDOUT)
        try:
            restarted = SidecarProcess(
                first.host, first.port, first.event_port, first.state_dir, second,
                tmp_path / "sidecar-restarted.log", first.command,
            )  # fmt: skip

            def ready() -> bool:
                try:
                    return restarted.request("GET", "/v1/jobs").status_code == 200
                except Exception:
                    return False

            wait_until(ready, 30)
            restarted.announce("ml", "job", [_pod("trainer-0")])
            assert h.wait_connected(15)
            assert h.rank_id is not None
            h.iteration_end()
            assert h.flush(5)
            ranks = restarted.timings("ml", "job")["ranks"]
            assert [r["rank_id"] for r in ranks] == [h.rank_id]
            assert ranks[0]["iterations"] == 1
        finally:
            h.close()
            second.send_signal(signal.SIGTERM)
            second.wait(15)
