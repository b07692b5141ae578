"""Benchmark straggler plans: solved at the pace (`PacePlanner`) against the LP bound at the pace,
the frontier lookup, and lowtime 0.3.0's best plan chosen the same way.

Under a straggler at pace T' a pipeline's cost is its energy plus blocking power on every GPU
while it waits until T'. For each real profile (8 stages) x microbatches and each T'/T0, it
prints the gap of our plan to the LP bound at T' (HiGHS through scipy, a formulation independent
of the planner's, see `planner.lp_bound`), the same for the frontier lookup and, where lowtime
runs, for the cheapest of lowtime's plans at T' (every plan re-scored with our exact evaluator),
and the planner's time: "cold" builds a fresh `PacePlanner` for the pace (what the operator's first
straggler costs), "warm" re-solves on the planner that solved the previous pace (the LP from the
last basis: what a pace change costs). Times are medians of `--repeat` runs, wall clock, with the
machine's load printed; the frontier itself is computed once per case, outside the timing.

    python -m bench.straggler                          # lowtime on 12 and 24 microbatches
    python -m bench.straggler --no-lowtime --microbatches 12

Needs the `bench` extra (lowtime, scipy).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

from bench.planner import Exact, lp_bound, run_lowtime, straggler_cost

from perseus_operator.planner import PacePlanner, PipelineShape, compute_frontier
from perseus_operator.planner import plan_for_straggler as lookup
from perseus_operator.planner.pipeline import build_dag
from perseus_profiles import EXAMPLES, load_example

PACES = (1.05, 1.1, 1.2, 1.35, 1.5, 2.0)
TARGET_GAP = 0.001
TARGET_S = 0.3


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def bench_case(name: str, microbatches: int, with_lowtime: bool, repeat: int) -> dict[str, Any]:
    profile, blocking_w = load_example(name), EXAMPLES[name].blocking_power_w
    shape = PipelineShape(profile.num_stages, microbatches)
    log(f"{name} x {microbatches}: frontier ...")
    fr = compute_frontier(profile, shape, blocking_w)
    exact = Exact(profile, build_dag(shape), blocking_w)
    idle_w = blocking_w * shape.stages
    lt = None
    if with_lowtime:
        log("  lowtime ...")
        _, lt_plans = run_lowtime(profile, shape, blocking_w)
        lt = [exact.cost(p) for p in lt_plans]
    row: dict[str, Any] = {"case": f"{name} x{microbatches}", "paces": []}
    warm = PacePlanner(profile, fr)
    for ratio in PACES:
        pace_s = ratio * fr.t0_s
        cold_s, cold_cpu_s = [], []
        for _ in range(repeat):
            start, cpu = time.perf_counter(), time.process_time()
            got = PacePlanner(profile, fr).plan(pace_s)
            cold_s.append(time.perf_counter() - start)
            cold_cpu_s.append(time.process_time() - cpu)
        warm_s, warm_cpu_s = [], []
        for _ in range(repeat):
            warm.plan(fr.t0_s * (ratio - 0.05))  # each run moves from a nearby pace
            start, cpu = time.perf_counter(), time.process_time()
            again = warm.plan(pace_s)
            warm_s.append(time.perf_counter() - start)
            warm_cpu_s.append(time.process_time() - cpu)
        t, e = exact.cost(got.plan.frequencies_mhz)
        if t > pace_s * (1 + 1e-12) and got.bound_j is not None:
            raise SystemExit(f"{row['case']} at {ratio}: our plan misses the pace")
        ours_j = e + idle_w * max(0.0, pace_s - t)
        bound_j = lp_bound(profile, exact.dag, blocking_w, pace_s)
        chosen = lookup(fr, pace_s)
        lookup_j = chosen.energy_j + idle_w * (pace_s - chosen.iteration_time_s)
        lt_j = None if lt is None else straggler_cost(lt, pace_s, idle_w)
        row["paces"].append(
            {
                "ratio": ratio,
                "ours": ours_j / bound_j - 1,
                "lookup": lookup_j / bound_j - 1,
                "lowtime": None if lt_j is None else lt_j / bound_j - 1,
                "cold_s": statistics.median(cold_s),
                "warm_s": statistics.median(warm_s),
                "cold_cpu_s": statistics.median(cold_cpu_s),
                "warm_cpu_s": statistics.median(warm_cpu_s),
                "source": got.source,
                "agree": abs(again.cost_j - got.cost_j) / got.cost_j,
                "planner_bound": got.bound_j,
                "bound_j": bound_j,
            }
        )
        log(f"  {ratio}: {row['paces'][-1]}")
    return row


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.3f}"


def print_table(rows: list[dict[str, Any]]) -> None:
    head = f"{'case':<22}{'line':<12}" + "".join(f"{f'{r} x T0':>11}" for r in PACES)
    print(head)
    print("-" * len(head))
    for row in rows:
        p = row["paces"]
        lines = [
            ("ours %", [pct(x["ours"]) + ("*" if x["source"] == "frontier" else " ") for x in p]),
            ("lookup %", [pct(x["lookup"]) + " " for x in p]),
            ("lowtime %", [pct(x["lowtime"]) + " " for x in p]),
            ("cold ms", [f"{1000 * x['cold_s']:.0f} " for x in p]),
            ("  cpu ms", [f"{1000 * x['cold_cpu_s']:.0f} " for x in p]),
            ("warm ms", [f"{1000 * x['warm_s']:.0f} " for x in p]),
            ("  cpu ms", [f"{1000 * x['warm_cpu_s']:.0f} " for x in p]),
        ]
        for k, (label, cells) in enumerate(lines):
            if label == "lowtime %" and all(x["lowtime"] is None for x in p):
                continue
            print(
                f"{row['case'] if k == 0 else '':<22}{label:<12}"
                + "".join(f"{c:>11}" for c in cells)
            )
    every = [x for row in rows for x in row["paces"]]
    gaps = [x["ours"] for x in every]
    cold = [x["cold_s"] for x in every]
    warm = [x["warm_s"] for x in every]
    cold_cpu = [x["cold_cpu_s"] for x in every]
    warm_cpu = [x["warm_cpu_s"] for x in every]
    within = sum(g <= TARGET_GAP for g in gaps)
    print(
        f"\nours/lookup/lowtime %: cost over the straggler's iteration (energy + blocking power"
        f" while waiting) above the LP bound at T' (* = the lookup was kept: the solve found"
        f" nothing cheaper); cold: a fresh PacePlanner solving the pace; warm: re-solving on"
        f" one that solved a pace 0.05 x T0 faster; ms: wall clock, cpu ms: this process's CPU"
        f" time (what a busy machine does not inflate); medians of runs.\n"
        f"within {100 * TARGET_GAP:.1f}% of the bound: {within}/{len(gaps)}; worst"
        f" {100 * max(gaps):.3f}%; cold median {1000 * statistics.median(cold):.0f} ms, max"
        f" {1000 * max(cold):.0f} ms ({sum(c < TARGET_S for c in cold)}/{len(cold)} under"
        f" {1000 * TARGET_S:.0f} ms); warm median {1000 * statistics.median(warm):.0f} ms, max"
        f" {1000 * max(warm):.0f} ms; CPU time: cold max {1000 * max(cold_cpu):.0f} ms"
        f" ({sum(c < TARGET_S for c in cold_cpu)}/{len(cold_cpu)} under"
        f" {1000 * TARGET_S:.0f} ms), warm max {1000 * max(warm_cpu):.0f} ms"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--profiles", nargs="+", default=list(EXAMPLES), choices=list(EXAMPLES))
    parser.add_argument("--microbatches", nargs="+", type=int, default=[12, 24, 48, 96])
    parser.add_argument("--lowtime-up-to", type=int, default=24)
    parser.add_argument("--no-lowtime", action="store_true")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per pace (median)")
    args = parser.parse_args(argv)
    load = os.getloadavg()[0]
    log(f"straggler benchmark on {os.cpu_count()} CPUs, load {load:.1f}")
    rows = [
        bench_case(name, mbs, not args.no_lowtime and mbs <= args.lowtime_up_to, args.repeat)
        for name in args.profiles
        for mbs in args.microbatches
    ]
    print(
        f"straggler benchmark ({os.cpu_count()} CPUs, load {load:.1f} at the start,"
        f" {os.getloadavg()[0]:.1f} at the end)"
    )
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
