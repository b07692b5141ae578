"""The training job's manifests for the real node: valid Kubernetes objects, a Service before
the pods that read its address, the policy's selector on the rank pods only."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import yaml

from perseus_sim.nodedemo import DEMO_JOB
from perseus_sim.nodejob import training_manifests
from tests.chart._scripts import load_script

vm = load_script("validate_manifests")
JOB = replace(DEMO_JOB, gpu_state_host_path="/run/gpus")


def test_manifests_validate_strictly(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump_all(training_manifests(JOB)))
    assert vm.validate_file(path, "1.37.0") == []


def test_service_first_then_coordinator_then_one_job_per_rank() -> None:
    objs = training_manifests(JOB)
    assert [o["kind"] for o in objs] == ["Service", "Job"] + ["Job"] * JOB.ranks
    assert objs[1]["metadata"]["name"] == "demo-coordinator"
    assert [o["metadata"]["name"] for o in objs[2:]] == [f"demo-rank-{r}" for r in range(8)]
    # the coordinator's pods are the Service's endpoints and never match the policy's selector
    coordinator_labels = objs[1]["spec"]["template"]["metadata"]["labels"]
    assert objs[0]["spec"]["selector"].items() <= coordinator_labels.items()
    assert "job" not in coordinator_labels


def test_rank_pods_carry_the_selector_the_token_and_their_sidecar() -> None:
    for rank, obj in enumerate(training_manifests(JOB)[2:]):
        pod = obj["spec"]["template"]
        assert pod["metadata"]["labels"]["job"] == "demo"
        assert pod["metadata"]["labels"]["perseus.dev/rank"] == str(rank)
        spec = pod["spec"]
        assert spec["restartPolicy"] == "Never" and spec["automountServiceAccountToken"] is False
        command = spec["containers"][0]["command"]
        assert f"--rank={rank}" in command
        assert spec["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": 1}
        assert "--sidecar=$(HOST_IP):18080" in command
        assert "--coordinator=$(DEMO_COORDINATOR_SERVICE_HOST):29400" in command
        env = {
            e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in spec["containers"][0]["env"]
        }
        assert env["HOST_IP"] == "status.hostIP" and env["POD_IP"] == "status.podIP"
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["job-token"]["secret"]["secretName"] == "perseus-job-demo"
        assert volumes["gpus"]["hostPath"]["path"] == "/run/gpus"
        security = spec["containers"][0]["securityContext"]
        assert security["readOnlyRootFilesystem"] is True
        assert security["capabilities"] == {"drop": ["ALL"]}
