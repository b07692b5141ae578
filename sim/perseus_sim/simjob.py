"""The simulated job's shape (pipelines, stages, GPUs per node) and where its fake nodes and pods
live, and the EnergyPolicy the demo and the e2e tests write for it."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from perseus_sidecar.gpu.simnode import simulated_uuid

__all__ = ["SimJob", "policy_manifest"]


@dataclass
class SimJob:
    """The simulated job's shape and where its fake nodes and pods live."""

    namespace: str
    policy: str
    stages: int = 4
    pipelines: int = 2
    microbatches: int = 8
    gpus_per_node: int = 2
    time_scale: float = 0.2
    perturbation: float = 0.02
    node_ip_base: str = "127.0.0.100"
    pod_ip_base: str = "127.0.1.1"
    node_prefix: str = "sim-node"

    @property
    def ranks(self) -> int:
        return self.stages * self.pipelines

    @property
    def nodes(self) -> int:
        return -(-self.ranks // self.gpus_per_node)

    def node_name(self, i: int) -> str:
        return f"{self.node_prefix}-{i}"

    def node_ip(self, i: int) -> str:
        return str(ipaddress.ip_address(self.node_ip_base) + i)

    def pod_name(self, rank: int) -> str:
        return f"{self.policy}-{rank}"

    def pod_ip(self, rank: int) -> str:
        return str(ipaddress.ip_address(self.pod_ip_base) + rank)

    def node_of(self, rank: int) -> int:
        return rank // self.gpus_per_node

    def gpu_of(self, rank: int) -> str:
        """The simulated GPU the rank's pod is given (the trainer places ranks the same way)."""
        return simulated_uuid(self.node_name(self.node_of(rank)), rank % self.gpus_per_node)


def policy_manifest(job: SimJob, config_map: str, **spec: Any) -> dict[str, Any]:
    """The demo's EnergyPolicy for this job (imported profile), with spec overrides."""
    body: dict[str, Any] = {
        "apiVersion": "perseus.dev/v1alpha1",
        "kind": "EnergyPolicy",
        "metadata": {"name": job.policy, "namespace": job.namespace},
        "spec": {
            "selector": {"matchLabels": {"job": job.policy}},
            "pipeline": {
                "stages": job.stages,
                "microbatches": job.microbatches,
                "dataParallel": job.pipelines,
            },
            "profile": {"import": {"configMap": config_map, "key": "profile.csv"}},
            "blockingPowerW": 83.64,
            **spec,
        },
    }
    return body
