"""e2e fixtures: a simulated job on the real local control plane (scripts/cluster.sh).

Every test gets its own namespace, fake nodes, sidecar processes and operator process, and
removes them at the end. Skipped when KUBECONFIG is unset, so unit runs work anywhere.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

from perseus_operator.model import GROUP, PLURAL, VERSION
from perseus_profiles import StageProfile, load_example
from perseus_sim.cluster import SimCluster
from perseus_sim.kubeobjects import wait_for
from perseus_sim.simjob import SimJob, policy_manifest

KUBECONFIG = os.environ.get("KUBECONFIG", "")
ROOT = Path(__file__).resolve().parents[2]
PROFILE_CM = "train-profile"

needs_cluster = pytest.mark.skipif(
    not KUBECONFIG, reason="needs the local control plane: KUBECONFIG (scripts/test.sh sets it)"
)


def kubectl_path() -> str:
    local = ROOT / ".cache" / "k8s" / "bin" / "kubectl"
    return str(local) if local.exists() else (shutil.which("kubectl") or "kubectl")


def kubectl(*args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [kubectl_path(), *args], capture_output=True, text=True, check=check, timeout=120
    )


@contextlib.asynccontextmanager
async def running_sim(
    tmp_path: Path, profile: StageProfile, time_scale: float
) -> AsyncIterator[SimCluster]:
    """A simulated cluster (its sidecars playing `profile`) with the operator running and the
    profile ConfigMap created; everything removed on exit."""
    await config.load_kube_config(config_file=KUBECONFIG)
    api = client.ApiClient()
    name = f"e2e-{uuid.uuid4().hex[:6]}"
    job = SimJob(namespace=name, policy="train", time_scale=time_scale, node_prefix=name)
    cluster = SimCluster(api, job, tmp_path / "sim", profile.to_csv())
    try:
        await cluster.start(with_operator=KUBECONFIG)
        await cluster.create_profile_configmap(PROFILE_CM)
        yield cluster
    finally:
        await cluster.close()
        await api.close()


@pytest.fixture
async def sim(tmp_path: Path) -> AsyncIterator[SimCluster]:
    profile = load_example("gpt3-175b-a100").select_stages((0, 1, 2, 7))
    async with running_sim(tmp_path, profile, 0.5) as cluster:
        yield cluster


@pytest.fixture
async def bare(tmp_path: Path) -> AsyncIterator[SimCluster]:
    """Only the CRD and a namespace: for what the API server decides alone."""
    await config.load_kube_config(config_file=KUBECONFIG)
    api = client.ApiClient()
    name = f"e2e-{uuid.uuid4().hex[:6]}"
    job = SimJob(namespace=name, policy="train", node_prefix=name)
    cluster = SimCluster(api, job, tmp_path / "sim", "")
    try:
        await cluster.install_crd()
        await cluster.create_namespace()
        yield cluster
    finally:
        await cluster.close()
        await api.close()


async def create_policy(sim: SimCluster, name: str | None = None, **spec: Any) -> None:
    body = policy_manifest(sim.job, PROFILE_CM, **spec)
    if name is not None:
        body["metadata"]["name"] = name
    await client.CustomObjectsApi(sim.api).create_namespaced_custom_object(
        GROUP, VERSION, sim.job.namespace, PLURAL, body
    )


async def status(sim: SimCluster, name: str | None = None) -> dict[str, Any]:
    try:
        body = await client.CustomObjectsApi(sim.api).get_namespaced_custom_object(
            GROUP, VERSION, sim.job.namespace, PLURAL, name or sim.job.policy
        )
    except ApiException as exc:
        if exc.status == 404:
            return {}
        raise
    st: dict[str, Any] = body.get("status") or {}
    return st


def condition(st: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in st.get("conditions") or [] if c["type"] == kind), {})


async def wait_condition(
    sim: SimCluster,
    kind: str,
    value: str,
    timeout_s: float,
    *,
    reason: str | None = None,
    name: str | None = None,
) -> dict[str, Any]:
    seen: list[dict[str, Any]] = [{}]

    async def probe() -> dict[str, Any] | None:
        st = seen[0] = await status(sim, name)
        c = condition(st, kind)
        ok = c.get("status") == value and (reason is None or c.get("reason") == reason)
        return st if ok else None

    try:
        found: dict[str, Any] = await wait_for(f"{kind}={value}", probe, timeout_s)
    except TimeoutError as exc:
        last = {k: seen[0].get(k) for k in ("phase", "conditions", "registeredRanks")}
        raise TimeoutError(f"{exc}; wanted reason {reason}; last status {last}") from None
    return found


async def wait_phase(sim: SimCluster, phase: str, timeout_s: float) -> dict[str, Any]:
    async def probe() -> dict[str, Any] | None:
        st = await status(sim)
        return st if st.get("phase") == phase else None

    found: dict[str, Any] = await wait_for(f"phase {phase}", probe, timeout_s)
    return found


async def start_job(sim: SimCluster, *extra: str) -> float:
    """Start the trainer once the operator created the job token; returns when it started."""
    token = await sim.job_token()
    sim.start_trainer(token, extra=extra)
    return time.monotonic()


async def wait_measured_close(
    sim: SimCluster, within_pp: float, timeout_s: float
) -> dict[str, Any]:
    """The status once the measured saving is within `within_pp` points of the predicted one."""

    async def close_to_prediction() -> dict[str, Any] | None:
        s = await status(sim)
        measured, predicted = s.get("measuredSavingPercent"), s.get("predictedSavingPercent")
        if not isinstance(measured, float | int) or not isinstance(predicted, float | int):
            return None
        return s if abs(measured - predicted) <= within_pp else None

    found: dict[str, Any] = await wait_for(
        f"measured saving within {within_pp:g} pp of predicted", close_to_prediction, timeout_s, 0.5
    )
    return found


async def wait_unlocked(sim: SimCluster, timeout_s: float) -> None:
    async def probe() -> bool:
        return all(v is None for v in sim.locked_clocks().values())

    await wait_for("every simulated GPU back to default clocks", probe, timeout_s)
