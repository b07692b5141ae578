"""An interleaved 1F1B policy on the simulated cluster: a per-chunk profile imported, Megatron's
order played by the simulated trainer, schedules naming each instruction's chunk applied, and
the measured saving close to the predicted one."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from perseus_operator.sidecars import SidecarGateway
from perseus_profiles import load_example
from perseus_sim.cluster import SimCluster
from tests.e2e.conftest import (
    create_policy,
    needs_cluster,
    running_sim,
    start_job,
    wait_condition,
    wait_measured_close,
)

pytestmark = [pytest.mark.e2e, needs_cluster, pytest.mark.timeout(300)]

PIPELINE = {
    "stages": 4,
    "microbatches": 8,
    "dataParallel": 2,
    "schedule": "interleaved-1f1b",
    "virtualStages": 2,
}


@pytest.fixture
async def interleaved(tmp_path: Path) -> AsyncIterator[SimCluster]:
    """The e2e job (2 pipelines x 4 stages) whose GPUs play a per-chunk profile: the real
    profile's stages 0, 1, 2 and 7, each split in two chunks. At time scale 1 (wall = simulated
    seconds): a chunk's instructions are half as long as a stage's, and at 0.5 the sidecar's
    unscaled reaction time to each clock change cost 2.1-2.4 pp of the measured saving (16.27%
    predicted, 13.9-14.2% measured; 16.28% at time scale 1)."""
    profile = load_example("gpt3-175b-a100").select_stages((0, 1, 2, 7)).split_chunks(2)
    async with running_sim(tmp_path, profile, 1.0) as cluster:
        yield cluster


async def test_interleaved_policy_reaches_optimizing(interleaved: SimCluster) -> None:
    sim = interleaved
    await create_policy(sim, pipeline=PIPELINE)
    await start_job(sim)
    st = await wait_condition(sim, "ScheduleApplied", "True", 90)
    assert st["phase"] == "Optimizing" and st["registeredRanks"] == 8
    assert float(st["predictedSavingPercent"]) > 5
    gateway = SidecarGateway(sim.token)
    try:
        snap = await gateway.snapshot(
            f"{sim.job.node_ip(0)}:8080", sim.job.namespace, sim.job.policy, 5
        )
    finally:
        await gateway.close()
    assert snap.entries
    for entry in snap.entries:
        assert len(entry.order) == 2 * 8 * 2
        assert {text.rsplit("c", 1)[1] for text in entry.order} == {"0", "1"}

    # The simulated GPUs run each chunk's instructions at the clocks planned for that chunk: the
    # measured saving comes close to the prediction, as for 1F1B (tests/e2e/test_lifecycle.py).
    st = await wait_measured_close(sim, 3.0, 120)
    print(f"predicted {st['predictedSavingPercent']}%, measured {st['measuredSavingPercent']}%")
