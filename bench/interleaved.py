"""Benchmark the planner on Megatron-LM's interleaved 1F1B (v model chunks per stage).

No peer plans energy for interleaved schedules, so the yardsticks are the LP bound (HiGHS through
scipy, the relaxation every discrete plan is above) and plain 1F1B (v = 1) on the same profile and
microbatches, run in the same process. The profiles are the four real 8-stage ones, each stage's
time and energy split evenly across its v chunks (`StageProfile.split_chunks`), written as
per-chunk CSVs and planned by `perseus plan --schedule interleaved-1f1b` in a fresh process, as a
user runs it (the median of `--repeat` runs). For each case it prints: the all-max-clock
iteration time T0, the saving at zero slowdown (t <= T0) of the LP bound and of our plans and the
gap between them, the least-energy plan's saving and time, the number of plans, and the seconds
`perseus plan` took, also as a ratio to the v = 1 run.

    python bench/interleaved.py                       # v = 1, 2, 4 x 24 and 48 microbatches
    python bench/interleaved.py --microbatches 16 96 --chunks 2 4

Needs scipy (the `bench` extra). The times depend on the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from perseus_hooks.pipeline import Schedule
from perseus_operator.planner.pipeline import PipelineShape, build_dag
from perseus_profiles import EXAMPLES, load_example

try:
    from bench.planner import Exact, best_below, log, lp_bound
except ModuleNotFoundError:  # run as a script: bench/ itself is on the path
    from planner import Exact, best_below, log, lp_bound  # type: ignore[import-not-found,no-redef]

PERSEUS = [sys.executable, "-m", "perseus_operator.cli"]


def run_plan(csv: Path, shape: PipelineShape, blocking_w: float, out: Path) -> float:
    """Wall seconds of `perseus plan` in a fresh process."""
    cmd = [*PERSEUS, "plan", "--profile", str(csv), "--microbatches", str(shape.microbatches),
           "--blocking-power-w", str(blocking_w), "--out", str(out)]  # fmt: skip
    if shape.virtual_stages > 1:
        cmd += ["--schedule", shape.schedule, "--virtual-stages", str(shape.virtual_stages)]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"perseus plan failed: {done.stderr.strip()}")
    return seconds


def bench_case(
    name: str, chunks: int, microbatches: int, tmp: Path, repeat: int, with_lp: bool
) -> dict[str, Any]:
    example = EXAMPLES[name]
    profile = load_example(name)
    if chunks > 1:
        profile = profile.split_chunks(chunks)
    schedule: Schedule = "1f1b" if chunks == 1 else "interleaved-1f1b"
    shape = PipelineShape(profile.num_stages, microbatches, schedule, chunks)
    csv = tmp / f"{name}-v{chunks}.csv"
    csv.write_text(profile.to_csv())
    out = tmp / f"{name}-v{chunks}-{microbatches}.json"
    log(f"{name} v={chunks} x {microbatches}: perseus plan ...")
    seconds = sorted(run_plan(csv, shape, example.blocking_power_w, out) for _ in range(repeat))
    doc = json.loads(out.read_text())
    exact = Exact(profile, build_dag(shape), example.blocking_power_w)
    t0, e0 = exact.baseline()
    ours = [exact.cost(p["frequencies_mhz"]) for p in doc["plans"]]
    err = max(
        max(abs(t - p["iteration_time_s"]) / t, abs(e - p["energy_j"]) / e)
        for (t, e), p in zip(ours, doc["plans"], strict=True)
    )
    if err > 1e-6:
        raise SystemExit(f"{name} v={chunks}: reported figures off by {err:.2g} (relative)")
    zero = best_below(ours, t0 * (1 + 1e-9))
    star = min(ours, key=lambda p: p[1])
    row: dict[str, Any] = {
        "name": name,
        "chunks": chunks,
        "microbatches": microbatches,
        "t0_s": t0,
        "ours_zero": None if zero is None else 1 - zero / e0,
        "star_saving": 1 - star[1] / e0,
        "star_time": star[0] / t0,
        "plans": len(ours),
        "seconds": seconds[len(seconds) // 2],
    }
    if with_lp:
        log("  LP bound ...")
        row["lp_zero"] = 1 - lp_bound(profile, exact.dag, example.blocking_power_w, t0) / e0
    return row


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(rows: list[dict[str, Any]]) -> None:
    head = (f"{'profile':<17}{'v':>3}{'M':>5}{'T0 s':>9}{'LP %':>8}{'ours %':>8}{'gap pp':>8}"
            f"{'T* %':>8}{'T*/T0':>7}{'plans':>7}{'plan s':>8}{'x v=1':>7}")  # fmt: skip
    print(head)
    print("-" * len(head))
    base_s = {(r["name"], r["microbatches"]): r["seconds"] for r in rows if r["chunks"] == 1}
    for r in rows:
        lp, zero = r.get("lp_zero"), r["ours_zero"]
        gap = None if lp is None or zero is None else 100 * (lp - zero)
        base = base_s.get((r["name"], r["microbatches"]))
        print(
            f"{r['name']:<17}{r['chunks']:>3}{r['microbatches']:>5}{r['t0_s']:>9.4f}"
            f"{fmt(None if lp is None else 100 * lp, '.2f'):>8}"
            f"{fmt(None if zero is None else 100 * zero, '.2f'):>8}{fmt(gap, '.2f'):>8}"
            f"{100 * r['star_saving']:>8.2f}{r['star_time']:>7.3f}{r['plans']:>7}"
            f"{r['seconds']:>8.2f}{fmt(None if base is None else r['seconds'] / base, '.1f'):>7}"
        )
    print(
        "\nv: model chunks per stage (1 = plain 1F1B); M: microbatches; T0: iteration time at"
        " all-max clocks; LP %/ours %: saving at zero slowdown (t <= T0) of the LP bound and of"
        " our plans; gap pp: LP - ours; T* %, T*/T0: the least-energy plan's saving and time;"
        " plan s: wall time of the whole `perseus plan` process (median of --repeat runs);"
        " x v=1: that time over the 1F1B run of the same profile and M."
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profiles", nargs="+", default=list(EXAMPLES), choices=list(EXAMPLES))
    parser.add_argument("--microbatches", nargs="+", type=int, default=[24, 48])
    parser.add_argument("--chunks", nargs="+", type=int, default=[2, 4], help="v values (>= 2)")
    parser.add_argument("--no-lp", action="store_true", help="skip the LP bound")
    parser.add_argument("--repeat", type=int, default=3, help="runs of `perseus plan` per case")
    args = parser.parse_args(argv)
    import compileall

    import perseus_operator
    import perseus_profiles

    for package in (perseus_operator, perseus_profiles):
        compileall.compile_dir(Path(str(package.__file__)).parent, quiet=1)
    env_note = f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}"
    log(f"benchmark on {env_note}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.profiles:
            for mbs in args.microbatches:
                for chunks in [1, *args.chunks]:
                    rows.append(
                        bench_case(name, chunks, mbs, Path(tmp), args.repeat, not args.no_lp)
                    )
    print(f"interleaved 1F1B planner benchmark ({env_note})")
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
