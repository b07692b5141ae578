"""The operator's async client and the sync rank client against the app."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from perseus_profiles import StageProfile
from perseus_sidecar.api import (
    EventIn,
    JobAnnouncement,
    PodAnnouncement,
    ProfilingRequest,
    RankRegistration,
    ScheduleIn,
)
from perseus_sidecar.app import create_app
from perseus_sidecar.client import (
    RankClient,
    SidecarClient,
    SidecarError,
    SidecarUnavailableError,
    token_sha256,
)
from perseus_sidecar.gpu.simulated import SimulatedBackend

from .conftest import JOB_SHA, JOB_TOKEN, NAME, NS, OPERATOR_TOKEN, make_settings, schedule_body


async def test_operator_client_drives_every_control_endpoint(
    profile: StageProfile, tmp_path: Path
) -> None:
    assert token_sha256(JOB_TOKEN) == JOB_SHA
    backend = SimulatedBackend(profile, 2, tmp_path / "sim", node_name="n1")
    app = create_app(make_settings(tmp_path / "state"), backend)
    with TestClient(app) as tc:  # runs the lifespan (inventory, transport)
        op = SidecarClient("http://sidecar", OPERATOR_TOKEN, transport=httpx.ASGITransport(app))
        async with op:
            assert (await op.health()).status == "ok"
            assert (await op.ready()).ready
            assert len((await op.gpus()).gpus) == 2
            job = JobAnnouncement(
                token_sha256=JOB_SHA,
                pods=[
                    PodAnnouncement(
                        namespace=NS,
                        name="p0",
                        uid="u",
                        ip="x",
                        host_network=True,
                        gpu_uuids=["GPU-sim-n1-0"],
                    )
                ],
            )
            assert (await op.announce_job(NS, NAME, job)).pods[0].name == "p0"
            assert (await op.get_job(NS, NAME)) is not None
            assert await op.get_job(NS, "other") is None
            assert [j.name for j in await op.list_jobs()] == [NAME]
            with RankClient("http://testserver", JOB_TOKEN, http=tc) as rc:
                reg = rc.register(
                    RankRegistration(
                        namespace=NS,
                        pod="p0",
                        rank=0,
                        pipeline_rank=0,
                        data_rank=0,
                        tensor_rank=0,
                        gpu_uuid="GPU-sim-n1-0",
                    )
                )
                schedule = ScheduleIn.model_validate(
                    schedule_body([(0, 0)], (profile.frequencies_mhz[3],))
                )
                out = await op.put_schedule(NS, NAME, schedule)
                assert out.active_ranks == [reg.rank_id]
                assert (await op.get_schedule(NS, NAME)) == out
                accepted = rc.post_events(
                    reg.rank_id, [EventIn(kind="FB", microbatch=0, t_ns=time.time_ns())]
                )
                assert accepted.schedule_active
                assert backend.locked_sm_clock_mhz("GPU-sim-n1-0") == profile.frequencies_mhz[3]
                with pytest.raises(SidecarError) as info:
                    rc.post_events("nope", [EventIn(kind="IE", microbatch=-1, t_ns=1)])
                assert info.value.status == 401
            timings = await op.timings(NS, NAME, window_s=10)
            assert timings.ranks[0].schedule_active
            await op.delete_schedule(NS, NAME)
            await op.delete_schedule(NS, NAME)  # missing_ok
            assert await op.get_schedule(NS, NAME) is None
            with pytest.raises(SidecarError) as info:
                await op.delete_schedule(NS, NAME, missing_ok=False)
            assert info.value.status == 404
            bad = ScheduleIn.model_validate(schedule_body([(0, 0)], (1,)))
            with pytest.raises(SidecarError) as info:
                await op.put_schedule(NS, NAME, bad)
            assert info.value.status == 422 and "not supported" in info.value.message
            request = ProfilingRequest(
                frequencies_mhz=[profile.max_frequency_mhz], iterations_per_frequency=1
            )
            assert (await op.start_profiling(NS, NAME, request)).state == "running"
            status = await op.get_profiling(NS, NAME)
            assert status is not None and status.ranks_total == 1
            cancelled = await op.cancel_profiling(NS, NAME)
            assert cancelled is not None and cancelled.state == "cancelled"
            assert await op.cancel_profiling(NS, NAME) is None
            assert (await op.reset_clocks()).schedules_removed == 0
            await op.delete_job(NS, NAME)
            await op.delete_job(NS, NAME)
        wrong = SidecarClient("http://s", "wrong-token", transport=httpx.ASGITransport(app))
        async with wrong:
            with pytest.raises(SidecarError) as info:
                await wrong.gpus()
            assert info.value.status == 401


async def test_unreachable_sidecar() -> None:
    async with SidecarClient("http://127.0.0.1:1", OPERATOR_TOKEN, timeout_s=1) as op:
        with pytest.raises(SidecarUnavailableError):
            await op.gpus()
        with pytest.raises(SidecarUnavailableError):
            await op.ready()
    with (
        RankClient("http://127.0.0.1:1", JOB_TOKEN, timeout_s=1) as rc,
        pytest.raises(SidecarUnavailableError),
    ):
        rc.post_events("r", [EventIn(kind="IE", microbatch=-1, t_ns=1)])
