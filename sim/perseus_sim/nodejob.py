"""The simulated training job as real Kubernetes workloads, for the one-node cluster of
scripts/node.sh: a coordinator (rendezvous and all-reduce, like torchrun's store) behind a
Service, and one Job per rank running `perseus sim-train rank` with the training hooks.

Each rank pod reaches its node's sidecar at ``status.hostIP`` on the sidecar's host port, reads
the job token from the Secret the operator creates for the policy, plays its stage on the
simulated GPU the kubelet gave it (`nvidia.com/gpu: 1` from the simulated device plugin, which
sets PERSEUS_GPU_UUID) and whose "driver" state the sidecar keeps under a hostPath, and
exchanges activations and gradients with its pipeline neighbours over the pod network. One Job
per rank (Kubernetes 1.20 has no indexed Jobs) gives every rank a stable number and a replacement
pod when its pod is deleted; the pods carry the policy's selector label, the coordinator does not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["COORDINATOR_PORT", "RANK_PORT", "NodeJob", "training_manifests"]

COORDINATOR_PORT = 29400
RANK_PORT = 29401
TOKEN_DIR = "/var/run/perseus/job"
GPU_STATE_DIR = "/var/lib/perseus"


@dataclass(frozen=True)
class NodeJob:
    """What the manifests need to know about the job and the cluster it runs on."""

    namespace: str
    policy: str
    image: str
    stages: int
    pipelines: int
    microbatches: int
    iterations: int
    sidecar_port: int
    gpu_state_host_path: str
    """The sidecar's stateHostPath: the simulated GPUs' driver state."""
    stop_file: str = "/tmp/stop"
    """Created inside the coordinator's pod, ends the job after the current iteration."""

    @property
    def ranks(self) -> int:
        return self.stages * self.pipelines

    @property
    def coordinator(self) -> str:
        return f"{self.policy}-coordinator"

    def rank_job(self, rank: int) -> str:
        return f"{self.policy}-rank-{rank}"


def _env_from_field(name: str, path: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def _container_security() -> dict[str, Any]:
    # Root only to write the simulated GPUs' files the root sidecar created (a real training pod
    # writes to its GPU through device files in the same way); nothing else is granted.
    return {
        "runAsUser": 0,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }


def _job(job: NodeJob, name: str, labels: dict[str, str], pod: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": job.namespace, "labels": {"app": "sim-train"}},
        "spec": {
            "backoffLimit": 4,
            "template": {"metadata": {"labels": labels}, "spec": pod},
        },
    }


def training_manifests(job: NodeJob) -> list[dict[str, Any]]:
    """The Service, the coordinator's Job and one Job per rank, in the order to create them
    (the Service first, so its address is in every later pod's environment)."""
    service_env = job.coordinator.upper().replace("-", "_") + "_SERVICE_HOST"
    tmp_volume = {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}}
    tmp_mount = {"name": "tmp", "mountPath": "/tmp"}
    coordinator_labels = {"app": "sim-train", "perseus.dev/sim-role": "coordinator"}
    coordinator_labels["sim-job"] = job.policy
    out: list[dict[str, Any]] = [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": job.coordinator, "namespace": job.namespace},
            "spec": {
                "selector": coordinator_labels,
                "ports": [{"name": "rdzv", "port": COORDINATOR_PORT, "protocol": "TCP"}],
            },
        }
    ]
    coordinator_pod = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": True,
        "containers": [
            {
                "name": "coordinator",
                "image": job.image,
                "imagePullPolicy": "IfNotPresent",
                "command": [
                    "perseus",
                    "sim-train",
                    "coordinator",
                    f"--port={COORDINATOR_PORT}",
                    f"--stages={job.stages}",
                    f"--pipelines={job.pipelines}",
                    f"--microbatches={job.microbatches}",
                    f"--iterations={job.iterations}",
                    f"--time-scale-from-node={GPU_STATE_DIR}",
                    f"--stop-file={job.stop_file}",
                ],
                "ports": [{"containerPort": COORDINATOR_PORT, "protocol": "TCP"}],
                "securityContext": {
                    "runAsUser": 10001,
                    "runAsNonRoot": True,
                    "allowPrivilegeEscalation": False,
                    "readOnlyRootFilesystem": True,
                    "capabilities": {"drop": ["ALL"]},
                },
                "volumeMounts": [
                    tmp_mount,
                    {"name": "gpus", "mountPath": GPU_STATE_DIR, "readOnly": True},
                ],
            }
        ],
        "volumes": [
            tmp_volume,
            {"name": "gpus", "hostPath": {"path": job.gpu_state_host_path, "type": "Directory"}},
        ],
    }
    out.append(_job(job, job.coordinator, coordinator_labels, coordinator_pod))
    for rank in range(job.ranks):
        labels = {"app": "sim-train", "job": job.policy, "perseus.dev/rank": str(rank)}
        pod = {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "terminationGracePeriodSeconds": 5,
            "containers": [
                {
                    "name": "trainer",
                    "image": job.image,
                    "imagePullPolicy": "IfNotPresent",
                    "command": [
                        "perseus",
                        "sim-train",
                        "rank",
                        f"--rank={rank}",
                        f"--coordinator=$({service_env}):{COORDINATOR_PORT}",
                        f"--node-state={GPU_STATE_DIR}",
                        f"--sidecar=$(HOST_IP):{job.sidecar_port}",
                        f"--listen-port={RANK_PORT}",
                        "--advertise-ip=$(POD_IP)",
                        f"--job-token-file={TOKEN_DIR}/token",
                        "--namespace=$(POD_NAMESPACE)",
                        "--pod=$(POD_NAME)",
                    ],
                    "env": [
                        _env_from_field("HOST_IP", "status.hostIP"),
                        _env_from_field("POD_IP", "status.podIP"),
                        _env_from_field("POD_NAME", "metadata.name"),
                        _env_from_field("POD_NAMESPACE", "metadata.namespace"),
                    ],
                    "ports": [{"containerPort": RANK_PORT, "protocol": "TCP"}],
                    # the kubelet picks the GPU (the device plugin sets PERSEUS_GPU_UUID) and
                    # its pod-resources API tells the sidecar which pod holds which GPU
                    "resources": {"limits": {"nvidia.com/gpu": 1}},
                    "securityContext": _container_security(),
                    "volumeMounts": [
                        tmp_mount,
                        {"name": "job-token", "mountPath": TOKEN_DIR, "readOnly": True},
                        {"name": "gpus", "mountPath": GPU_STATE_DIR},
                    ],
                }
            ],
            "volumes": [
                tmp_volume,
                # optional: the operator creates the Secret once the job's pods run; the hooks
                # read the token again at every registration attempt
                {
                    "name": "job-token",
                    "secret": {"secretName": f"perseus-job-{job.policy}", "optional": True},
                },
                {
                    "name": "gpus",
                    "hostPath": {"path": job.gpu_state_host_path, "type": "Directory"},
                },
            ],
        }
        out.append(_job(job, job.rank_job(rank), labels, pod))
    return out
