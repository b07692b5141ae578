"""What planning costs the operator's own process: the planner in a child (`plan_process`, as the
operator runs it) against the planner in-process (as it ran before), and a pipeline too big for
the child's memory limit.

    python bench/plan_process.py [--stages 32 --microbatches 256] [--oversize 64x1024]

Each way runs in a fresh process standing in for the operator (so neither inherits the other's
freed heap). Figures: wall time, that process's peak resident memory above its start (VmHWM
after the imports, through /proc/self/clear_refs), and the planner child's peak resident memory.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from perseus_operator.plan_process import PlanningError, plan_in_subprocess
from perseus_operator.planner import PipelineShape, compute_frontier
from perseus_profiles import StageProfile, load_example

BLOCKING_W = 83.64


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> int:
    """Reset this process's peak RSS to its current RSS; returns that, in kB."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kb("VmRSS")


def _profile(stages: int) -> StageProfile:
    real = load_example("gpt3-175b-a100")
    return real if stages == 8 else real.select_stages([s % 8 for s in range(stages)])


async def measure(
    mode: str, stages: int, microbatches: int, memory_mib: int, timeout_s: float
) -> dict[str, Any]:
    """One way of planning, in this process: a dict of figures."""
    shape = PipelineShape(stages, microbatches)
    profile = _profile(stages)
    start = _reset_peak()
    t = time.perf_counter()
    outcome = "planned"
    plans = 0
    try:
        if mode == "inproc":
            frontier = await asyncio.to_thread(compute_frontier, profile, shape, BLOCKING_W)
        else:
            frontier = await plan_in_subprocess(
                profile, shape, BLOCKING_W, memory_mib=memory_mib, timeout_s=timeout_s
            )
        plans = len(frontier.plans)
    except PlanningError as exc:
        outcome = exc.message
    return {
        "wall_s": time.perf_counter() - t,
        "operator_mb": (_status_kb("VmHWM") - start) / 1024,
        "child_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "plans": plans,
        "outcome": outcome,
    }


def run_fresh(
    mode: str, stages: int, microbatches: int, args: argparse.Namespace
) -> dict[str, Any]:
    cmd = [sys.executable, __file__, f"--mode={mode}", f"--stages={stages}"]
    cmd += [f"--microbatches={microbatches}", f"--memory-mib={args.memory_mib}"]
    cmd += [f"--timeout-s={args.timeout_s}"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, default=32)
    parser.add_argument("--microbatches", type=int, default=256)
    parser.add_argument("--memory-mib", type=int, default=1024)
    parser.add_argument("--timeout-s", type=float, default=600.0)
    parser.add_argument("--oversize", default="64x1024", help="SxM beyond the limit; '' skips")
    parser.add_argument("--mode", choices=("inproc", "child"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        figures = asyncio.run(
            measure(args.mode, args.stages, args.microbatches, args.memory_mib, args.timeout_s)
        )
        print(json.dumps(figures))
        return

    s, m = args.stages, args.microbatches
    print(f"pipeline {s} x {m}: {2 * s * m} instructions per pipeline")
    before = run_fresh("inproc", s, m, args)
    now = run_fresh("child", s, m, args)
    assert before["plans"] == now["plans"], (before, now)
    print(f"{'':24} {'wall s':>8} {'operator +MB':>13} {'child peak MB':>14}")
    print(f"{'in-process (before)':24} {before['wall_s']:8.2f} {before['operator_mb']:13.0f}"
          f" {'-':>14}")  # fmt: skip
    print(f"{'child process (now)':24} {now['wall_s']:8.2f} {now['operator_mb']:13.0f}"
          f" {now['child_mb']:14.0f}")  # fmt: skip
    ratio = now["operator_mb"] / max(before["operator_mb"], 1.0)
    print(f"operator memory while planning: {ratio:.2f}x of in-process, {now['plans']} plans")
    if args.oversize:
        bs, bm = (int(x) for x in args.oversize.split("x"))
        big = run_fresh("child", bs, bm, args)
        print(f"{bs} x {bm} in the child at {args.memory_mib} MiB: {big['outcome']} after"
              f" {big['wall_s']:.1f} s; operator +{big['operator_mb']:.0f} MB")  # fmt: skip


if __name__ == "__main__":
    main()
