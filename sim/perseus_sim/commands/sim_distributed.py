"""`perseus sim-train coordinator` and `perseus sim-train rank`: the simulated trainer as one
process per rank (a pod each), exchanging activations and gradients over TCP, with a
coordinator as rendezvous and all-reduce point (its own pod behind a Service)::

    perseus sim-train coordinator --port 29400 --stages 4 --pipelines 2 --microbatches 8 \\
        --iterations 20 --time-scale 0.1
    perseus sim-train rank --rank 5 --coordinator sim-coordinator:29400 \\
        --node-state /var/lib/perseus/sim --sidecar $HOST_IP:8080 --advertise-ip $POD_IP \\
        --job-token-file /var/run/perseus/job-token/token --namespace ml --pod $POD_NAME

The coordinator prints one line per iteration in `perseus sim-train`'s format and exits 0 after
the last one; each rank exits 0 then. Bad input is one line and exit code 2; a job that fails at
run time (a rank that never rejoins, a vanished coordinator) exits 1.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from perseus_operator.cli import CliError

if TYPE_CHECKING:
    from perseus_sim.spec import IterationResult

__all__ = ["add_modes", "parse_address"]


def add_modes(parser: argparse.ArgumentParser) -> None:
    modes = parser.add_subparsers(dest="mode", metavar="MODE")
    coordinator = modes.add_parser(
        "coordinator",
        help="the rendezvous and all-reduce point of a job run as one process per rank",
        description="Wait for every rank, hand out the neighbours' addresses and a common "
        "start instant, run the per-iteration barrier, report each iteration.",
    )
    coordinator.add_argument("--host", default="0.0.0.0", help="address to listen on")
    coordinator.add_argument("--port", type=int, default=29400)
    coordinator.add_argument("--stages", type=int, required=True)
    coordinator.add_argument("--pipelines", type=int, required=True)
    coordinator.add_argument("--microbatches", type=int, required=True)
    coordinator.add_argument("--iterations", type=int, required=True)
    coordinator.add_argument("--allreduce-s", type=float, default=0.0)
    scale = coordinator.add_mutually_exclusive_group()
    scale.add_argument("--time-scale", type=float, help="every rank's node must run at this")
    scale.add_argument(
        "--time-scale-from-node", type=Path, metavar="DIR", help="... at this node's time scale"
    )
    coordinator.add_argument(
        "--straggler",
        action="append",
        default=[],
        metavar="P:FACTOR[:ITER]",
        help="pipeline P runs FACTOR times slower from iteration ITER (default 0) on",
    )
    coordinator.add_argument("--join-timeout-s", type=float, default=600.0)
    coordinator.add_argument(
        "--rejoin-timeout-s",
        type=float,
        default=120.0,
        help="how long to wait for a rank that left to join again",
    )
    coordinator.add_argument(
        "--rank-timeout-s", type=float, default=30.0, help="silence after which a rank is gone"
    )
    coordinator.add_argument(
        "--stop-file",
        type=Path,
        help="end the job after the iteration in progress once this file exists "
        "(e.g. `kubectl exec ... -- touch FILE`)",
    )
    coordinator.add_argument("--json", type=Path, help="also write the per-iteration results")
    coordinator.set_defaults(run=run_coordinator)

    rank = modes.add_parser(
        "rank",
        help="one rank of a job run as one process per rank",
        description="Play one stage's 1F1B order on the node's simulated GPU, calling the "
        "hooks against the node's sidecar and exchanging activations and gradients with the "
        "neighbouring stages over TCP.",
    )
    rank.add_argument("--rank", type=int, required=True, help="stage = R %% S, pipeline = R // S")
    rank.add_argument("--coordinator", required=True, metavar="HOST:PORT")
    rank.add_argument(
        "--node-state", type=Path, required=True, metavar="DIR", help="the node's sim state dir"
    )
    rank.add_argument(
        "--sidecar", required=True, metavar="HOST:PORT", help="the node's sidecar (HTTP)"
    )
    rank.add_argument(
        "--gpu-index", type=int, help="the node GPU to play (default: rank modulo the node's GPUs)"
    )
    rank.add_argument(
        "--gpu-uuid",
        default=os.environ.get("PERSEUS_GPU_UUID") or None,
        help="the GPU the kubelet gave this pod (default: $PERSEUS_GPU_UUID, which the device "
        "plugin sets); --gpu-index wins",
    )
    rank.add_argument("--listen-port", type=int, default=29401, help="for the previous stage")
    rank.add_argument(
        "--advertise-ip",
        help="this pod's IP (downward API status.podIP); default: as the coordinator sees it",
    )
    rank.add_argument("--job-token-file", required=True, help="the policy's job token Secret")
    rank.add_argument("--namespace", default="default", help="this pod's namespace")
    rank.add_argument("--pod", default=socket.gethostname(), help="this pod's name")
    rank.add_argument("--max-lag-ms", type=float, default=50.0)
    rank.add_argument(
        "--connect-timeout-s",
        type=float,
        default=60.0,
        help="how long to retry reaching the coordinator and the sidecar",
    )
    rank.add_argument(
        "--coordinator-timeout-s",
        type=float,
        default=30.0,
        help="silence after which the coordinator counts as gone",
    )
    rank.add_argument("--peer-timeout-s", type=float, default=30.0)
    rank.set_defaults(run=run_rank)


def parse_address(text: str, flag: str) -> tuple[str, int]:
    host, colon, port_text = text.rpartition(":")
    if not colon or not host:
        raise CliError(f"{flag} {text!r}: expected HOST:PORT")
    try:
        port = int(port_text)
    except ValueError:
        raise CliError(f"{flag} {text!r}: port {port_text!r} is not a number") from None
    if not 0 < port < 65536:
        raise CliError(f"{flag} {text!r}: port must be 1-65535")
    return host.strip("[]"), port


def _port(value: int, flag: str, *, zero_ok: bool = True) -> int:
    if not (0 if zero_ok else 1) <= value < 65536:
        raise CliError(f"{flag} must be a port number, got {value}")
    return value


def _seconds(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if not math.isfinite(value) or value < 0:
            flag = "--" + name.replace("_", "-")
            raise CliError(f"{flag} must be a finite number >= 0, got {value}")


def run_coordinator(args: argparse.Namespace) -> int:
    import asyncio

    from perseus_sim.commands.sim_train import format_iteration, parse_straggler
    from perseus_sim.coordinator import Coordinator, CoordinatorError
    from perseus_sim.spec import CoordinatorConfig, SimulationError, Straggler

    _seconds(args, "allreduce_s", "join_timeout_s", "rejoin_timeout_s", "rank_timeout_s")
    time_scale = args.time_scale
    if args.time_scale_from_node is not None:
        from perseus_sidecar.gpu.simnode import open_node

        try:
            settings, _, gpus = open_node(args.time_scale_from_node)
        except Exception as exc:  # the GPU layer's errors are one readable line
            raise CliError(str(exc)) from None
        for gpu in gpus:
            gpu.close()
        time_scale = settings.time_scale
    try:
        config = CoordinatorConfig(
            stages=args.stages,
            pipelines=args.pipelines,
            microbatches=args.microbatches,
            iterations=args.iterations,
            host=args.host,
            port=_port(args.port, "--port"),
            allreduce_s=args.allreduce_s,
            stragglers=tuple(Straggler(*parse_straggler(t)) for t in args.straggler),
            time_scale=time_scale,
            join_timeout_s=args.join_timeout_s,
            rejoin_timeout_s=args.rejoin_timeout_s,
            rank_timeout_s=args.rank_timeout_s,
            stop_file=args.stop_file,
        )
    except SimulationError as exc:
        raise CliError(str(exc)) from None

    def say(line: str) -> None:
        print(f"sim-train coordinator: {line}", flush=True)

    def ready(port: int) -> None:
        say(
            f"{config.pipelines} pipeline(s) x {config.stages} stages, {config.microbatches} "
            f"microbatches, {config.iterations} iterations; listening on port {port}, "
            f"waiting for {config.ranks} ranks"
        )

    def show(result: IterationResult) -> None:
        print(format_iteration(result), flush=True)

    coordinator = Coordinator(config, on_iteration=show, say=say)
    try:
        results = asyncio.run(coordinator.serve(ready))
    except CoordinatorError as exc:
        raise CliError(str(exc), exc.code) from None
    say(f"done: {len(results)} iterations, {coordinator.restarts} restart(s)")
    write_results(args.json, results)
    return 0


def run_rank(args: argparse.Namespace) -> int:
    from perseus_sim.rank import RankError, RankOptions
    from perseus_sim.rank import run_rank as run

    _seconds(args, "max_lag_ms", "connect_timeout_s", "coordinator_timeout_s", "peer_timeout_s")
    if args.rank < 0:
        raise CliError(f"--rank must be >= 0, got {args.rank}")
    if args.gpu_index is not None and args.gpu_index < 0:
        raise CliError(f"--gpu-index must be >= 0, got {args.gpu_index}")
    if args.advertise_ip is not None:
        import ipaddress

        try:
            ipaddress.ip_address(args.advertise_ip)
        except ValueError:
            raise CliError(f"--advertise-ip {args.advertise_ip!r} is not an IP") from None
    options = RankOptions(
        rank=args.rank,
        coordinator=parse_address(args.coordinator, "--coordinator"),
        state_dir=args.node_state,
        sidecar=parse_address(args.sidecar, "--sidecar"),
        job_token_file=args.job_token_file,
        namespace=args.namespace,
        pod=args.pod,
        gpu_index=args.gpu_index,
        gpu_uuid=args.gpu_uuid,
        listen_port=_port(args.listen_port, "--listen-port"),
        advertise_ip=args.advertise_ip,
        max_lag_s=args.max_lag_ms / 1000,
        connect_timeout_s=args.connect_timeout_s,
        coordinator_timeout_s=args.coordinator_timeout_s,
        peer_timeout_s=args.peer_timeout_s,
    )
    try:
        run(options)
    except RankError as exc:
        raise CliError(str(exc), exc.code) from None
    print(f"sim-train rank {args.rank}: done", file=sys.stderr, flush=True)
    return 0


def write_results(path: Path | None, results: Sequence[IterationResult]) -> None:
    """The iterations' results as JSON at `--json PATH` (nothing without it)."""
    if path is None:
        return
    try:
        path.write_text(json.dumps([asdict(r) for r in results], indent=1) + "\n")
    except OSError as exc:
        raise CliError(f"cannot write {path}: {exc}") from None
