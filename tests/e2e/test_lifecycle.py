"""A policy's whole life on a real API server: Ready with schedules applied and the measured
saving close to the prediction, a SIGKILLed sidecar, the job finishing, deletion."""

from __future__ import annotations

import time
from typing import Any

import pytest
from kubernetes_asyncio import client

from perseus_operator.model import GROUP, PLURAL, VERSION
from perseus_operator.sidecars import SidecarGateway, SidecarUnreachableError
from perseus_sim.cluster import SimCluster
from perseus_sim.kubeobjects import wait_for
from tests.e2e.conftest import (
    KUBECONFIG,
    condition,
    create_policy,
    kubectl,
    needs_cluster,
    start_job,
    status,
    wait_condition,
    wait_measured_close,
    wait_phase,
    wait_unlocked,
)

pytestmark = [pytest.mark.e2e, needs_cluster, pytest.mark.timeout(300)]


async def node_entries(sim: SimCluster, node: int) -> int:
    """Schedule entries the node's sidecar holds for the job (0 while it is down)."""
    gateway = SidecarGateway(sim.token)
    try:
        snap = await gateway.snapshot(
            f"{sim.job.node_ip(node)}:8080", sim.job.namespace, sim.job.policy, 5
        )
    except SidecarUnreachableError:
        return 0
    finally:
        await gateway.close()
    return len(snap.entries)


async def test_optimize_crash_finish_delete(sim: SimCluster) -> None:
    ns, name = sim.job.namespace, sim.job.policy
    t_apply = time.monotonic()
    await create_policy(sim)
    await start_job(sim)
    st = await wait_condition(sim, "ScheduleApplied", "True", 60)
    applied_s = time.monotonic() - t_apply
    print(f"policy applied -> schedules applied: {applied_s:.1f}s")
    assert st["phase"] == "Optimizing" and st["registeredRanks"] == 8
    assert all([await node_entries(sim, i) for i in range(sim.job.nodes)])

    waited = kubectl(
        "-n", ns, "wait", "--for=condition=Ready", f"energypolicy/{name}", "--timeout=60s"
    )
    assert waited.returncode == 0, waited.stderr
    table = kubectl("-n", ns, "get", "energypolicies")
    header, row = table.stdout.splitlines()[:2]
    assert header.split() == ["NAME", "PHASE", "READY", "SAVING%", "ITERATION(S)", "AGE"]
    assert row.split()[:3] == [name, "Optimizing", "True"]
    assert kubectl("-n", ns, "get", "enp", name).returncode == 0  # the short name
    events = await client.CoreV1Api(sim.api).list_namespaced_event(
        ns, field_selector=f"involvedObject.name={name},involvedObject.kind=EnergyPolicy"
    )
    reasons = {e.reason for e in events.items}
    assert {"Pending", "Planning", "Optimizing", "ProfileReady", "Applied"} <= reasons, reasons

    st = await wait_measured_close(sim, 3.0, 90)
    print(f"predicted {st['predictedSavingPercent']}%, measured {st['measuredSavingPercent']}%")
    assert float(st["predictedSavingPercent"]) > 5
    recent = sim.trainer_iterations()[-4:]
    assert all(abs(t / base - 1) <= 0.02 for _, t, base, _ in recent), recent

    # operator restart: resumes from the status (no baseline); the policy's own import is read
    # again (a stored profile never replaces an explicit import)
    baseline = st["measuredBaseline"]
    sim.stop_operator()
    sim.start_operator(KUBECONFIG)
    patched = await client.CustomObjectsApi(sim.api).patch_namespaced_custom_object(  # type: ignore[call-arg]
        GROUP,
        VERSION,
        ns,
        PLURAL,
        name,
        {"spec": {"stragglers": {"threshold": 0.06}}},
        _content_type="application/merge-patch+json",
    )

    async def resumed() -> dict[str, Any] | None:
        s = await status(sim)
        return s if s.get("observedGeneration") == patched["metadata"]["generation"] else None

    st = await wait_for("the restarted operator's status", resumed, 60, 0.2)
    assert st["phase"] == "Optimizing" and st["measuredBaseline"] == baseline
    assert condition(st, "Profiled")["message"].startswith(f"imported from {ns}/")
    assert condition(st, "Ready")["status"] == "True"

    # kill -9 one sidecar: Degraded; restarted, it resets its clocks and gets the schedule again
    sim.kill_sidecar(1)
    st = await wait_phase(sim, "Degraded", 30)
    assert "sim" in condition(st, "Ready")["message"] or condition(st, "Ready")["reason"]
    sim.start_sidecar(1, fresh=False)
    await wait_for("the restarted sidecar's schedule", lambda: node_entries(sim, 1), 60, 0.5)
    await wait_condition(sim, "Ready", "True", 60)

    # the job's pods finish: Completed, every clock reset at once
    sim.stop_trainer()
    await sim.finish_job_pods()
    t_done = time.monotonic()
    st = await wait_phase(sim, "Completed", 20)
    await wait_unlocked(sim, 5)
    print(f"pods finished -> Completed and clocks reset: {time.monotonic() - t_done:.1f}s")
    assert condition(st, "Ready")["reason"] == "JobFinished"

    # delete: the finalizer removes the job from every sidecar; nothing stays locked
    deleted = kubectl("-n", ns, "delete", "energypolicy", name, "--timeout=60s")
    assert deleted.returncode == 0, deleted.stderr
    assert await status(sim) == {}
    await wait_unlocked(sim, 5)
