"""What planning costs the operator's own process: the planner in a child (`plan_process`, as the
operator runs it) against the planner in-process (as it ran before), and a pipeline too big for
the child's memory limit.

    python bench/plan_process.py [--stages 32 --microbatches 256] [--oversize 64x1024]

Figures: wall time, the operator process's peak resident memory above its start (its high-water
mark is reset between runs through /proc/self/clear_refs), and the child's peak resident memory.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import time
from pathlib import Path

from perseus_operator.plan_process import PlanningError, plan_in_subprocess
from perseus_operator.planner import PipelineShape, compute_frontier
from perseus_profiles import StageProfile, load_example


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


async def run(args: argparse.Namespace) -> None:
    shape = PipelineShape(args.stages, args.microbatches)
    profile = _profile(args.stages)
    print(f"pipeline {shape.stages} x {shape.microbatches}: {2 * shape.stages * shape.microbatches}"
          " instructions per pipeline")  # fmt: skip

    start = _reset_peak()
    t = time.perf_counter()
    child = await plan_in_subprocess(
        profile, shape, 83.64, memory_mib=args.memory_mib, timeout_s=args.timeout_s
    )
    child_s = time.perf_counter() - t
    child_parent_mb = (_status_kb("VmHWM") - start) / 1024
    child_peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024

    start = _reset_peak()
    t = time.perf_counter()
    inproc = await asyncio.to_thread(compute_frontier, profile, shape, 83.64)
    inproc_s = time.perf_counter() - t
    inproc_parent_mb = (_status_kb("VmHWM") - start) / 1024
    assert inproc.plans == child.plans, "the child and the in-process planner disagree"

    print(f"{'':24} {'wall s':>8} {'operator +MB':>13} {'child peak MB':>14}")
    print(f"{'in-process (before)':24} {inproc_s:8.2f} {inproc_parent_mb:13.0f} {'-':>14}")
    print(
        f"{'child process (now)':24} {child_s:8.2f} {child_parent_mb:13.0f} {child_peak_mb:14.0f}"
    )
    print(f"operator memory while planning: {child_parent_mb / max(inproc_parent_mb, 1):.2f}x"
          f" of in-process; same {len(child.plans)} plans")  # fmt: skip

    if args.oversize:
        stages, microbatches = (int(x) for x in args.oversize.split("x"))
        big = PipelineShape(stages, microbatches)
        start = _reset_peak()
        t = time.perf_counter()
        try:
            await plan_in_subprocess(
                _profile(stages), big, 83.64, memory_mib=args.memory_mib, timeout_s=args.timeout_s
            )
            outcome = "planned"
        except PlanningError as exc:
            outcome = exc.message
        print(f"{stages} x {microbatches} at {args.memory_mib} MiB: {outcome}"
              f" after {time.perf_counter() - t:.1f} s; operator"
              f" +{(_status_kb('VmHWM') - start) / 1024:.0f} MB")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, default=32)
    parser.add_argument("--microbatches", type=int, default=256)
    parser.add_argument("--memory-mib", type=int, default=1024)
    parser.add_argument("--timeout-s", type=float, default=600.0)
    parser.add_argument("--oversize", default="64x1024", help="SxM beyond the limit; '' skips")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
