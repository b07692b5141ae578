"""What the API server and the operator refuse, Observe mode, and two policies on one job."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import yaml

from perseus_sim.cluster import SimCluster
from perseus_sim.simjob import policy_manifest
from tests.e2e.conftest import (
    PROFILE_CM,
    condition,
    create_policy,
    kubectl,
    needs_cluster,
    start_job,
    status,
    wait_condition,
)

pytestmark = [pytest.mark.e2e, needs_cluster, pytest.mark.timeout(300)]


def apply(sim: SimCluster, tmp_path: Path, name: str, **spec: object) -> tuple[int, str]:
    body = policy_manifest(sim.job, PROFILE_CM, **spec)
    body["metadata"]["name"] = name
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body))
    done = kubectl("apply", "-f", str(path))
    return done.returncode, done.stderr


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            {"pipeline": {"stages": 0, "microbatches": 8}},
            "spec.pipeline.stages in body should be greater than or equal to 1",
        ),
        ({"mode": "Fast"}, 'spec.mode: Unsupported value: "Fast"'),
        ({"blockingPowerW": -5}, "spec.blockingPowerW in body should be greater than 0"),
        (
            {"profile": {"import": {"configMap": "a"}, "measure": {}}},
            "must validate one and only one schema (oneOf)",
        ),
        ({"profileKey": "Not Valid"}, "spec.profileKey in body should match"),
    ],
)
async def test_schema_rejects_bad_specs(
    bare: SimCluster, tmp_path: Path, spec: dict[str, object], message: str
) -> None:
    code, stderr = apply(bare, tmp_path, "bad", **spec)
    assert code != 0 and message in stderr, stderr


async def test_observe_conflict_and_cross_field_rules(sim: SimCluster, tmp_path: Path) -> None:
    await create_policy(sim, mode="Observe")
    await start_job(sim)
    st = await wait_condition(sim, "Ready", "True", 60, reason="Observing")
    assert st["predictedSavingPercent"] > 5
    assert condition(st, "ScheduleApplied")["reason"] == "ObserveMode"
    for _ in range(20):  # a few iterations: Observe never locks a clock
        assert all(v is None for v in sim.locked_clocks().values())
        await asyncio.sleep(0.25)

    # A second policy selecting the same pods is refused with a clear condition.
    await create_policy(sim, name="second")
    st = await wait_condition(sim, "Ready", "False", 30, reason="Conflict", name="second")
    assert st["phase"] == "Failed"
    assert "already managed by EnergyPolicy train" in condition(st, "Ready")["message"]

    # What the schema cannot say (no CEL on 1.20) becomes Failed/Invalid with the rule.
    code, stderr = apply(
        sim,
        tmp_path,
        "inverted",
        selector={"matchLabels": {"job": "nothing"}},
        profile={"measure": {"frequencies": {"minMHz": 1400, "maxMHz": 900}}},
    )
    assert code == 0, stderr
    st = await wait_condition(sim, "Ready", "False", 30, reason="Invalid", name="inverted")
    assert st["phase"] == "Failed"
    assert "minMHz (1400) exceeds maxMHz (900)" in condition(st, "Ready")["message"]
    assert (await status(sim))["phase"] == "Planning"  # the first policy is unaffected
