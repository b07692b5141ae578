"""The operator drives a simulated job to Ready with only the chart's RBAC: its kubeconfig is the
ServiceAccount token of a helm-installed release, not the admin credential, so a permission the
chart lacks fails here with a Forbidden (e2e, on the local control plane)."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from kubernetes_asyncio import client, config

from perseus_profiles import load_example
from perseus_sim.cluster import SimCluster
from perseus_sim.simjob import SimJob
from tests.chart._scripts import K8S_BIN
from tests.chart.release import (
    OperatorRelease,
    install_operator_release,
    uninstall_operator_release,
)
from tests.e2e.conftest import create_policy, kubectl, status, wait_condition, wait_unlocked

KUBECONFIG = os.environ.get("KUBECONFIG", "")
PROFILE_CM = "train-profile"

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not KUBECONFIG, reason="e2e: KUBECONFIG not set (scripts/cluster.sh)"),
    pytest.mark.skipif(
        not (K8S_BIN / "helm").is_file(), reason="scripts/cluster.sh build has not run"
    ),
    pytest.mark.timeout(300),
]


@pytest.fixture
async def chart_sim(tmp_path: Path) -> AsyncIterator[tuple[SimCluster, OperatorRelease]]:
    suffix = uuid.uuid4().hex[:6]
    release = install_operator_release(
        Path(KUBECONFIG), tmp_path, release=f"perseus-{suffix}", namespace=f"perseus-{suffix}"
    )
    await config.load_kube_config()
    api = client.ApiClient()
    name = f"rbac-{suffix}"
    # Loopback addresses of its own, so it never collides with another simulated job's sidecars.
    job = SimJob(
        namespace=name,
        policy="train",
        time_scale=0.5,
        node_prefix=name,
        node_ip_base="127.0.42.100",
        pod_ip_base="127.0.43.1",
    )
    profile = load_example("gpt3-175b-a100").select_stages((0, 1, 2, 7))
    # As the chart runs it: the operator's own namespace is the release's (downward API), and
    # its sidecar DaemonSet's pods run there.
    cluster = SimCluster(
        api, job, tmp_path / "sim", profile.to_csv(), operator_namespace=release.namespace
    )
    try:
        await cluster.start()
        cluster.start_operator(str(release.kubeconfig))
        await cluster.create_profile_configmap(PROFILE_CM)
        yield cluster, release
    finally:
        await cluster.close()
        await api.close()
        uninstall_operator_release(Path(KUBECONFIG), release)


def forbidden_lines(sim: SimCluster) -> list[str]:
    log = (sim.workdir / "operator.log").read_text(errors="replace")
    return [line for line in log.splitlines() if "Forbidden" in line or "(403)" in line]


async def test_policy_reaches_ready_and_is_deleted_under_the_chart_rbac(
    chart_sim: tuple[SimCluster, OperatorRelease],
) -> None:
    sim, release = chart_sim
    await create_policy(sim)
    token = await sim.job_token()  # the job-token Secret, created under the ServiceAccount
    sim.start_trainer(token)
    try:
        st = await wait_condition(sim, "Ready", "True", 90)
    except TimeoutError as exc:
        pytest.fail(f"{exc}; permission errors: {forbidden_lines(sim)[:3]}")
    assert st["phase"] == "Optimizing"
    # the imported profile is stored for reuse in the operator's own namespace
    stored = kubectl("-n", release.namespace, "get", "configmap", st["profileConfigMap"])
    assert stored.returncode == 0, stored.stderr
    deleted = kubectl(
        "-n", sim.job.namespace, "delete", "energypolicy", sim.job.policy, "--timeout=60s"
    )
    assert deleted.returncode == 0, deleted.stderr
    assert await status(sim) == {}
    await wait_unlocked(sim, 10)
    assert forbidden_lines(sim) == []
