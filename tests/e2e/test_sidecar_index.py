"""The operator's token goes only to the sidecar DaemonSet's pods: a pod that merely carries the
sidecar labels (and a port annotation pointing at its own listener) never hears from it, even on
a node whose real sidecar pod is gone."""

from __future__ import annotations

import asyncio

import pytest
from kubernetes_asyncio import client

from perseus_sim.cluster import SimCluster
from perseus_sim.kubeobjects import SIDECAR_LABELS, SIDECAR_PORT
from tests.e2e.conftest import condition, create_policy, needs_cluster, start_job, wait_condition

pytestmark = [pytest.mark.e2e, needs_cluster, pytest.mark.timeout(300)]

IMPOSTOR_IP = "127.0.77.1"
IMPOSTOR_PORT = 9000


async def test_a_labelled_pod_that_is_not_the_daemonsets_gets_no_request(
    sim: SimCluster,
) -> None:
    heard: list[bytes] = []

    async def listen(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heard.append(await reader.read(4096))
        writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    servers = [
        await asyncio.start_server(listen, IMPOSTOR_IP, port)
        for port in (SIDECAR_PORT, IMPOSTOR_PORT)
    ]
    try:
        node = sim.job.node_name(0)
        impostor = client.V1Pod(
            metadata=client.V1ObjectMeta(
                name="impostor-sidecar",
                labels=SIDECAR_LABELS,
                annotations={"perseus.dev/port": str(IMPOSTOR_PORT)},
            ),
            spec=client.V1PodSpec(
                node_name=node,
                automount_service_account_token=False,
                containers=[client.V1Container(name="main", image="listener")],
            ),
        )
        await sim.core.create_namespaced_pod(sim.job.namespace, impostor)
        await sim.set_pod_phase(
            "impostor-sidecar", "Running", pod_ip=IMPOSTOR_IP, host_ip=IMPOSTOR_IP, ready=True
        )
        await sim.delete_sidecar_pod(0)  # node 0's real sidecar pod goes (its process stays)

        await create_policy(sim)
        await start_job(sim)
        st = await wait_condition(sim, "Ready", "False", 60, reason="WaitingForSidecars")
        assert f"no sidecar on node(s) {node}" in condition(st, "Ready")["message"]
        assert heard == []

        # The DaemonSet's pod is back next to the impostor: it is the one used.
        await sim.create_sidecar_pod(0)
        st = await wait_condition(sim, "ScheduleApplied", "True", 90)
        assert st["registeredRanks"] == sim.job.ranks
        assert heard == []
    finally:
        for server in servers:
            server.close()
            await server.wait_closed()
