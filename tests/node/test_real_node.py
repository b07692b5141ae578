"""The whole system as real pods on a one-node cluster (scripts/node.sh): the chart installed
from the built image, the demo's EnergyPolicy, the training job as one pod per rank, and what
users do to it: delete the sidecar, the operator or a training pod, let the job finish, upgrade
and uninstall the chart. The tests run in file order and share one installation.

Run by scripts/node-e2e.sh (the last stage of scripts/test.sh), which sets PERSEUS_NODE_RUN and
KUBECONFIG.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from perseus_sim.nodedemo import DEMO_JOB, RELEASE, SYSTEM_NS, Cluster, condition, wait_for
from perseus_sim.nodejob import NodeJob

RUN = os.environ.get("PERSEUS_NODE_RUN", "")
ROOT = Path(__file__).resolve().parents[2]
SIDECARS = "app.kubernetes.io/component=sidecar"
OPERATORS = "app.kubernetes.io/component=operator"

pytestmark = [
    pytest.mark.node,
    pytest.mark.skipif(not RUN, reason="needs the real node: scripts/node-e2e.sh"),
    pytest.mark.timeout(600),
]


@pytest.fixture(scope="module")
def cluster() -> Cluster:
    bin_dir = subprocess.run(
        [str(ROOT / "scripts" / "cluster.sh"), "bin"], capture_output=True, text=True, check=True
    ).stdout.strip()
    run = Path(RUN)
    return Cluster(Path(bin_dir), run / "hostpath" / "gpus", run / "state/kubelet/pod-resources")


@pytest.fixture(scope="module")
def job(cluster: Cluster) -> NodeJob:
    return DEMO_JOB


def all_unlocked(cluster: Cluster) -> bool:
    return all(v is None for v in cluster.locked_clocks())


def any_locked(cluster: Cluster) -> bool:
    return any(v is not None for v in cluster.locked_clocks())


def healthy(cluster: Cluster, job: NodeJob) -> dict[str, Any] | None:
    st = cluster.status(job)
    ok = st.get("phase") == "Optimizing" and st.get("registeredRanks") == job.ranks
    return st if ok and condition(st, "ScheduleApplied").get("status") == "True" else None


def test_node_hands_out_simulated_gpus_through_the_device_plugin(
    cluster: Cluster, job: NodeJob
) -> None:
    """scripts/node/sim_device_plugin.py: the kubelet offers 8 `nvidia.com/gpu` and gives a pod
    that requests two the lowest free ones, with the environment the hooks read."""
    node = cluster.kjson("get", "node", "perseus-node")
    assert node["status"]["allocatable"]["nvidia.com/gpu"] == "8"
    namespace, uuids = "gpu-check", ["GPU-sim-perseus-node-0", "GPU-sim-perseus-node-1"]
    command = (
        "import os; print(os.environ['PERSEUS_GPU_UUID'], os.environ['NVIDIA_VISIBLE_DEVICES'])"
    )
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "two-gpus", "namespace": namespace},
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "main",
                    "image": job.image,
                    "imagePullPolicy": "IfNotPresent",
                    "command": ["python3", "-c", command],
                    "resources": {"limits": {"nvidia.com/gpu": 2}},
                }
            ],
        },
    }
    cluster.apply([{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}, pod])
    try:

        def finished() -> str | None:
            phase = cluster.kjson("-n", namespace, "get", "pod", "two-gpus")["status"].get("phase")
            return phase if phase in ("Succeeded", "Failed") else None

        assert wait_for("the GPU pod", finished, 120) == "Succeeded"
        logs = cluster.kubectl("-n", namespace, "logs", "two-gpus").stdout.split()
        assert logs == [uuids[0], ",".join(uuids)]
        plugin_log = (Path(RUN) / "logs" / "device-plugin.log").read_text()
        assert f"allocated {','.join(uuids)}" in plugin_log
    finally:
        cluster.kubectl("delete", "namespace", namespace, "--wait=true", check=False)


def test_chart_installs_as_real_pods(cluster: Cluster) -> None:
    cluster.install_chart()
    sidecar = cluster.ready_pod(SYSTEM_NS, SIDECARS)
    operator = cluster.ready_pod(SYSTEM_NS, OPERATORS)
    assert sidecar is not None and operator is not None
    assert operator["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
    assert operator["spec"]["securityContext"]["runAsNonRoot"] is True
    assert sidecar["spec"]["hostNetwork"] is True
    clocks = wait_for("the simulated GPUs", lambda: cluster.locked_clocks() or None, 30)
    assert len(clocks) == 8 and all(v is None for v in clocks)


def test_policy_optimizes_the_job_running_as_pods(cluster: Cluster, job: NodeJob) -> None:
    cluster.start_job(job)
    st = cluster.wait_optimizing(job, 300)
    assert st["registeredRanks"] == job.ranks
    wait_for("a clock locked by a schedule", lambda: any_locked(cluster), 30, 0.05)
    st = cluster.wait_measured(job, 180, min_fraction=0.5)
    print(f"predicted {st['predictedSavingPercent']}%, measured {st['measuredSavingPercent']}%")
    assert float(st["predictedSavingPercent"]) > 5
    assert float(st["measuredSavingPercent"]) <= float(st["predictedSavingPercent"]) + 3
    assert condition(st, "Ready").get("status") == "True"
    table = cluster.kubectl("-n", job.namespace, "get", "energypolicies").stdout
    assert table.splitlines()[1].split()[:3] == [job.policy, "Optimizing", "True"]


def test_deleted_sidecar_pod_resets_clocks_and_gets_the_schedule_again(
    cluster: Cluster, job: NodeJob
) -> None:
    old = cluster.ready_pod(SYSTEM_NS, SIDECARS)
    assert old is not None
    name = old["metadata"]["name"]
    cluster.kubectl("-n", SYSTEM_NS, "delete", "pod", name, "--wait=false")
    wait_for(
        "every clock reset by the terminating sidecar", lambda: all_unlocked(cluster), 40, 0.02
    )
    wait_for(
        "the DaemonSet's new sidecar pod",
        lambda: cluster.ready_pod(SYSTEM_NS, SIDECARS, other_than=name),
        120,
    )
    wait_for("the schedule applied again (a clock locked)", lambda: any_locked(cluster), 120, 0.05)
    wait_for("Optimizing with every rank registered again", lambda: healthy(cluster, job), 120)


def test_deleted_operator_pod_resumes_without_reprofiling(cluster: Cluster, job: NodeJob) -> None:
    before = cluster.status(job)
    old = cluster.ready_pod(SYSTEM_NS, OPERATORS)
    assert old is not None and before.get("measuredBaseline") is not None
    name = old["metadata"]["name"]
    cluster.kubectl("-n", SYSTEM_NS, "delete", "pod", name, "--wait=true", "--timeout=60s")
    wait_for(
        "the Deployment's new operator pod",
        lambda: cluster.ready_pod(SYSTEM_NS, OPERATORS, other_than=name),
        120,
    )
    # a spec change only the new operator can have observed
    patched = cluster.kjson(
        "-n", job.namespace, "patch", "energypolicy", job.policy, "--type=merge",
        "-p", '{"spec": {"stragglers": {"threshold": 0.06}}}',
    )  # fmt: skip
    generation = patched["metadata"]["generation"]

    def resumed() -> dict[str, Any] | None:
        st = cluster.status(job)
        return st if st.get("observedGeneration") == generation else None

    st = wait_for("the new operator's status", resumed, 120)
    assert st["phase"] == "Optimizing" and st["measuredBaseline"] == before["measuredBaseline"]
    # the imported profile is read again; nothing is measured again
    assert condition(st, "Profiled")["message"].startswith(f"imported from {job.namespace}/")
    assert condition(st, "Ready")["status"] == "True"


def test_deleted_training_pod_registers_again_and_gets_its_schedule(
    cluster: Cluster, job: NodeJob
) -> None:
    rank = 5  # on the node's GPU 5
    selector = f"job={job.policy},perseus.dev/rank={rank}"
    old = cluster.ready_pod(job.namespace, selector)
    assert old is not None
    name = old["metadata"]["name"]
    cluster.kubectl("-n", job.namespace, "delete", "pod", name, "--wait=false")
    wait_for(
        "the Job's replacement pod", lambda: cluster.ready_pod(job.namespace, selector, name), 120
    )
    wait_for("every rank registered again with its schedule", lambda: healthy(cluster, job), 180)
    wait_for(
        "the new pod's GPU locked by its schedule",
        lambda: cluster.locked_clocks()[rank],
        120,
        0.02,
    )


def test_helm_upgrade_with_a_changed_value_rolls_the_operator(
    cluster: Cluster, job: NodeJob
) -> None:
    old = cluster.ready_pod(SYSTEM_NS, OPERATORS)
    assert old is not None
    cluster.helm(
        "upgrade", RELEASE, str(ROOT / "charts" / "perseus"), "-n", SYSTEM_NS, "--reuse-values",
        "--set", "operator.logLevel=debug", "--wait", "--timeout", "5m",
    )  # fmt: skip
    new = wait_for(
        "the upgraded operator pod",
        lambda: cluster.ready_pod(SYSTEM_NS, OPERATORS, other_than=old["metadata"]["name"]),
        120,
    )
    config = cluster.kjson("-n", SYSTEM_NS, "get", "configmap", f"{RELEASE}-operator")
    assert config["data"]["PERSEUS_OPERATOR_LOG_LEVEL"] == "debug"
    assert new["metadata"]["name"] != old["metadata"]["name"]
    wait_for("Optimizing under the upgraded operator", lambda: healthy(cluster, job), 120)


def test_job_completes_and_clocks_reset(cluster: Cluster, job: NodeJob) -> None:
    coordinator = cluster.ready_pod(job.namespace, f"job-name={job.coordinator}")
    assert coordinator is not None
    pod = coordinator["metadata"]["name"]
    cluster.kubectl("-n", job.namespace, "exec", pod, "--", "touch", job.stop_file)

    def finished() -> bool:
        jobs = cluster.kjson("-n", job.namespace, "get", "jobs", "-l", "app=sim-train")["items"]
        return len(jobs) == job.ranks + 1 and all(j["status"].get("succeeded") for j in jobs)

    wait_for("every Job of the training job succeeded", finished, 180)

    def completed() -> dict[str, Any] | None:
        st = cluster.status(job)
        return st if st.get("phase") == "Completed" else None

    st = wait_for("phase Completed", completed, 120)
    assert condition(st, "Ready")["reason"] == "JobFinished"
    wait_for("every clock reset", lambda: all_unlocked(cluster), 30)


def test_helm_uninstall_keeps_policies_and_crd_and_leaves_no_clock_locked(
    cluster: Cluster, job: NodeJob
) -> None:
    cluster.helm("uninstall", RELEASE, "-n", SYSTEM_NS, "--timeout", "3m")
    assert cluster.kubectl("get", "crd", "energypolicies.perseus.dev", check=False).returncode == 0
    got = cluster.kubectl("-n", job.namespace, "get", "energypolicy", job.policy, check=False)
    assert got.returncode == 0
    wait_for(
        "the chart's pods gone",
        lambda: not cluster.pods(SYSTEM_NS, f"app.kubernetes.io/instance={RELEASE}") or None,
        120,
    )
    assert all_unlocked(cluster)
