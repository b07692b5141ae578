"""The demo (scripts/demo.sh): a simulated 2-pipeline x 4-stage training job on a local control
plane, optimised by the operator through an EnergyPolicy, end to end.

Needs KUBECONFIG pointing at a cluster with no real workloads in the namespace it uses (the
script starts a private one). Prints progress, then `kubectl get energypolicies` and the measured
saving, and removes everything it created; with `--keep`, a successful demo leaves the operator,
the sidecars and the trainer running and writes their process ids to WORKDIR/pids.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

__all__ = ["main"]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "energypolicy-demo.yaml"


def say(text: str) -> None:
    print(f"==> [{time.strftime('%H:%M:%S')}] {text}", flush=True)


async def run_demo(args: argparse.Namespace) -> int:
    from kubernetes_asyncio import client, config

    from perseus_operator.model import GROUP, PLURAL, VERSION
    from perseus_profiles import load_example
    from perseus_sim.cluster import SimCluster
    from perseus_sim.kubeobjects import wait_for
    from perseus_sim.simjob import SimJob

    kubeconfig = os.environ["KUBECONFIG"]
    await config.load_kube_config(config_file=kubeconfig)
    api = client.ApiClient()
    manifest: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    policy = manifest["metadata"]["name"]
    manifest["metadata"]["namespace"] = args.namespace
    profile = load_example("gpt3-175b-a100").select_stages((0, 1, 2, 7))
    job = SimJob(namespace=args.namespace, policy=policy, time_scale=args.time_scale)
    sim = SimCluster(api, job, Path(args.workdir), profile.to_csv())
    custom = client.CustomObjectsApi(api)
    kubectl = [args.kubectl, "-n", args.namespace]
    keep = False
    try:
        say(
            f"simulated cluster: {job.nodes} nodes x {job.gpus_per_node} GPUs, a sidecar on each "
            f"({job.node_ip(0)}..{job.node_ip(job.nodes - 1)}:8080), {job.ranks} job pods"
        )
        await sim.start()
        await sim.create_profile_configmap("demo-profile")
        say("starting the operator (perseus-operator)")
        sim.start_operator(kubeconfig)
        say(f"applying {EXAMPLE.relative_to(EXAMPLE.parents[1])}")
        t_apply = time.monotonic()
        await custom.create_namespaced_custom_object(
            GROUP, VERSION, args.namespace, PLURAL, manifest
        )
        token = await sim.job_token()
        say("starting the simulated trainer (perseus sim-train): 2 pipelines x 4 stages")
        sim.start_trainer(token)
        say(f"kubectl wait --for=condition=Ready energypolicy/{policy}")
        subprocess.run(
            [*kubectl, "wait", "--for=condition=Ready", f"energypolicy/{policy}", "--timeout=90s"],
            check=True,
        )
        say(f"Ready {time.monotonic() - t_apply:.1f}s after the policy was applied")

        async def status() -> dict[str, Any]:
            body = await custom.get_namespaced_custom_object(
                GROUP, VERSION, args.namespace, PLURAL, policy
            )
            st: dict[str, Any] = body.get("status") or {}
            return st

        async def measured() -> dict[str, Any] | None:
            st = await status()
            return st if st.get("measuredSavingPercent") is not None else None

        await wait_for("the measured saving", measured, 60, 0.5)
        say(f"measuring for {args.measure_s:.0f}s under the chosen plan")
        await asyncio.sleep(args.measure_s)
        final = await status()
        print(flush=True)
        subprocess.run([*kubectl, "get", "energypolicies"], check=True)
        base_s = (final.get("frontier") or {}).get("baselineIterationTimeSeconds")
        print(
            f"\nmeasured energy saving: {final.get('measuredSavingPercent')}% "
            f"(predicted {final.get('predictedSavingPercent')}%) at an iteration time of "
            f"{final.get('iterationTimeSeconds')} s (all GPUs at maximum clock: {base_s} s)\n",
            flush=True,
        )
        keep = args.keep
        return 0
    finally:
        if keep:
            procs = [*sim.sidecars.values(), sim.operator, sim.trainer]
            pids = " ".join(str(p.pid) for p in procs if p is not None)
            (Path(args.workdir) / "pids").write_text(pids + "\n")
            say(f"kept running: the operator, {len(sim.sidecars)} sidecars and the trainer")
        else:
            say("cleaning up")
            await sim.close()
        await api.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perseus_sim.demo")
    parser.add_argument("--workdir", required=True, help="logs and simulated GPU state go here")
    parser.add_argument("--namespace", default="perseus-demo")
    parser.add_argument("--kubectl", default="kubectl")
    parser.add_argument("--time-scale", type=float, default=0.5, help="wall s per simulated s")
    parser.add_argument("--measure-s", type=float, default=15.0)
    parser.add_argument(
        "--keep", action="store_true", help="on success, leave everything running (WORKDIR/pids)"
    )
    args = parser.parse_args(argv)
    if "KUBECONFIG" not in os.environ:
        print("demo: error: set KUBECONFIG (scripts/demo.sh starts a cluster)", file=sys.stderr)
        return 2
    try:
        return asyncio.run(run_demo(args))
    except (TimeoutError, subprocess.CalledProcessError) as exc:
        print(f"demo: error: {exc}; logs in {args.workdir}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
