"""`perseus sim-train`: run the simulated pipeline trainer against running simulated sidecars.

    perseus-sidecar --gpu-backend simulated --example gpt3-175b-a100 --gpus 8 --time-scale 0.1 \\
        --state-dir /tmp/node0 --port 8080 --event-port 8081 --token-file op.token &
    perseus sim-train --node 127.0.0.1:8080=/tmp/node0 --pipelines 1 --microbatches 12 \\
        --iterations 5 --operator-token-file op.token

With ``--operator-token-file`` the trainer announces the job to the sidecars itself (standalone,
no operator) and withdraws it at the end; otherwise the operator announces it and the trainer
needs the job token (``--job-token-file``, the policy's Secret). Rank r runs in pod
``<job>-<r>``, data-parallel pipeline r // S, stage r % S, on the nodes' GPUs in order.
Prints one line per iteration: wall-clock time in simulated seconds against the all-max-clock
time of the profile's 1F1B DAG, and the GPUs' energy. A ground-truth profile with per-chunk rows
(v model chunks per stage) plays Megatron-LM's interleaved 1F1B instead.

``perseus sim-train coordinator`` and ``perseus sim-train rank`` run the same job as one process
per rank (a pod each) and a coordinator: see `perseus_sim.commands.sim_distributed`.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from perseus_operator.cli import CliError
from perseus_sim.commands import sim_distributed

if TYPE_CHECKING:
    from perseus_sim.spec import IterationResult

__all__ = [
    "add_parser",
    "format_iteration",
    "parse_crash",
    "parse_node",
    "parse_straggler",
    "run",
]


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "sim-train",
        allow_abbrev=False,
        help="run the simulated 1F1B pipeline trainer against simulated sidecars",
        description="Play P data-parallel 1F1B pipelines on simulated GPUs (interleaved 1F1B "
        "when the nodes' profile has per-chunk rows), calling the real training hooks against "
        "running `perseus-sidecar --gpu-backend simulated` processes.",
    )
    parser.add_argument(
        "--node",
        action="append",
        metavar="HOST:PORT=STATE_DIR",
        help="a simulated node: its sidecar's HTTP address and --state-dir (repeat per node)",
    )
    parser.add_argument("--pipelines", type=int, default=1, help="data-parallel pipelines")
    parser.add_argument("--microbatches", type=int, help="microbatches/iteration (required)")
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--namespace", default="default", help="the job's namespace")
    parser.add_argument("--job", default="sim", help="the job (EnergyPolicy) name")
    parser.add_argument("--pod-prefix", help="rank r runs in pod PREFIX-r (default: the job)")
    parser.add_argument(
        "--pod-ip-base",
        help="rank r's pod IP is this + r (e.g. 127.0.0.10) and its hooks bind to it; "
        "default: pods on the host network",
    )
    token = parser.add_mutually_exclusive_group()
    token.add_argument("--job-token-file", type=Path, help="file with the job token")
    token.add_argument("--job-token", help="the job token itself (tests)")
    parser.add_argument(
        "--operator-token-file",
        type=Path,
        help="standalone: announce the job to the sidecars with this operator token",
    )
    parser.add_argument(
        "--keep-job", action="store_true", help="standalone: do not withdraw the job at the end"
    )
    parser.add_argument(
        "--straggler",
        action="append",
        default=[],
        metavar="P:FACTOR[:ITER]",
        help="pipeline P runs FACTOR times slower from iteration ITER (default 0) on",
    )
    parser.add_argument(
        "--crash",
        action="append",
        default=[],
        metavar="RANK:ITER[:DOWN_S]",
        help="rank RANK dies halfway through iteration ITER and restarts after DOWN_S wall "
        "seconds (5)",
    )
    parser.add_argument(
        "--time-scale", type=float, help="check the nodes run at this time scale (wall/sim)"
    )
    parser.add_argument(
        "--allreduce-s", type=float, default=0.0, help="simulated all-reduce time per iteration"
    )
    parser.add_argument(
        "--max-lag-ms", type=float, default=50.0, help="host lag forgiven before a late start"
    )
    parser.add_argument("--connect-timeout-s", type=float, default=10.0)
    parser.add_argument("--json", type=Path, help="also write the per-iteration results here")
    parser.set_defaults(run=run)
    sim_distributed.add_modes(parser)


def format_iteration(r: IterationResult) -> str:
    """The per-iteration line the demo and the tests parse."""
    deviation = (r.time_s / r.expected_s - 1) * 100
    return (
        f"iteration {r.iteration:4d}  time {r.time_s:8.4f} s  "
        f"(all-max {r.expected_s:.4f} s, {deviation:+.2f}%)  "
        f"energy {r.energy_j:10.1f} J  late starts {r.late_starts}"
    )


def parse_node(text: str) -> tuple[str, int, Path]:
    address, sep, state_dir = text.partition("=")
    if not sep or ":" not in address or not state_dir:
        raise CliError(f"--node {text!r}: expected HOST:PORT=STATE_DIR")
    host, port = sim_distributed.parse_address(address, "--node")
    return host, port, Path(state_dir)


def _numbers(text: str, flag: str, shape: str, count: tuple[int, int]) -> list[str]:
    parts = text.split(":")
    if not count[0] <= len(parts) <= count[1] or not all(parts):
        raise CliError(f"{flag} {text!r}: expected {shape}")
    return parts


def parse_straggler(text: str) -> tuple[int, float, int]:
    parts = _numbers(text, "--straggler", "P:FACTOR[:ITER]", (2, 3))
    try:
        pipeline, factor = int(parts[0]), float(parts[1])
        iteration = int(parts[2]) if len(parts) == 3 else 0
    except ValueError:
        raise CliError(f"--straggler {text!r}: expected P:FACTOR[:ITER] numbers") from None
    if not math.isfinite(factor) or factor <= 0:
        raise CliError(f"--straggler {text!r}: FACTOR must be a positive number")
    return pipeline, factor, iteration


def parse_crash(text: str) -> tuple[int, int, float]:
    parts = _numbers(text, "--crash", "RANK:ITER[:DOWN_S]", (2, 3))
    try:
        rank, iteration = int(parts[0]), int(parts[1])
        down_s = float(parts[2]) if len(parts) == 3 else 5.0
    except ValueError:
        raise CliError(f"--crash {text!r}: expected RANK:ITER[:DOWN_S] numbers") from None
    if not math.isfinite(down_s) or down_s < 0:
        raise CliError(f"--crash {text!r}: DOWN_S must be a number >= 0")
    return rank, iteration, down_s


def _read_token(path: Path, what: str) -> str:
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"cannot read the {what} from {path}: {exc}") from None
    if not token:
        raise CliError(f"the {what} file {path} is empty")
    return token


def run(args: argparse.Namespace) -> int:
    from perseus_sim.announce import announce_job, withdraw_job
    from perseus_sim.spec import Crash, NodeSpec, SimConfig, SimulationError, Straggler
    from perseus_sim.trainer import SimTrainer

    if not args.node or args.microbatches is None:
        raise CliError(
            "--node and --microbatches are required (or run a mode: sim-train coordinator|rank)"
        )
    nodes = tuple(NodeSpec(*parse_node(text)) for text in args.node)
    operator_token = (
        None
        if args.operator_token_file is None
        else _read_token(args.operator_token_file, "operator token")
    )
    if args.job_token_file is not None:
        job_token = _read_token(args.job_token_file, "job token")
    elif args.job_token is not None:
        job_token = args.job_token
    elif operator_token is not None:
        import secrets  # only here: `perseus plan` builds this parser too and must start fast

        job_token = secrets.token_urlsafe(32)
    else:
        raise CliError(
            "the job token is needed: --job-token-file (the policy's Secret), "
            "or --operator-token-file to run standalone"
        )
    try:
        config = SimConfig(
            nodes=nodes,
            pipelines=args.pipelines,
            microbatches=args.microbatches,
            iterations=args.iterations,
            job_token=job_token,
            namespace=args.namespace,
            job=args.job,
            pod_prefix=args.pod_prefix,
            pod_ip_base=args.pod_ip_base,
            stragglers=tuple(Straggler(*parse_straggler(t)) for t in args.straggler),
            crashes=tuple(Crash(*parse_crash(t)) for t in args.crash),
            allreduce_s=args.allreduce_s,
            max_lag_s=args.max_lag_ms / 1000,
            connect_timeout_s=args.connect_timeout_s,
        )
        trainer = SimTrainer(config)
        if args.time_scale is not None and args.time_scale != trainer.time_scale:
            raise CliError(
                f"--time-scale {args.time_scale} differs from the nodes' {trainer.time_scale} "
                "(set by perseus-sidecar --time-scale)"
            )
        if operator_token is not None:
            announce_job(
                nodes,
                trainer.pods_by_node(),
                namespace=args.namespace,
                job=args.job,
                job_token=job_token,
                operator_token=operator_token,
            )
        print(
            f"sim-train: {args.pipelines} pipeline(s) x {trainer.stages} stages"
            + (f" x {trainer.chunks} chunks (interleaved 1F1B)" if trainer.chunks > 1 else "")
            + f", {args.microbatches} microbatches, time scale {trainer.time_scale}; "
            f"all-max-clock iteration {trainer.expected_s(0):.4f} s",
            flush=True,
        )

        def show(r: IterationResult) -> None:
            print(format_iteration(r), flush=True)

        try:
            results = trainer.run(show)
        finally:
            if operator_token is not None and not args.keep_job:
                for problem in withdraw_job(
                    nodes, namespace=args.namespace, job=args.job, operator_token=operator_token
                ):
                    print(f"sim-train: withdrawing the job: {problem}", file=sys.stderr)
    except SimulationError as exc:
        raise CliError(str(exc)) from None
    sim_distributed.write_results(args.json, results)
    return 0
