"""`perseus plan`: compute the time/energy frontier of a stage profile, print its summary and,
with `--out`, write it as JSON.

    perseus plan --example bloom-176b-a40 --microbatches 48
    perseus plan --profile FILE.csv --stages S --microbatches M --blocking-power-w W --out F.json
    perseus plan --example gpt3-175b-a100 --microbatches 12 --out F.json [--plot F.png]
    perseus plan --example gpt3-175b-a100 --microbatches 16 --schedule interleaved-1f1b \
        --virtual-stages 2 --split-chunks --out F.json

Prints a short summary on stdout and progress on stderr when the search takes a while.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

from perseus_hooks.pipeline import SCHEDULES
from perseus_operator.cli import CliError

__all__ = ["add_parser", "run"]

PROGRESS_AFTER_S = 2.0


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="compute the iteration-time vs. energy frontier of frequency plans",
        description="Compute the iteration-time vs. energy frontier of per-instruction GPU "
        "frequency plans for a synchronous 1F1B (or interleaved 1F1B) pipeline, print its summary "
        "and, with --out, write it as perseus-frontier/v1 JSON.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--profile", type=Path, help="stage profile CSV")
    source.add_argument("--example", help="an embedded real profile, e.g. gpt3-175b-a100")
    parser.add_argument("--stages", type=int, help="pipeline stages (default: the profile's)")
    parser.add_argument("--microbatches", type=int, required=True, help="microbatches/iteration")
    parser.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default="1f1b",
        help="pipeline schedule; interleaved-1f1b is Megatron-LM's, with --virtual-stages model "
        "chunks per stage and microbatches a multiple of the stages (default: 1f1b)",
    )
    parser.add_argument(
        "--virtual-stages",
        type=int,
        help="model chunks per stage (v) of interleaved-1f1b (default: the profile's chunks, 2 "
        "for a one-chunk profile)",
    )
    parser.add_argument(
        "--split-chunks",
        action="store_true",
        help="derive the per-chunk profile from a one-chunk one: each stage's time and energy "
        "split evenly across its chunks",
    )
    parser.add_argument(
        "--blocking-power-w",
        type=float,
        help="power of a GPU waiting on communication (W); default for --example: the paper's",
    )
    parser.add_argument("--out", type=Path, help="frontier JSON to write (default: none)")
    parser.add_argument("--plot", type=Path, help="also draw the frontier to this PNG")
    parser.set_defaults(run=run, quick_exit=True)


def run(args: argparse.Namespace) -> int:
    from perseus_operator.frontier_io import plot_frontier, write_frontier
    from perseus_operator.planner import PipelineShape, compute_frontier, plan_for_no_straggler
    from perseus_profiles import ProfileError, example, read_profile

    started = time.perf_counter()
    if args.example is not None:
        chosen = example(args.example)
        profile = chosen.load()
        blocking_w = (
            chosen.blocking_power_w if args.blocking_power_w is None else args.blocking_power_w
        )
    else:
        if args.blocking_power_w is None:
            raise CliError("--blocking-power-w is required with --profile")
        profile = read_profile(args.profile)
        blocking_w = args.blocking_power_w
    if not math.isfinite(blocking_w) or blocking_w < 0:
        raise CliError(f"--blocking-power-w must be a finite number >= 0, got {blocking_w}")
    stages = profile.num_stages if args.stages is None else args.stages
    if stages < 1 or args.microbatches < 1:
        raise CliError("--stages and --microbatches must be positive integers")
    if stages != profile.num_stages:
        raise ProfileError(
            f"--stages {stages} does not match the profile's {profile.num_stages} stages"
        )
    chunks = args.virtual_stages
    if chunks is None:
        chunks = 1 if args.schedule == "1f1b" else max(profile.chunks, 2)
    if args.split_chunks:
        if profile.chunks != 1:
            raise CliError(f"--split-chunks needs a one-chunk profile; it has {profile.chunks}")
        if chunks < 2:
            raise CliError("--split-chunks is for interleaved-1f1b with --virtual-stages >= 2")
        profile = profile.split_chunks(chunks)
    shape = PipelineShape(stages, args.microbatches, args.schedule, chunks)
    frontier = compute_frontier(profile, shape, blocking_w, progress=_Progress(started))
    try:
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            write_frontier(frontier, args.out)
        if args.plot is not None:
            args.plot.parent.mkdir(parents=True, exist_ok=True)
            plot_frontier(frontier, args.plot, args.example or args.profile.name)
    except OSError as exc:
        raise CliError(f"cannot write output: {exc}") from None
    except ImportError:
        raise CliError("--plot needs matplotlib: pip install 'perseus-k8s[plot]'") from None
    elapsed = time.perf_counter() - started
    t0, e0 = frontier.t0_s, frontier.baseline_energy_j
    fastest, star = frontier.fastest, frontier.t_star
    schedule = "1F1B" if chunks == 1 else f"interleaved 1F1B, {chunks} chunks per stage"
    print(f"pipeline: {stages} stages x {args.microbatches} microbatches ({schedule}), "
          f"blocking power {blocking_w:g} W")  # fmt: skip
    print(f"baseline (all GPUs at max clock): {t0:.4f} s, {e0:.1f} J")
    print(f"fastest plan: {fastest.iteration_time_s:.4f} s ({_pct(fastest.iteration_time_s, t0)} "
          f"time), {fastest.energy_j:.1f} J ({_saving(fastest.energy_j, e0)} saved)")  # fmt: skip
    zero = plan_for_no_straggler(frontier, 0.0)
    print(f"no slowdown (<= T0): {zero.iteration_time_s:.4f} s, {zero.energy_j:.1f} J "
          f"({_saving(zero.energy_j, e0)} saved)")  # fmt: skip
    print(f"least energy (T*): {star.iteration_time_s:.4f} s ({_pct(star.iteration_time_s, t0)} "
          f"time), {star.energy_j:.1f} J ({_saving(star.energy_j, e0)} saved)")  # fmt: skip
    written = [f"written to {args.out}"] if args.out else []
    written += [f"plot {args.plot}"] if args.plot else []
    print(f"{len(frontier.plans)} plans " + (", ".join(written) or "(--out FILE saves them)")
          + f" in {elapsed:.2f} s")  # fmt: skip
    return 0


def _pct(t: float, t0: float) -> str:
    return f"{(t / t0 - 1) * 100:+.2f}%"


def _saving(e: float, e0: float) -> str:
    return f"{(1 - e / e0) * 100:.2f}%"


class _Progress:
    """Reports search progress on stderr, only once the run has lasted a couple of seconds."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.last_percent = -1

    def __call__(self, done: int, total: int) -> None:
        if time.perf_counter() - self.started < PROGRESS_AFTER_S:
            return
        percent = 100 * done // max(total, 1)
        if percent // 10 != self.last_percent // 10 or done == total:
            self.last_percent = percent
            print(f"perseus plan: searching {percent}% ({done}/{total} candidate plans)",
                  file=sys.stderr, flush=True)  # fmt: skip
