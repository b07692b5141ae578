"""Benchmark the planner against lowtime 0.3.0 (the solver of Zeus's Perseus) and the LP bound.

For each case (real profile x microbatches, plus a synthetic 32-stage x 256-microbatch pipeline)
it runs `perseus plan` as a user does (a fresh process: start-up and imports included; the median of
`--repeat` runs, 3 by default) and, where
asked, lowtime driven as Zeus's Perseus example drives it (exponential cost model fitted to the
Pareto options, 1 ms unit time, effective cost e - P_b*t, Phillips-Dessouky from the slowest plan
down). Every plan of both is costed with our exact evaluator, then it prints: seconds and their
ratio, peak memory, the LP lower bound on the zero-slowdown saving (HiGHS through scipy) and our
gap to it, the worst energy excess over lowtime at matched iteration times, the straggler choice
at T' = 1.1/1.2/1.5 x T0 against the best of lowtime's plans chosen the same way, and the largest
spacing between consecutive plans from the fastest one to T*.

    python bench/planner.py --quick                   # 4 profiles x 12 microbatches, no lowtime
    python bench/planner.py --lowtime-up-to 24        # lowtime on 12 and 24 (slow: minutes)
    python bench/planner.py --microbatches 12 24 48 96 --synthetic --no-lowtime

Needs the `bench` extra (lowtime, scipy, psutil). The figures depend on the machine's load.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from perseus_operator.planner.evaluate import dag_cost, plan_durations
from perseus_operator.planner.model import build_options, option_classes
from perseus_operator.planner.pipeline import PipelineDag, PipelineShape, build_dag
from perseus_profiles import EXAMPLES, Measurement, StageProfile, load_example

REPO = Path(__file__).resolve().parent.parent
PERSEUS = [sys.executable, "-m", "perseus_operator.cli"]
PACES = (1.1, 1.2, 1.5)
Point = tuple[float, float]  # (iteration_time_s, energy_j)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Exact:
    """Exact costs of plans under one profile and pipeline (our evaluator, DAG built once)."""

    profile: StageProfile
    dag: PipelineDag
    blocking_w: float

    def cost(self, freqs: Sequence[Sequence[int]]) -> Point:
        t, e = plan_durations(self.profile, self.dag, freqs)
        return dag_cost(self.dag, t, e, self.blocking_w)

    def baseline(self) -> Point:
        f = self.profile.max_frequency_mhz
        return self.cost([[f] * len(seq) for seq in self.dag.order])


def run_ours(csv: Path, shape: PipelineShape, blocking_w: float, out: Path) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB, sampled every 20 ms) of `perseus plan` in a fresh process."""
    import psutil

    cmd = [*PERSEUS, "plan", "--profile", str(csv), "--stages", str(shape.stages),
           "--microbatches", str(shape.microbatches), "--blocking-power-w", str(blocking_w),
           "--out", str(out)]  # fmt: skip
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        watch = psutil.Process(proc.pid)
        peak = 0
        while proc.poll() is None:
            try:
                peak = max(peak, watch.memory_info().rss)
            except psutil.Error:
                break
            time.sleep(0.02)
        proc.wait()
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            err.seek(0)
            raise SystemExit(f"perseus plan failed: {err.read().decode().strip()}")
    return seconds, peak / 2**20


def run_lowtime(
    profile: StageProfile, shape: PipelineShape, blocking_w: float
) -> tuple[float, list[list[list[int]]]]:
    """lowtime as Zeus's Perseus example drives it; returns seconds and every plan it yields."""
    import networkx as nx  # type: ignore[import-untyped]
    from lowtime.cost_model import ExponentialModel
    from lowtime.graph_utils import DependencyResolver, add_sink_node, add_source_node
    from lowtime.operation import CandidateExecutionOptions, ExecutionOption, OperationSpec
    from lowtime.perseus.instruction import (
        Backward,
        Forward,
        Instruction,
        backward_dep,
        forward_dep,
    )
    from lowtime.perseus.schedule import Synchronous1F1B
    from lowtime.solver import PhillipsDessouky

    start = time.perf_counter()
    specs: dict[int, dict[type, Any]] = {}
    for s in range(shape.stages):
        specs[s] = {}
        for kind, inst_type in enumerate((Forward, Backward)):
            options = [
                ExecutionOption[int](
                    real_time=m.time_s, unit_time=0.001, cost=m.energy_j, knob=m.frequency_mhz
                )
                for m in profile.options[s][kind]
            ]
            cand = CandidateExecutionOptions[int](options=options)
            for option in cand.options:
                option.cost -= blocking_w * option.quant_time * option.unit_time
            specs[s][inst_type] = OperationSpec[int](
                options=cand, cost_model=ExponentialModel(cand)
            )
    dag = nx.DiGraph()
    node = 2
    stages: list[list[Any]] = []
    for s in range(shape.stages):
        ids = []
        insts = []
        for inst in Synchronous1F1B(shape.stages, shape.microbatches, s, specs[s]):
            dag.add_node(node, op=inst)
            ids.append(node)
            insts.append(inst)
            node += 1
        stages.append(insts)
        dag.add_edges_from(itertools.pairwise(ids))
    resolver = DependencyResolver([forward_dep, backward_dep], node_type=Instruction)
    nodes = list(dag.nodes(data=True))
    for (a, da), (b, db) in itertools.product(nodes, nodes):
        if resolver.is_dependent(da["op"], db["op"]):
            dag.add_edge(a, b)
    add_source_node(dag, 0)
    add_sink_node(dag, 1)
    dag.graph["source_node"] = 0
    dag.graph["sink_node"] = 1
    order = [[f"{type(i).__name__[0]}{i.micro_batch_id}" for i in insts] for insts in stages]
    if order != [list(seq) for seq in build_dag(shape).order]:
        raise SystemExit("lowtime's 1F1B order differs from ours")
    plans = []
    for n, _ in enumerate(PhillipsDessouky(dag).run()):
        plans.append([[int(i.assigned_knob) for i in insts] for insts in stages])
        if n % 500 == 0:
            log(f"    lowtime: {n} iterations, {time.perf_counter() - start:.0f} s")
    return time.perf_counter() - start, plans


def lp_bound(
    profile: StageProfile, dag: PipelineDag, blocking_w: float, deadline_s: float
) -> float:
    """Least energy of the LP relaxation at `deadline_s` (HiGHS): durations continuous on the
    lower convex hull of each instruction's (t, e - P_b*t) options, the DAG's precedence kept."""
    from scipy.optimize import linprog
    from scipy.sparse import coo_matrix

    table = build_options(profile, dag, blocking_w)
    n = dag.num_nodes
    cls = option_classes(dag)  # per (stage, chunk, kind)
    rows: list[int] = []
    cols: list[int] = []
    vals: list[float] = []
    rhs: list[float] = []

    def add(entries: list[tuple[int, float]], bound: float) -> None:
        r = len(rhs)
        for c, v in entries:
            rows.append(r)
            cols.append(c)
            vals.append(v)
        rhs.append(bound)

    hulls = []
    for c in range(table.num_classes):
        k = int(table.count[c])
        t, cost = table.time_s[c, :k], table.cost_j[c, :k]
        hull = [0]
        for j in range(1, k):
            while len(hull) >= 2:
                a, b = hull[-2], hull[-1]
                if (t[b] - t[a]) * (cost[j] - cost[a]) - (cost[b] - cost[a]) * (t[j] - t[a]) <= 0:
                    hull.pop()
                else:
                    break
            hull.append(j)
        hulls.append((t[hull], cost[hull]))
    # Variables: start x_i, duration d_i, cost z_i.
    bounds: list[tuple[float | None, float | None]] = [(0.0, None)] * n
    bounds += [(float(hulls[c][0][0]), float(hulls[c][0][-1])) for c in cls]
    bounds += [(None, None)] * n
    for i in range(n):
        for p in dag.preds[i]:
            if p != n:
                add([(int(p), 1.0), (n + int(p), 1.0), (i, -1.0)], 0.0)
        add([(i, 1.0), (n + i, 1.0)], deadline_s)
        ht, hc = hulls[cls[i]]
        if len(ht) == 1:
            bounds[2 * n + i] = (float(hc[0]), float(hc[0]))
        for a in range(len(ht) - 1):
            slope = (hc[a + 1] - hc[a]) / (ht[a + 1] - ht[a])
            add([(n + i, float(slope)), (2 * n + i, -1.0)], float(slope * ht[a] - hc[a]))
    matrix = coo_matrix((vals, (rows, cols)), shape=(len(rhs), 3 * n)).tocsr()
    objective = np.r_[np.zeros(2 * n), np.ones(n)]
    res = linprog(objective, A_ub=matrix, b_ub=rhs, bounds=bounds, method="highs")
    if res.status != 0:
        raise SystemExit(f"LP failed: {res.message}")
    return float(res.fun) + blocking_w * dag.shape.stages * deadline_s


def best_below(points: list[Point], t_limit: float) -> float | None:
    fitting = [e for t, e in points if t <= t_limit]
    return min(fitting) if fitting else None


def straggler_cost(points: list[Point], pace_s: float, idle_w: float) -> float | None:
    fitting = [e + idle_w * (pace_s - t) for t, e in points if t <= pace_s]
    return min(fitting) if fitting else None


def synthetic_profile(stages: int, seed: int = 7) -> StageProfile:
    """Distinct stages: the GPT-3 A100 stage 0 / last-stage shapes, each stage scaled apart."""
    rng = np.random.default_rng(seed)
    base = load_example("gpt3-175b-a100")
    out = []
    for s in range(stages):
        src = base.options[-1] if s == stages - 1 else base.options[0]
        scale_t, scale_e = rng.uniform(0.85, 1.15), rng.uniform(0.85, 1.15)
        out.append(tuple(
            tuple(Measurement(m.frequency_mhz, m.time_s * scale_t * rng.uniform(0.995, 1.005),
                              m.energy_j * scale_e * rng.uniform(0.995, 1.005)) for m in opts)
            for opts in src
        ))  # fmt: skip
    return StageProfile(tuple(out))  # type: ignore[arg-type]


@dataclass
class Case:
    name: str
    profile: StageProfile
    blocking_w: float
    microbatches: int


def bench_case(
    case: Case, tmp: Path, with_lowtime: bool, with_lp: bool, repeat: int = 1
) -> dict[str, Any]:
    shape = PipelineShape(stages=case.profile.num_stages, microbatches=case.microbatches)
    csv = tmp / f"{case.name}.csv"
    csv.write_text(case.profile.to_csv())
    out = tmp / f"{case.name}-{case.microbatches}.json"
    log(f"{case.name} x {case.microbatches}: perseus plan ...")
    # A half-second process is at the mercy of a busy neighbour: the median of `repeat` runs.
    runs = [run_ours(csv, shape, case.blocking_w, out) for _ in range(repeat)]
    ours_s = sorted(s for s, _ in runs)[len(runs) // 2]
    peak_mb = max(mb for _, mb in runs)
    doc = json.loads(out.read_text())
    exact = Exact(case.profile, build_dag(shape), case.blocking_w)
    t0, e0 = exact.baseline()
    ours = [exact.cost(p["frequencies_mhz"]) for p in doc["plans"]]
    report_err = max(
        max(abs(t - p["iteration_time_s"]) / t, abs(e - p["energy_j"]) / e)
        for (t, e), p in zip(ours, doc["plans"], strict=True)
    )
    row: dict[str, Any] = {
        "case": f"{case.name} x{case.microbatches}",
        "ours_s": ours_s,
        "peak_mb": peak_mb,
        "plans": len(ours),
        "report_err": report_err,
        "t_fast_rel": ours[0][0] / t0,
    }
    zero = best_below(ours, t0 * (1 + 1e-9))
    row["ours_zero"] = None if zero is None else 1 - zero / e0
    star = min(range(len(ours)), key=lambda k: ours[k][1])
    gaps = [(ours[k + 1][0] - ours[k][0]) / t0 for k in range(star)]
    row["max_gap_pct"] = 100 * max(gaps, default=0.0)
    if with_lp:
        log("  LP bound ...")
        row["lp_zero"] = 1 - lp_bound(case.profile, exact.dag, case.blocking_w, t0) / e0
    idle_w = case.blocking_w * shape.stages
    if with_lowtime:
        log("  lowtime ...")
        lt_s, lt_plans = run_lowtime(case.profile, shape, case.blocking_w)
        lt = [exact.cost(p) for p in lt_plans]
        row["lowtime_s"] = lt_s
        zero_lt = best_below(lt, t0 * (1 + 1e-9))
        row["lt_zero"] = None if zero_lt is None else 1 - zero_lt / e0
        worst = 0.0
        for t, e in lt:
            mine = best_below(ours, t)
            if mine is not None:
                worst = max(worst, mine / e - 1)
        row["worst_excess_pct"] = 100 * worst
        row["straggler_pct"] = []
        for pace in PACES:
            a = straggler_cost(ours, pace * t0, idle_w)
            b = straggler_cost(lt, pace * t0, idle_w)
            row["straggler_pct"].append(None if a is None or b is None else 100 * (a / b - 1))
    log(f"  done: {json.dumps({k: v for k, v in row.items() if k != 'case'}, default=str)}")
    return row


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(rows: list[dict[str, Any]]) -> None:
    head = (f"{'case':<22}{'ours s':>8}{'lowtime s':>10}{'ratio':>8}{'MB':>6}{'plans':>6}"
            f"{'LP %':>7}{'ours %':>8}{'gap pp':>8}{'lt %':>7}{'worse%':>8}"
            f"{'strag 1.1/1.2/1.5 %':>22}{'gap%T0':>8}{'Tfast':>8}")  # fmt: skip
    print(head)
    print("-" * len(head))
    for r in rows:
        lp, zero = r.get("lp_zero"), r.get("ours_zero")
        gap = None if lp is None or zero is None else 100 * (lp - zero)
        ratio = r["lowtime_s"] / r["ours_s"] if "lowtime_s" in r else None
        strag = r.get("straggler_pct")
        strag_s = "/".join(fmt(x, "+.2f") for x in strag) if strag else "-"
        print(
            f"{r['case']:<22}{r['ours_s']:>8.2f}{fmt(r.get('lowtime_s'), '.1f'):>10}"
            f"{fmt(ratio, '.0f'):>8}{r['peak_mb']:>6.0f}{r['plans']:>6}"
            f"{fmt(None if lp is None else 100 * lp, '.2f'):>7}"
            f"{fmt(None if zero is None else 100 * zero, '.2f'):>8}{fmt(gap, '.2f'):>8}"
            f"{fmt(None if r.get('lt_zero') is None else 100 * r['lt_zero'], '.2f'):>7}"
            f"{fmt(r.get('worst_excess_pct'), '.3f'):>8}{strag_s:>22}"
            f"{r['max_gap_pct']:>8.3f}{r['t_fast_rel']:>8.4f}"
        )
    print(
        "\nours s: wall time of the whole `perseus plan` process (median of --repeat runs;"
        " lowtime runs once); MB: its peak RSS;"
        " LP %/ours %/lt %: saving at zero slowdown (t <= T0) of the LP bound, our plans,"
        " lowtime's plans; gap pp:"
        " LP - ours; worse%: largest energy excess of our best plan over a lowtime plan at the"
        " same or a later time (0 = never worse); strag: our straggler choice's cost vs the best"
        " lowtime plan chosen the same way (negative = we spend less); gap%T0: largest spacing"
        " of consecutive plans between the fastest plan and T*; Tfast: fastest plan / T0."
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profiles", nargs="+", default=list(EXAMPLES), choices=list(EXAMPLES))
    parser.add_argument("--microbatches", nargs="+", type=int, default=[12, 24, 48, 96])
    parser.add_argument(
        "--lowtime-up-to",
        type=int,
        default=24,
        help="run lowtime on cases with at most this many microbatches",
    )
    parser.add_argument("--no-lowtime", action="store_true")
    parser.add_argument("--no-lp", action="store_true", help="skip the LP bound")
    parser.add_argument("--synthetic", action="store_true", help="add 32 stages x 256 microbatches")
    parser.add_argument("--quick", action="store_true", help="12 microbatches only, no lowtime")
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs of `perseus plan` per case (median reported)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.microbatches, args.no_lowtime = [12], True
    cases = [
        Case(name, load_example(name), EXAMPLES[name].blocking_power_w, mbs)
        for name in args.profiles
        for mbs in args.microbatches
    ]
    rows = []
    # An installed package has its bytecode compiled by pip; an editable checkout under
    # PYTHONDONTWRITEBYTECODE=1 would recompile the planner on every `perseus plan` run.
    import compileall

    import perseus_operator
    import perseus_profiles

    for package in (perseus_operator, perseus_profiles):
        compileall.compile_dir(Path(str(package.__file__)).parent, quiet=1)
    env_note = f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}"
    log(f"benchmark on {env_note}")
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            lowtime = not args.no_lowtime and case.microbatches <= args.lowtime_up_to
            rows.append(bench_case(case, Path(tmp), lowtime, not args.no_lp, args.repeat))
        if args.synthetic:
            synth = Case("synthetic-32", synthetic_profile(32), 83.64, 256)
            rows.append(
                bench_case(synth, Path(tmp), with_lowtime=False, with_lp=False, repeat=args.repeat)
            )
    print(f"planner benchmark ({env_note})")
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
