"""Profiling through the sidecars: a downward sweep over the simulated GPUs; the measured profile
is stored (keyed by the namespace, GPU model, stages, tensor-parallel degree and profileKey) and
planned."""

from __future__ import annotations

import pytest
from kubernetes_asyncio import client

from perseus_operator.kube import profile_configmap_name
from perseus_operator.model import GROUP, PLURAL, VERSION
from perseus_profiles import parse_profile_csv
from perseus_sim.cluster import SimCluster
from perseus_sim.simjob import policy_manifest
from tests.e2e.conftest import PROFILE_CM, condition, needs_cluster, start_job, wait_condition

pytestmark = [pytest.mark.e2e, needs_cluster, pytest.mark.timeout(300)]


async def test_measured_profile_is_stored_and_used(sim: SimCluster) -> None:
    measure = {
        "frequencies": {"minMHz": 1200, "maxMHz": 1410, "stepMHz": 60},
        "iterationsPerFrequency": 2,
    }
    body = policy_manifest(sim.job, PROFILE_CM, profile={"measure": measure}, profileKey="m-e2e")
    del body["spec"]["blockingPowerW"]  # measured too
    await client.CustomObjectsApi(sim.api).create_namespaced_custom_object(
        GROUP, VERSION, sim.job.namespace, PLURAL, body
    )
    await start_job(sim)
    st = await wait_condition(sim, "Profiled", "True", 180)
    assert "measured through the sidecars" in condition(st, "Profiled")["message"]
    st = await wait_condition(sim, "Ready", "True", 60)
    assert st["predictedSavingPercent"] > 0
    assert abs(st["blockingPowerW"] - 83.64) < 10  # the simulated GPUs' idle power

    name = profile_configmap_name(sim.job.namespace, "Simulated GPU", 4, 1, "m-e2e")
    assert st["profileConfigMap"] == name
    cm = await client.CoreV1Api(sim.api).read_namespaced_config_map(name, sim.job.namespace)
    profile = parse_profile_csv(cm.data["profile.csv"])
    assert profile.num_stages == 4
    assert max(profile.frequencies_mhz) <= 1410 and min(profile.frequencies_mhz) >= 1200
    assert len(profile.frequencies_mhz) >= 2
