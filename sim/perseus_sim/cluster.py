"""A simulated GPU cluster on a real API server with no kubelet: for the demo and the e2e tests.

Pods never run on the local control plane, so this plays the kubelet's part: it creates Node
objects (the pod garbage collector deletes pods bound to missing nodes), sidecar and job Pod
objects bound to them (`automountServiceAccountToken: false`: no token Secret race) and patches
their status to Running with a distinct loopback address each and, for job pods, the GPU it
gave the pod (a status condition, `state.SIMULATED_GPUS_CONDITION`: what the operator announces
to the sidecar, which has no kubelet socket to ask). The sidecar pods look like the chart's: in
the operator's namespace, owned by a DaemonSet (a real object, so the garbage collector keeps
them; it selects no node and its selector matches none of them, so the DaemonSet controller
neither adds nor claims pods; the owner reference is not a controller reference, which real
DaemonSet pods carry, since that controller would release it). The real processes run locally:
one `perseus-sidecar --gpu-backend simulated` per fake node, listening on that node's 127.0.x.y,
and `perseus sim-train` playing the training job, whose hooks bind to each pod's own address.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from perseus_operator.crd import build_crd
from perseus_operator.kube import job_secret_name
from perseus_operator.model import GROUP, PLURAL, VERSION
from perseus_operator.state import SIMULATED_GPUS_CONDITION
from perseus_sidecar.gpu.simnode import simulated_uuid

__all__ = ["SimCluster", "SimJob", "wait_for"]

SIDECAR_LABELS = {"app.kubernetes.io/name": "perseus", "app.kubernetes.io/component": "sidecar"}
SIDECAR_DAEMONSET = "perseus-sidecar"
SIDECAR_PORT = 8080
BIN = Path(sys.executable).parent


async def wait_for(what: str, probe: Any, timeout_s: float, interval_s: float = 0.1) -> Any:
    """Poll the async `probe()` until it returns something truthy; TimeoutError names `what`."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = await probe()
        if last:
            return last
        await asyncio.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what} (last: {last!r})")


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


@dataclass
class SimCluster:
    """Processes and API objects of one simulated job; `close()` removes all of them."""

    api: client.ApiClient
    job: SimJob
    workdir: Path
    profile_csv: str
    token: str = "perseus-demo-operator-token"
    operator_namespace: str = ""
    """Where the operator "runs": its sidecar DaemonSet and pods live there (default: the job's)."""
    sidecars: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)
    trainer: subprocess.Popen[bytes] | None = None
    operator: subprocess.Popen[bytes] | None = None

    @property
    def own_namespace(self) -> str:
        return self.operator_namespace or self.job.namespace

    @property
    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.api)

    @property
    def token_file(self) -> Path:
        return self.workdir / "operator-token"

    @property
    def profile_file(self) -> Path:
        return self.workdir / "profile.csv"

    def state_dir(self, i: int) -> Path:
        return self.workdir / f"node-{i}"

    # ---- API objects -------------------------------------------------------------------------

    async def install_crd(self) -> None:
        ext = client.ApiextensionsV1Api(self.api)
        crd = build_crd()
        try:
            await ext.create_custom_resource_definition(crd)  # type: ignore[arg-type]
        except ApiException as exc:
            if exc.status != 409:
                raise
            current = await ext.read_custom_resource_definition(crd["metadata"]["name"])
            crd["metadata"]["resourceVersion"] = current.metadata.resource_version
            await ext.replace_custom_resource_definition(crd["metadata"]["name"], crd)  # type: ignore[arg-type]

        async def established() -> bool:
            got = await ext.read_custom_resource_definition(crd["metadata"]["name"])
            conds = got.status.conditions or []
            return any(c.type == "Established" and c.status == "True" for c in conds)

        await wait_for("the EnergyPolicy CRD to be established", established, 30)

    async def create_namespace(self) -> None:
        body = client.V1Namespace(metadata=client.V1ObjectMeta(name=self.job.namespace))

        async def created() -> bool:
            try:
                await self.core.create_namespace(body)
            except ApiException as exc:
                if exc.status != 409:
                    raise
                current = await self.core.read_namespace(self.job.namespace)
                return current.status.phase != "Terminating"  # a previous run's: wait
            return True

        await wait_for(f"namespace {self.job.namespace}", created, 120, 0.5)

        async def has_sa() -> bool:
            try:
                await self.core.read_namespaced_service_account("default", self.job.namespace)
            except ApiException:
                return False
            return True

        await wait_for("the namespace's default ServiceAccount", has_sa, 30)

    async def create_nodes(self) -> None:
        for i in range(self.job.nodes):
            body = client.V1Node(
                metadata=client.V1ObjectMeta(
                    name=self.job.node_name(i),
                    labels={"nvidia.com/gpu.present": "true", "perseus.dev/simulated": "true"},
                )
            )
            try:
                await self.core.create_node(body)
            except ApiException as exc:
                if exc.status != 409:
                    raise

    async def sidecar_owner(self) -> client.V1OwnerReference:
        """The DaemonSet the fake sidecar pods belong to, created on first use."""
        apps = client.AppsV1Api(self.api)
        ns = self.own_namespace
        try:
            ds = await apps.read_namespaced_daemon_set(SIDECAR_DAEMONSET, ns)
        except ApiException as exc:
            if exc.status != 404:
                raise
            own = {"perseus.dev/simulated-daemonset": "no-pod"}
            body = client.V1DaemonSet(
                metadata=client.V1ObjectMeta(name=SIDECAR_DAEMONSET, labels=SIDECAR_LABELS),
                spec=client.V1DaemonSetSpec(
                    selector=client.V1LabelSelector(match_labels=own),
                    template=client.V1PodTemplateSpec(
                        metadata=client.V1ObjectMeta(labels=own),
                        spec=client.V1PodSpec(
                            node_selector={"perseus.dev/simulated-daemonset": "no-node"},
                            automount_service_account_token=False,
                            containers=[client.V1Container(name="sidecar", image="simulated")],
                        ),
                    ),
                ),
            )
            ds = await apps.create_namespaced_daemon_set(ns, body)
        return client.V1OwnerReference(
            api_version="apps/v1", kind="DaemonSet", name=ds.metadata.name, uid=ds.metadata.uid
        )

    async def _running_pod(
        self,
        name: str,
        node: int,
        pod_ip: str,
        labels: Mapping[str, str],
        *,
        owner: client.V1OwnerReference | None = None,
        namespace: str | None = None,
        gpus: Sequence[str] | None = None,
    ) -> None:
        namespace = namespace or self.job.namespace
        body = client.V1Pod(
            metadata=client.V1ObjectMeta(
                name=name, labels=dict(labels), owner_references=[owner] if owner else None
            ),
            spec=client.V1PodSpec(
                node_name=self.job.node_name(node),
                automount_service_account_token=False,
                containers=[client.V1Container(name="main", image="simulated")],
            ),
        )
        await self.core.create_namespaced_pod(namespace, body)
        await self.set_pod_phase(
            name,
            "Running",
            pod_ip=pod_ip,
            host_ip=self.job.node_ip(node),
            ready=True,
            namespace=namespace,
            gpus=gpus,
        )

    async def set_pod_phase(
        self,
        name: str,
        phase: str,
        *,
        pod_ip: str | None = None,
        host_ip: str | None = None,
        ready: bool | None = None,
        namespace: str | None = None,
        gpus: Sequence[str] | None = None,
    ) -> None:
        status: dict[str, Any] = {"phase": phase}
        if pod_ip is not None:
            status.update(podIP=pod_ip, podIPs=[{"ip": pod_ip}])
        if host_ip is not None:
            status["hostIP"] = host_ip
        conditions: list[dict[str, str]] = []
        if ready is not None:
            conditions.append({"type": "Ready", "status": str(ready)})
        if gpus is not None:
            conditions.append(
                {
                    "type": SIMULATED_GPUS_CONDITION,
                    "status": "True",
                    "reason": "Allocated",
                    "message": ",".join(gpus),
                }
            )
        if conditions:
            status["conditions"] = conditions
        await self.core.patch_namespaced_pod_status(
            name, namespace or self.job.namespace, {"status": status}
        )

    def sidecar_pod_name(self, i: int) -> str:
        return f"perseus-sidecar-{i}"

    async def create_sidecar_pod(self, i: int) -> None:
        """Node i's sidecar pod, as the chart's DaemonSet would create it."""
        owner = await self.sidecar_owner()
        ip = self.job.node_ip(i)
        await self._running_pod(
            self.sidecar_pod_name(i),
            i,
            ip,
            SIDECAR_LABELS,
            owner=owner,
            namespace=self.own_namespace,
        )

    async def delete_sidecar_pod(self, i: int) -> None:
        """Node i's sidecar pod object goes (its process keeps running)."""
        await self.core.delete_namespaced_pod(
            self.sidecar_pod_name(i), self.own_namespace, grace_period_seconds=0
        )

    async def create_sidecar_pods(self) -> None:
        for i in range(self.job.nodes):
            await self.create_sidecar_pod(i)

    async def create_job_pods(self) -> None:
        labels = {"app": "sim-train", "job": self.job.policy}
        for rank in range(self.job.ranks):
            name = self.job.pod_name(rank)
            await self._running_pod(
                name,
                self.job.node_of(rank),
                self.job.pod_ip(rank),
                labels,
                gpus=[self.job.gpu_of(rank)],
            )

    async def finish_job_pods(self) -> None:
        for rank in range(self.job.ranks):
            await self.set_pod_phase(self.job.pod_name(rank), "Succeeded")

    async def create_profile_configmap(self, name: str) -> None:
        body = client.V1ConfigMap(
            metadata=client.V1ObjectMeta(name=name), data={"profile.csv": self.profile_csv}
        )
        await self.core.create_namespaced_config_map(self.job.namespace, body)

    async def job_token(self, timeout_s: float = 30) -> str:
        name = job_secret_name(self.job.policy)

        async def read() -> str | None:
            try:
                secret = await self.core.read_namespaced_secret(name, self.job.namespace)
            except ApiException:
                return None
            data = (secret.data or {}).get("token")
            if not data:
                return None
            import base64

            return base64.b64decode(data).decode()

        token: str = await wait_for(f"Secret {name}", read, timeout_s)
        return token

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
        ns = self.job.namespace
        if self.own_namespace != ns:
            for i in range(self.job.nodes):
                with contextlib.suppress(ApiException):
                    await self.delete_sidecar_pod(i)
            with contextlib.suppress(ApiException):
                await client.AppsV1Api(self.api).delete_namespaced_daemon_set(
                    SIDECAR_DAEMONSET, self.own_namespace
                )
        with contextlib.suppress(ApiException):
            await self.core.delete_collection_namespaced_pod(ns, grace_period_seconds=0)
        with contextlib.suppress(ApiException):
            await self.core.delete_namespace(ns)
        for i in range(self.job.nodes):
            with contextlib.suppress(ApiException):
                await self.core.delete_node(self.job.node_name(i))


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


def dump(obj: Any) -> str:
    text: str = yaml.safe_dump(obj, sort_keys=False)
    return text
