"""Operator benchmark: reconcile latency and memory at scale, against a small baseline run.

Reconcile latency = from a change (a spec edit, or a sidecar's timings changing: one rank of
the job disappears) to the status patch that reflects it being visible through the API server.
Baseline: 1 policy, no other pods. Scaled: 50 policies x 32 simulated ranks (the tests' fake
sidecar, tests/sidecar/fake_sidecar.py, one per fake node, each serving many ranks) and 5,000
unrelated pods. Also the operator's RSS.

Usage: .venv/bin/python bench/operator.py [--policies 50] [--noise-pods 5000] [--samples 60]
Starts its own control plane with scripts/cluster.sh (ports 46443/53790) unless KUBECONFIG is set.
Figures on a loaded machine are pessimistic.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

from perseus_operator.model import GROUP, PLURAL, VERSION
from perseus_profiles import load_example
from perseus_sidecar.api import JobAnnouncement, PipelineTimings, RankTimings, TimingsOut
from perseus_sim.cluster import SimCluster
from perseus_sim.kubeobjects import SIDECAR_PORT, wait_for
from perseus_sim.simjob import SimJob

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the fake sidecar of the tests
from tests.sidecar.fake_sidecar import FakeSidecar

ROOT = Path(__file__).resolve().parents[1]
NS = "perseus-bench"
NODES = 8
STAGES, PIPELINES = 4, 8  # 32 ranks per policy
TOKEN = "bench-operator-token"
PROFILE = load_example("gpt3-175b-a100").select_stages((0, 1, 2, 7))


class BenchNode:
    """One fake node's sidecar (the tests' fake) with synthetic timings for every announced
    pod; a job in `hidden` loses its rank 0, as if that rank's pod had stopped reporting."""

    def __init__(self, node: str, host: str) -> None:
        self.hidden: set[tuple[str, str]] = set()
        self.sidecar = FakeSidecar(
            operator_token=TOKEN,
            host=host,
            http_port=SIDECAR_PORT,  # the operator reaches every sidecar on its configured port
            node_name=node,
            clocks_mhz=tuple(PROFILE.frequencies_mhz),
            timings_of=self.timings,
        )

    def timings(self, namespace: str, name: str, job: JobAnnouncement, active: bool) -> TimingsOut:
        ranks = []
        for pod in job.pods:
            r = int(pod.name.rsplit("-", 1)[1])
            if (namespace, name) in self.hidden and r == 0:
                continue
            ranks.append(
                RankTimings(
                    rank_id=f"{pod.name}-0",
                    pod=pod.name,
                    rank=r,
                    pipeline_rank=r % STAGES,
                    data_rank=r // STAGES,
                    tensor_rank=0,
                    gpu_uuid=f"GPU-fake-{self.sidecar.node_name}-0",
                    iterations=20,
                    instructions=[],
                    iteration_time_mean_s=1.65,
                    compute_span_mean_s=1.6,
                    energy_per_iteration_mean_j=500.0 if active else 560.0,
                    seconds_since_last_event=0.1,
                    schedule_active=active,
                    stale=False,
                )
            )
        pipelines = [
            PipelineTimings(
                data_rank=d,
                iterations=20,
                stage0_span_mean_s=None,
                stage0_span_std_s=None,
                stage0_span_last_s=None,
                iteration_time_mean_s=1.65,
            )
            for d in range(PIPELINES)
        ]
        return TimingsOut(
            namespace=namespace,
            name=name,
            window_s=60,
            ranks=ranks,
            stages=[],
            pipelines=pipelines,
        )


async def bounded(coros: list[Awaitable[Any]], limit: int = 32) -> None:
    sem = asyncio.Semaphore(limit)

    async def one(c: Awaitable[Any]) -> None:
        async with sem:
            await c

    await asyncio.gather(*(one(c) for c in coros))


class Bench:
    def __init__(self, api: client.ApiClient, sim: SimCluster, ports: list[int]) -> None:
        self.api = api
        self.sim = sim
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.ports = ports
        self.fakes: list[BenchNode] = []

    async def create_policy(self, j: int) -> None:
        name = f"p{j:03d}"
        node = j % NODES
        labels = {"job": name}
        pods = []
        for r in range(STAGES * PIPELINES):
            body = client.V1Pod(
                metadata=client.V1ObjectMeta(name=f"{name}-{r}", labels=labels),
                spec=client.V1PodSpec(
                    node_name=f"bench-node-{node}",
                    automount_service_account_token=False,
                    containers=[client.V1Container(name="main", image="simulated")],
                ),
            )
            pods.append(body)
        await bounded([self.core.create_namespaced_pod(NS, p) for p in pods])
        await bounded(
            [
                self.core.patch_namespaced_pod_status(
                    p.metadata.name,
                    NS,
                    {
                        "status": {
                            "phase": "Running",
                            "podIP": f"10.{j}.0.{r + 1}",
                            "hostIP": "127.0.0.1",
                        }
                    },
                )
                for r, p in enumerate(pods)
            ]
        )
        policy = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "EnergyPolicy",
            "metadata": {"name": name, "namespace": NS},
            "spec": {
                "selector": {"matchLabels": labels},
                "pipeline": {"stages": STAGES, "microbatches": 8, "dataParallel": PIPELINES},
                "profile": {"import": {"configMap": "bench-profile"}},
                "blockingPowerW": 83.64,
            },
        }
        await self.custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, policy)

    async def status(self, name: str) -> dict[str, Any]:
        body = await self.custom.get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, name)
        st: dict[str, Any] = body.get("status") or {}
        return st

    async def wait_ready(self, names: list[str], timeout_s: float) -> None:
        async def all_ready() -> bool:
            listed = await self.custom.list_namespaced_custom_object(GROUP, VERSION, NS, PLURAL)
            ready = {
                i["metadata"]["name"]
                for i in listed["items"]
                if any(
                    c["type"] == "Ready" and c["status"] == "True"
                    for c in (i.get("status") or {}).get("conditions") or []
                )
            }
            return set(names) <= ready

        await wait_for(f"{len(names)} policies Ready", all_ready, timeout_s, 0.5)

    async def measure(self, names: list[str], samples: int) -> tuple[list[float], list[float]]:
        spec_lat, timing_lat = [], []
        for k in range(samples):
            name = random.choice(names)
            before = await self.status(name)
            body = await self.custom.get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, name)
            slowdown = 0.0 if body["spec"].get("maxSlowdown") else 0.01
            t0 = time.monotonic()
            patched = await self.custom.patch_namespaced_custom_object(  # type: ignore[call-arg]
                GROUP,
                VERSION,
                NS,
                PLURAL,
                name,
                {"spec": {"maxSlowdown": slowdown}},
                _content_type="application/merge-patch+json",
            )
            gen = patched["metadata"]["generation"]

            async def seen_gen(name: str = name, gen: int = gen) -> bool:
                return (await self.status(name)).get("observedGeneration") == gen

            await wait_for("observedGeneration", seen_gen, 30, 0.01)
            spec_lat.append(time.monotonic() - t0)

            fake = self.fakes[int(name[1:]) % NODES]
            key = (NS, name)
            hide = key not in fake.hidden
            want = before.get("expectedRanks", 32) - (1 if hide else 0)
            t0 = time.monotonic()
            if hide:
                fake.hidden.add(key)
            else:
                fake.hidden.discard(key)

            async def seen_ranks(name: str = name, want: int = want) -> bool:
                return (await self.status(name)).get("registeredRanks") == want

            await wait_for("registeredRanks", seen_ranks, 30, 0.01)
            timing_lat.append(time.monotonic() - t0)
            if k % 10 == 9:
                print(f"    {k + 1}/{samples} samples", flush=True)
        for fake in self.fakes:
            fake.hidden.clear()
        return spec_lat, timing_lat


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def report(label: str, spec: list[float], timing: list[float]) -> dict[str, float]:
    figures = {
        "spec_p50": pct(spec, 0.5),
        "spec_p99": pct(spec, 0.99),
        "timing_p50": pct(timing, 0.5),
        "timing_p99": pct(timing, 0.99),
    }
    print(
        f"{label}: spec change -> status p50 {figures['spec_p50'] * 1000:.0f} ms, "
        f"p99 {figures['spec_p99'] * 1000:.0f} ms; timing change -> status p50 "
        f"{figures['timing_p50'] * 1000:.0f} ms, p99 {figures['timing_p99'] * 1000:.0f} ms "
        f"(mean {statistics.mean(spec + timing) * 1000:.0f} ms over {len(spec) + len(timing)})",
        flush=True,
    )
    return figures


async def run(args: argparse.Namespace, workdir: Path) -> int:
    await config.load_kube_config(config_file=os.environ["KUBECONFIG"])
    api = client.ApiClient()
    job = SimJob(
        namespace=NS, policy="unused", node_prefix="bench-node", gpus_per_node=STAGES * PIPELINES
    )
    sim = SimCluster(api, job, workdir, PROFILE.to_csv(), token=TOKEN)
    bench = Bench(api, sim, [])
    try:
        sim.workdir.mkdir(parents=True, exist_ok=True)
        sim.token_file.write_text(TOKEN)
        await sim.install_crd()
        await sim.create_namespace()
        core = bench.core
        for i in range(NODES):
            fake = BenchNode(f"bench-node-{i}", job.node_ip(i))
            fake.sidecar.start()
            bench.fakes.append(fake)
            await core.create_node(
                client.V1Node(metadata=client.V1ObjectMeta(name=f"bench-node-{i}"))
            )
            await sim.create_sidecar_pod(i)  # owned by a DaemonSet, as the operator requires
        await sim.create_profile_configmap("bench-profile")
        profile_out = os.environ.get("PERSEUS_BENCH_CPROFILE")
        command = None
        if profile_out:  # to see where the operator's CPU goes
            command = [
                sys.executable,
                "-m",
                "cProfile",
                "-o",
                profile_out,
                "-m",
                "perseus_operator.main",
            ]
        sim.start_operator(os.environ["KUBECONFIG"], command=command)
        assert sim.operator is not None
        pid = sim.operator.pid

        print(f"baseline: 1 policy x {STAGES * PIPELINES} ranks, no other pods", flush=True)
        await bench.create_policy(0)
        await bench.wait_ready(["p000"], 120)
        base = report("baseline", *await bench.measure(["p000"], args.samples // 2))
        base_rss = rss_mb(pid)

        print(f"creating {args.noise_pods} unrelated pods", flush=True)
        t0 = time.monotonic()
        noise = [
            core.create_namespaced_pod(
                NS,
                client.V1Pod(
                    metadata=client.V1ObjectMeta(
                        name=f"noise-{k}", labels={"app": f"noise-{k % 50}"}
                    ),
                    spec=client.V1PodSpec(
                        automount_service_account_token=False,
                        containers=[client.V1Container(name="main", image="simulated")],
                    ),
                ),
            )
            for k in range(args.noise_pods)
        ]
        await bounded(noise, 48)
        print(f"    {time.monotonic() - t0:.0f}s", flush=True)
        print(f"creating {args.policies - 1} more policies x {STAGES * PIPELINES} pods", flush=True)
        for j in range(1, args.policies):
            await bench.create_policy(j)
        names = [f"p{j:03d}" for j in range(args.policies)]
        t0 = time.monotonic()
        await bench.wait_ready(names, 600)
        print(
            f"    all {args.policies} Ready {time.monotonic() - t0:.0f}s after the last was created"
        )
        await asyncio.sleep(5)
        cpu0, t0 = cpu_s(pid), time.monotonic()
        scaled = report(
            f"scaled ({args.policies} policies, {args.noise_pods} unrelated pods)",
            *await bench.measure(names, args.samples),
        )
        busy = (cpu_s(pid) - cpu0) / (time.monotonic() - t0)
        print(f"operator CPU while measuring: {busy * 100:.0f}% of one core", flush=True)
        scaled_rss = rss_mb(pid)
        print(f"operator RSS: {base_rss:.0f} MB baseline, {scaled_rss:.0f} MB scaled")
        for key in ("spec_p99", "timing_p99"):
            print(f"ratio scaled/baseline {key}: {scaled[key] / base[key]:.2f}x")
        ok = scaled["spec_p99"] < 1 and scaled["timing_p99"] < 1 and scaled_rss < 300
        print("targets (p99 < 1 s, RSS < 300 MB):", "met" if ok else "NOT met")
        return 0
    finally:
        with contextlib.suppress(ApiException, TimeoutError):
            await sim.delete_policies(timeout_s=120)
        sim.stop_operator()
        for fake in bench.fakes:
            fake.sidecar.stop()
        try:
            await client.CoreV1Api(api).delete_collection_namespaced_pod(NS, grace_period_seconds=0)
            await client.CoreV1Api(api).delete_namespace(NS)
        except ApiException:
            pass
        for i in range(NODES):
            with contextlib.suppress(ApiException):
                await client.CoreV1Api(api).delete_node(f"bench-node-{i}")
        await api.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policies", type=int, default=50)
    parser.add_argument("--noise-pods", type=int, default=5000)
    parser.add_argument("--samples", type=int, default=60)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="perseus-bench-") as tmp:
        work = Path(tmp)
        if "KUBECONFIG" not in os.environ:
            env = {
                **os.environ,
                "API_PORT": "46443",
                "ETCD_PORT": "53790",
                "ETCD_PEER": "53800",
                "KCM_PORT": "46257",
            }
            subprocess.run([str(ROOT / "scripts" / "cluster.sh"), "build"], check=True)
            subprocess.run(
                [str(ROOT / "scripts" / "cluster.sh"), "up", str(work / "k8s")], check=True, env=env
            )
            os.environ["KUBECONFIG"] = str(work / "k8s" / "kubeconfig")
            try:
                return asyncio.run(run(args, work / "sim"))
            finally:
                subprocess.run(
                    [str(ROOT / "scripts" / "cluster.sh"), "down", str(work / "k8s")], check=False
                )
        return asyncio.run(run(args, work / "sim"))


if __name__ == "__main__":
    sys.exit(main())
