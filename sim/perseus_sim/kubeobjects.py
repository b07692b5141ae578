"""The API objects of a simulated GPU cluster on a real API server with no kubelet (`cluster`).

Pods never run on the local control plane, so this plays the kubelet's part: it creates Node
objects (the pod garbage collector deletes pods bound to missing nodes), sidecar and job Pod
objects bound to them (`automountServiceAccountToken: false`: no token Secret race) and patches
their status to Running with a distinct loopback address each and, for job pods, the GPU it
gave the pod (a status condition, `state.SIMULATED_GPUS_CONDITION`: what the operator announces
to the sidecar, which has no kubelet socket to ask). The sidecar pods look like the chart's: in
the operator's namespace, owned by a DaemonSet (a real object, so the garbage collector keeps
them; it selects no node and its selector matches none of them, so the DaemonSet controller
neither adds nor claims pods; the owner reference is not a controller reference, which real
DaemonSet pods carry, since that controller would release it).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from perseus_operator.crd import build_crd
from perseus_operator.kube import job_secret_name
from perseus_operator.state import SIMULATED_GPUS_CONDITION
from perseus_sim.simjob import SimJob

__all__ = ["SIDECAR_DAEMONSET", "SIDECAR_LABELS", "SIDECAR_PORT", "ClusterObjects", "wait_for"]

SIDECAR_LABELS = {"app.kubernetes.io/name": "perseus", "app.kubernetes.io/component": "sidecar"}
SIDECAR_DAEMONSET = "perseus-sidecar"
SIDECAR_PORT = 8080


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


class ClusterObjects:
    """Creates, runs (as a kubelet would report them) and deletes one simulated job's API
    objects. `SimCluster` is one, with the local processes behind the objects."""

    api: client.ApiClient
    job: SimJob
    profile_csv: str
    operator_namespace: str
    """Where the operator "runs": its sidecar DaemonSet and pods live there (default: the job's)."""

    @property
    def own_namespace(self) -> str:
        return self.operator_namespace or self.job.namespace

    @property
    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.api)

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
            return base64.b64decode(data).decode()

        token: str = await wait_for(f"Secret {name}", read, timeout_s)
        return token

    async def delete_objects(self) -> None:
        """Delete every object of the job but its policies: pods are force-deleted (no kubelet
        would ever confirm their graceful deletion)."""
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
