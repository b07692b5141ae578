"""A simulated GPU cluster on a real API server with no kubelet: for the demo and the e2e tests.

Its API objects (nodes, sidecar and job pods reported Running, the CRD) are `kubeobjects`'s; the
real processes run locally: one `perseus-sidecar --gpu-backend simulated` per fake node, listening
on that node's 127.0.x.y, the operator, and `perseus sim-train` playing the training job, whose
hooks bind to each pod's own address.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from perseus_operator.model import GROUP, PLURAL, VERSION
from perseus_sim.kubeobjects import (
    SIDECAR_DAEMONSET,
    SIDECAR_LABELS,
    SIDECAR_PORT,
    ClusterObjects,
    wait_for,
)
from perseus_sim.simjob import SimJob

__all__ = ["SimCluster"]

BIN = Path(sys.executable).parent


@dataclass
class SimCluster(ClusterObjects):
    """Processes and API objects of one simulated job; `close()` removes all of them."""

    api: client.ApiClient
    job: SimJob
    workdir: Path
    profile_csv: str
    token: str = "perseus-demo-operator-token"
    operator_namespace: str = ""
    sidecars: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)
    trainer: subprocess.Popen[bytes] | None = None
    operator: subprocess.Popen[bytes] | None = None

    @property
    def token_file(self) -> Path:
        return self.workdir / "operator-token"

    @property
    def profile_file(self) -> Path:
        return self.workdir / "profile.csv"

    def state_dir(self, i: int) -> Path:
        return self.workdir / f"node-{i}"

    # ---- processes ---------------------------------------------------------------------------

    def start_sidecar(self, i: int, *, fresh: bool = True) -> None:
        state = self.state_dir(i)
        if fresh and state.exists():
            shutil.rmtree(state)
        state.mkdir(parents=True, exist_ok=True)
        log = (self.workdir / f"sidecar-{i}.log").open("ab")
        self.sidecars[i] = subprocess.Popen(
            [
                str(BIN / "perseus-sidecar"),
                "--gpu-backend=simulated",
                f"--profile={self.profile_file}",
                f"--gpus={self.job.gpus_per_node}",
                f"--host={self.job.node_ip(i)}",
                f"--port={SIDECAR_PORT}",
                "--event-port=8081",
                f"--token-file={self.token_file}",
                f"--state-dir={state}",
                f"--node-name={self.job.node_name(i)}",
                f"--time-scale={self.job.time_scale}",
                f"--sim-perturbation={self.job.perturbation}",
                f"--sim-seed={i}",
                "--rank-timeout-s=5",
                "--log-level=warning",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def kill_sidecar(self, i: int) -> None:
        proc = self.sidecars.pop(i)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    async def wait_sidecars(self, timeout_s: float = 30) -> None:
        import httpx

        async with httpx.AsyncClient(timeout=1) as http:
            for i in self.sidecars:

                async def up(i: int = i) -> bool:
                    try:
                        r = await http.get(f"http://{self.job.node_ip(i)}:{SIDECAR_PORT}/healthz")
                    except httpx.HTTPError:
                        return False
                    return r.status_code == 200

                await wait_for(f"sidecar {i}", up, timeout_s)

    def start_operator(
        self,
        kubeconfig: str,
        extra_env: Mapping[str, str] | None = None,
        command: Sequence[str] | None = None,
    ) -> None:
        env = {
            **os.environ,
            "KUBECONFIG": kubeconfig,
            "PERSEUS_OPERATOR_TOKEN_FILE": str(self.token_file),
            "PERSEUS_OPERATOR_SIDECAR_SELECTOR": ",".join(
                f"{k}={v}" for k, v in SIDECAR_LABELS.items()
            ),
            "PERSEUS_OPERATOR_POD_NAMESPACE": self.own_namespace,
            "PERSEUS_OPERATOR_SIDECAR_DAEMONSET": SIDECAR_DAEMONSET,
            "PERSEUS_OPERATOR_SIDECAR_PORT": str(SIDECAR_PORT),
            "PERSEUS_OPERATOR_TICK_S": "0.5",
            "PERSEUS_OPERATOR_LIVENESS_URL": "",
            "PERSEUS_OPERATOR_SIMULATED_GPU_ASSIGNMENT": "true",
            **(extra_env or {}),
        }
        log = (self.workdir / "operator.log").open("ab")
        self.operator = subprocess.Popen(
            list(command or [str(BIN / "perseus-operator")]),
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def start_trainer(
        self, job_token: str, *, iterations: int = 100_000, extra: Sequence[str] = ()
    ) -> None:
        token_file = self.workdir / "job-token"
        token_file.write_text(job_token)
        nodes = [
            f"--node={self.job.node_ip(i)}:{SIDECAR_PORT}={self.state_dir(i)}"
            for i in range(self.job.nodes)
        ]
        log = (self.workdir / "trainer.log").open("ab")
        self.trainer = subprocess.Popen(
            [
                str(BIN / "perseus"),
                "sim-train",
                *nodes,
                f"--pipelines={self.job.pipelines}",
                f"--microbatches={self.job.microbatches}",
                f"--iterations={iterations}",
                f"--namespace={self.job.namespace}",
                f"--job={self.job.policy}",
                f"--pod-prefix={self.job.policy}",
                f"--pod-ip-base={self.job.pod_ip_base}",
                f"--job-token-file={token_file}",
                "--connect-timeout-s=30",
                *extra,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def trainer_iterations(self) -> list[tuple[int, float, float, float]]:
        """(iteration, time_s, all-max time_s, energy_j) of each iteration the trainer printed."""
        path = self.workdir / "trainer.log"
        out = []
        for line in path.read_text().splitlines() if path.exists() else []:
            words = line.split()
            if len(words) >= 9 and words[0] == "iteration" and words[2] == "time":
                energy = float(words[words.index("energy") + 1])
                out.append((int(words[1]), float(words[3]), float(words[6]), energy))
        return out

    def locked_clocks(self) -> dict[str, int | None]:
        """Every simulated GPU's locked SM clock, read from the simulated driver's own state
        (None: unlocked, at the driver's default)."""
        from perseus_sidecar.gpu.simnode import open_node

        out: dict[str, int | None] = {}
        for i in range(self.job.nodes):
            for gpu in open_node(self.state_dir(i))[2]:
                out[gpu.uuid] = gpu.locked_sm_clock_mhz()
        return out

    def stop_trainer(self) -> None:
        if self.trainer is not None and self.trainer.poll() is None:
            self.trainer.send_signal(signal.SIGINT)
            try:
                self.trainer.wait(15)
            except subprocess.TimeoutExpired:
                self.trainer.kill()
                self.trainer.wait()
        self.trainer = None

    # ---- lifecycle ---------------------------------------------------------------------------

    async def start(self, *, with_operator: str | None = None) -> None:
        """Everything but the policy and the trainer: CRD, namespace, nodes, sidecars, pods."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.token_file.write_text(self.token)
        self.profile_file.write_text(self.profile_csv)
        await self.install_crd()
        await self.create_namespace()
        await self.create_nodes()
        for i in range(self.job.nodes):
            self.start_sidecar(i)
        await self.wait_sidecars()
        await self.create_sidecar_pods()
        await self.create_job_pods()
        if with_operator is not None:
            self.start_operator(with_operator)

    async def delete_policies(self, timeout_s: float = 30) -> None:
        """Delete every EnergyPolicy of the namespace and wait until the operator's finalizer
        let them go; without a running operator their finalizers are dropped."""
        custom = client.CustomObjectsApi(self.api)
        ns = self.job.namespace
        listed = await custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)
        for item in listed.get("items", []):
            name = item["metadata"]["name"]
            with contextlib.suppress(ApiException):
                await custom.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)

        async def gone() -> bool:
            left = await custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)
            return not left.get("items")

        operator_alive = self.operator is not None and self.operator.poll() is None
        try:
            await wait_for("the policies to be deleted", gone, timeout_s if operator_alive else 0)
        except TimeoutError:
            left = await custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)
            for item in left.get("items", []):
                with contextlib.suppress(ApiException):
                    await custom.patch_namespaced_custom_object(  # type: ignore[call-arg]
                        GROUP,
                        VERSION,
                        ns,
                        PLURAL,
                        item["metadata"]["name"],
                        {"metadata": {"finalizers": []}},
                        _content_type="application/merge-patch+json",
                    )

    def stop_operator(self) -> None:
        if self.operator is not None:
            self.operator.send_signal(signal.SIGTERM)
            try:
                self.operator.wait(20)
            except subprocess.TimeoutExpired:
                self.operator.kill()
                self.operator.wait()
        self.operator = None

    async def close(self) -> None:
        """Stop everything and delete every object: pods are force-deleted (no kubelet would
        ever confirm their graceful deletion)."""
        self.stop_trainer()
        with contextlib.suppress(ApiException):
            await self.delete_policies()
        self.stop_operator()
        for proc in self.sidecars.values():
            proc.send_signal(signal.SIGTERM)
        for proc in self.sidecars.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.sidecars.clear()
        await self.delete_objects()
