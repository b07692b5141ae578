"""Benchmark straggler plans: solved at the pace (`PacePlanner`) against the LP bound at the pace,
the frontier lookup, and lowtime 0.3.0's best plan chosen the same way.

Under a straggler at pace T' a pipeline's cost is its energy plus blocking power on every GPU
while it waits until T'. For each real profile (8 stages) x microbatches and each T'/T0, it
prints the gap of our plan to the LP bound at T' (HiGHS through scipy, a formulation independent
of the planner's, see `planner.lp_bound`), the same for the frontier lookup and, where lowtime
runs, for the cheapest of lowtime's plans at T' (every plan re-scored with our exact evaluator),
and the planner's time. "Ours" is what the operator does: a planner prepared once per frontier
(`PacePlanner.prepare`, its one-time cost printed as "prepare"), solving the pace after a solve
far away, so it starts from the nearest prepared basis; it is timed halfway between two prepared
paces, the farthest a pace can be from one. The baseline, run in the same process, is "cold": a
fresh unprepared planner (model built, LP from scratch). Times are medians of `--repeat` runs,
wall clock and CPU, with the machine's load printed; the frontier itself is computed once per
case, outside the timing.

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
    prep_cpu = time.process_time()
    prepared = PacePlanner(profile, fr)
    prepared.prepare()
    row["prepare_cpu_s"] = time.process_time() - prep_cpu
    step_s = prepared.config.pace_prepare_step * fr.t0_s
    for ratio in PACES:
        pace_s = ratio * fr.t0_s
        # A solve there leaves the LP's basis farther from the pace than a prepared one.
        far_s = fr.t0_s * (1.3 if ratio < 1.2 else 1.0)
        cold_s, cold_cpu_s = [], []
        for _ in range(repeat):
            start, cpu = time.perf_counter(), time.process_time()
            PacePlanner(profile, fr).plan(pace_s)
            cold_s.append(time.perf_counter() - start)
            cold_cpu_s.append(time.process_time() - cpu)
        ours_s, ours_cpu_s = [], []
        for _ in range(repeat):
            prepared.plan(far_s)
            start, cpu = time.perf_counter(), time.process_time()
            prepared.plan(pace_s + step_s / 2)  # halfway between two prepared paces
            ours_s.append(time.perf_counter() - start)
            ours_cpu_s.append(time.process_time() - cpu)
        prepared.plan(far_s)
        got = prepared.plan(pace_s)
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
                "ours_s": statistics.median(ours_s),
                "ours_cpu_s": statistics.median(ours_cpu_s),
                "cold_s": statistics.median(cold_s),
                "cold_cpu_s": statistics.median(cold_cpu_s),
                "source": got.source,
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
            ("ours ms", [f"{1000 * x['ours_s']:.0f} " for x in p]),
            ("  cpu ms", [f"{1000 * x['ours_cpu_s']:.0f} " for x in p]),
            ("cold ms", [f"{1000 * x['cold_s']:.0f} " for x in p]),
            ("  cpu ms", [f"{1000 * x['cold_cpu_s']:.0f} " for x in p]),
        ]
        for k, (label, cells) in enumerate(lines):
            if label == "lowtime %" and all(x["lowtime"] is None for x in p):
                continue
            print(
                f"{row['case'] if k == 0 else '':<22}{label:<12}"
                + "".join(f"{c:>11}" for c in cells)
                + (f"   prepare {1000 * row['prepare_cpu_s']:.0f} ms cpu" if k == 0 else "")
            )
    every = [x for row in rows for x in row["paces"]]
    gaps = [x["ours"] for x in every]
    ours, ours_cpu = [x["ours_s"] for x in every], [x["ours_cpu_s"] for x in every]
    cold, cold_cpu = [x["cold_s"] for x in every], [x["cold_cpu_s"] for x in every]
    prep = [row["prepare_cpu_s"] for row in rows]
    within = sum(g <= TARGET_GAP for g in gaps)
    speedup = statistics.median(c / max(o, 1e-6) for c, o in zip(cold_cpu, ours_cpu, strict=True))
    print(
        f"\nours/lookup/lowtime %: cost over the straggler's iteration (energy + blocking power"
        f" while waiting) above the LP bound at T' (* = the lookup was kept: the solve found"
        f" nothing cheaper); ours: a prepared PacePlanner (the operator's) solving halfway"
        f" between two prepared paces; cold: a fresh unprepared PacePlanner solving the pace"
        f" (the baseline); ms: wall clock, cpu ms: this process's CPU time (what a busy machine"
        f" does not inflate); medians of runs.\n"
        f"within {100 * TARGET_GAP:.1f}% of the bound: {within}/{len(gaps)}; worst"
        f" {100 * max(gaps):.3f}%; ours: median {1000 * statistics.median(ours):.0f} ms, max"
        f" {1000 * max(ours):.0f} ms ({sum(c < TARGET_S for c in ours)}/{len(ours)} under"
        f" {1000 * TARGET_S:.0f} ms), CPU max {1000 * max(ours_cpu):.0f} ms"
        f" ({sum(c < TARGET_S for c in ours_cpu)}/{len(ours_cpu)} under"
        f" {1000 * TARGET_S:.0f} ms); cold: median {1000 * statistics.median(cold):.0f} ms, max"
        f" {1000 * max(cold):.0f} ms, CPU max {1000 * max(cold_cpu):.0f} ms"
        f" ({sum(c < TARGET_S for c in cold_cpu)}/{len(cold_cpu)} under"
        f" {1000 * TARGET_S:.0f} ms); CPU cold/ours median {speedup:.1f}x;"
        f" prepare: {1000 * statistics.median(prep):.0f} ms CPU median, max"
        f" {1000 * max(prep):.0f} ms, once per frontier"
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
