"""How much is attainable under a straggler: the whole discrete problem as a MIP (HiGHS).

The straggler benchmark measures our plan against the LP bound at the pace T'. The LP bound is
not attainable in general (each instruction runs at one of its discrete clocks), so a gap target
can be out of reach. This script solves the discrete problem itself as a mixed-integer program
(one binary per instruction and efficient option, start times continuous, the DAG's precedence
and the deadline T') for a time limit and prints, against the LP bound: the best plan the MIP
found, the MIP's own lower bound (any plan costs at least that much), and our planner's plan.
If the MIP's lower bound is above a target gap, no plan reaches the target.

    python -m bench.straggler_mip --example bloom-176b-a100 --microbatches 12 --pace 1.05

Needs the `bench` extra (scipy). Minutes per case; the figures depend on the time limit.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence

import numpy as np
from bench.planner import Exact, lp_bound

from perseus_operator.planner import PacePlanner, PipelineShape, compute_frontier
from perseus_profiles import EXAMPLES, load_example


def mip_cost(
    example: str, microbatches: int, pace_ratio: float, time_limit_s: float
) -> dict[str, float]:
    """Best discrete cost found, the MIP's lower bound, the LP bound and ours, in joules."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix

    profile, blocking_w = load_example(example), EXAMPLES[example].blocking_power_w
    shape = PipelineShape(profile.num_stages, microbatches)
    fr = compute_frontier(profile, shape, blocking_w)
    pace_s = pace_ratio * fr.t0_s
    planner = PacePlanner(profile, fr)  # its DAG and option table are the MIP's
    dag, table, cls = planner.dag, planner.table, planner.search.cls
    exact = Exact(profile, dag, blocking_w)
    n = dag.num_nodes
    # Variables: n start times, then one binary per (node, efficient option).
    first: list[int] = []
    col = n
    for i in range(n):
        first.append(col)
        col += int(table.count[cls[i]])
    width = col
    rows: list[int] = []
    cols: list[int] = []
    vals: list[float] = []
    lo: list[float] = []
    hi: list[float] = []

    def add(entries: list[tuple[int, float]], low: float, high: float) -> None:
        r = len(lo)
        for c, v in entries:
            rows.append(r)
            cols.append(c)
            vals.append(v)
        lo.append(low)
        hi.append(high)

    def duration(i: int) -> list[tuple[int, float]]:
        c = int(cls[i])
        return [(first[i] + j, float(table.time_s[c, j])) for j in range(int(table.count[c]))]

    for i in range(n):
        c = int(cls[i])
        add([(first[i] + j, 1.0) for j in range(int(table.count[c]))], 1.0, 1.0)
        for p in dag.preds[i]:
            if p != n:
                add([(int(p), 1.0), *duration(int(p)), (i, -1.0)], -np.inf, 0.0)
        add([(i, 1.0), *duration(i)], -np.inf, pace_s)
    objective = np.zeros(width)
    for i in range(n):
        c = int(cls[i])
        k = int(table.count[c])
        objective[first[i] : first[i] + k] = table.cost_j[c, :k]
    integrality = np.r_[np.zeros(n), np.ones(width - n)]
    bounds = Bounds(np.zeros(width), np.r_[np.full(n, pace_s), np.ones(width - n)])
    matrix = coo_matrix((vals, (rows, cols)), shape=(len(lo), width)).tocsr()
    start = time.perf_counter()
    res = milp(
        objective,
        constraints=LinearConstraint(matrix, lo, hi),
        integrality=integrality,
        bounds=bounds,
        options={"time_limit": time_limit_s, "disp": False, "mip_rel_gap": 1e-6},
    )
    elapsed = time.perf_counter() - start
    idle_j = blocking_w * shape.stages * pace_s
    if res.x is None:
        raise SystemExit(f"the MIP found no plan in {time_limit_s:.0f} s: {res.message}")
    chosen = np.asarray(
        [int(np.argmax(res.x[first[i] : first[i] + int(table.count[cls[i]])])) for i in range(n)]
    )
    mip_plan = planner.search.to_plan(chosen, math.nan, math.nan)  # re-scored below

    def over_pace_j(frequencies_mhz: Sequence[Sequence[int]]) -> float:
        t, e = exact.cost(frequencies_mhz)
        return e + blocking_w * shape.stages * max(0.0, pace_s - t)

    return {
        "bound_j": lp_bound(profile, dag, blocking_w, pace_s),
        "mip_j": over_pace_j(mip_plan.frequencies_mhz),
        "mip_lower_j": float(res.mip_dual_bound) + idle_j,
        "ours_j": over_pace_j(planner.plan(pace_s).plan.frequencies_mhz),
        "seconds": elapsed,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--example", choices=sorted(EXAMPLES), default="bloom-176b-a100")
    parser.add_argument("--microbatches", type=int, default=12)
    parser.add_argument("--pace", type=float, nargs="+", default=[1.05])
    parser.add_argument("--time-limit-s", type=float, default=300.0)
    args = parser.parse_args(argv)
    for ratio in args.pace:
        got = mip_cost(args.example, args.microbatches, ratio, args.time_limit_s)
        b = got["bound_j"]
        print(
            f"{args.example} x{args.microbatches} at {ratio} x T0 "
            f"({got['seconds']:.0f} s of MIP): above the LP bound: ours "
            f"{100 * (got['ours_j'] / b - 1):.3f}%, MIP best {100 * (got['mip_j'] / b - 1):.3f}%, "
            f"MIP lower bound {100 * (got['mip_lower_j'] / b - 1):.3f}%",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
