"""The `perseus-frontier/v1` JSON format (DESIGN.md "Formats"): writing, validated reading, and
an optional plot (matplotlib is imported only when a plot is asked for).

``load_frontier(text, profile)`` checks everything a consumer relies on: the format tag, the
pipeline shape against the profile, the canonical instruction order, every frequency present in
the profile, plans sorted and useful, and each reported figure equal to the plan's exact cost.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

from perseus_operator.planner import (
    SCHEDULES,
    Frontier,
    PipelineShape,
    Plan,
    evaluate_plan,
    instruction_order,
    plan_for_no_straggler,
)
from perseus_profiles import StageProfile

__all__ = [
    "FORMAT",
    "FrontierFormatError",
    "dump_frontier",
    "frontier_to_dict",
    "load_frontier",
    "plot_frontier",
    "write_frontier",
]

FORMAT = "perseus-frontier/v1"
REL_TOLERANCE = 1e-6


class FrontierFormatError(ValueError):
    """A frontier document that does not follow the format; the message is one line."""


def frontier_to_dict(frontier: Frontier) -> dict[str, Any]:
    shape = frontier.pipeline
    return {
        "format": FORMAT,
        "pipeline": {
            "schedule": shape.schedule,
            "stages": shape.stages,
            "microbatches": shape.microbatches,
            # Only interleaved pipelines carry it: 1F1B documents stay as they always were.
            **({"virtual_stages": shape.virtual_stages} if shape.virtual_stages > 1 else {}),
        },
        "blocking_power_w": frontier.blocking_power_w,
        "order": frontier.order,
        "plans": [
            {
                "iteration_time_s": p.iteration_time_s,
                "energy_j": p.energy_j,
                "frequencies_mhz": p.frequencies_mhz,
            }
            for p in frontier.plans
        ],
    }


def dump_frontier(frontier: Frontier) -> str:
    return json.dumps(frontier_to_dict(frontier), separators=(",", ":")) + "\n"


def write_frontier(frontier: Frontier, path: str | Path) -> None:
    """Write the document plan by plan, so a large frontier never exists twice as one string."""
    doc = frontier_to_dict(frontier)
    plans = doc.pop("plans")
    head = json.dumps(doc, separators=(",", ":"))
    with Path(path).open("w", encoding="utf-8") as out:
        out.write(head[:-1] + ',"plans":[')
        for n, plan in enumerate(plans):
            out.write(("," if n else "") + json.dumps(plan, separators=(",", ":")))
        out.write("]}\n")


def _number(value: object, where: str, *, positive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise FrontierFormatError(f"{where} must be a finite number, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise FrontierFormatError(f"{where} must be {'> 0' if positive else '>= 0'}, got {value}")
    return float(value)


def _positive_int(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise FrontierFormatError(f"{where} must be a positive integer, got {value!r}")
    return value


def load_frontier(text: str, profile: StageProfile) -> Frontier:
    """Parse and validate a frontier document against the profile it was planned from."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise FrontierFormatError(f"frontier is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise FrontierFormatError("frontier must be a JSON object")
    if doc.get("format") != FORMAT:
        raise FrontierFormatError(f"format must be {FORMAT!r}, got {doc.get('format')!r}")
    pipe = doc.get("pipeline")
    if not isinstance(pipe, dict):
        raise FrontierFormatError("pipeline must be an object")
    schedule = pipe.get("schedule")
    if schedule not in SCHEDULES:
        raise FrontierFormatError(
            f"pipeline.schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}"
        )
    try:
        shape = PipelineShape(
            stages=_positive_int(pipe.get("stages"), "pipeline.stages"),
            microbatches=_positive_int(pipe.get("microbatches"), "pipeline.microbatches"),
            schedule=schedule,
            virtual_stages=_positive_int(pipe.get("virtual_stages", 1), "pipeline.virtual_stages"),
        )
    except ValueError as exc:
        raise FrontierFormatError(f"pipeline: {exc}") from None
    if shape.stages != profile.num_stages or shape.virtual_stages != profile.chunks:
        raise FrontierFormatError(
            f"frontier has {shape.stages} stages x {shape.virtual_stages} chunk(s) but the "
            f"profile has {profile.num_stages} x {profile.chunks}"
        )
    blocking_w = _number(doc.get("blocking_power_w"), "blocking_power_w", positive=False)
    order = instruction_order(shape)
    raw_order = doc.get("order")
    if not isinstance(raw_order, list) or [
        tuple(seq) for seq in raw_order if isinstance(seq, list)
    ] != list(order):
        raise FrontierFormatError(f"order is not the canonical {shape.schedule} order")
    raw_plans = doc.get("plans")
    if not isinstance(raw_plans, list) or not raw_plans:
        raise FrontierFormatError("plans must be a non-empty list")
    plans = [_load_plan(p, n, profile, shape, blocking_w) for n, p in enumerate(raw_plans)]
    idle_w = blocking_w * shape.stages
    for n, (a, b) in enumerate(itertools.pairwise(plans), start=1):
        if b.iteration_time_s < a.iteration_time_s:
            raise FrontierFormatError(f"plans[{n}] is faster than plans[{n - 1}]: not sorted")
        if b.energy_j - idle_w * b.iteration_time_s >= a.energy_j - idle_w * a.iteration_time_s:
            raise FrontierFormatError(
                f"plans[{n}] is slower than plans[{n - 1}] without costing less: not useful"
            )
    max_clock = profile.max_frequency_mhz
    t0, e0 = evaluate_plan(profile, shape, blocking_w, [[max_clock] * len(s) for s in order])
    return Frontier(shape, blocking_w, order, tuple(plans), t0, e0)


def _load_plan(
    raw: object, n: int, profile: StageProfile, shape: PipelineShape, blocking_w: float
) -> Plan:
    where = f"plans[{n}]"
    if not isinstance(raw, dict):
        raise FrontierFormatError(f"{where} must be an object")
    t = _number(raw.get("iteration_time_s"), f"{where}.iteration_time_s")
    e = _number(raw.get("energy_j"), f"{where}.energy_j")
    freqs = raw.get("frequencies_mhz")
    if not isinstance(freqs, list) or not all(isinstance(row, list) for row in freqs):
        raise FrontierFormatError(f"{where}.frequencies_mhz must be a list per stage")
    for row in freqs:
        for f in row:
            if isinstance(f, bool) or not isinstance(f, int):
                raise FrontierFormatError(f"{where}.frequencies_mhz holds {f!r}, not an integer")
    try:
        true_t, true_e = evaluate_plan(profile, shape, blocking_w, freqs)
    except ValueError as exc:
        raise FrontierFormatError(f"{where}: {exc}") from None
    if abs(true_t - t) > REL_TOLERANCE * true_t or abs(true_e - e) > REL_TOLERANCE * true_e:
        raise FrontierFormatError(
            f"{where} reports {t:.6g} s / {e:.6g} J but costs {true_t:.6g} s / {true_e:.6g} J"
        )
    return Plan(t, e, tuple(tuple(row) for row in freqs))


def plot_frontier(frontier: Frontier, path: str | Path, profile_name: str) -> None:
    """Energy vs. iteration time of every plan, with the all-max-clock baseline, the plan chosen
    at T0 and T* marked; the title names the profile and the saving at T0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    times = [p.iteration_time_s for p in frontier.plans]
    energies = [p.energy_j for p in frontier.plans]
    star = frontier.t_star
    at_t0 = plan_for_no_straggler(frontier, 0.0)
    saving_pct = (1 - at_t0.energy_j / frontier.baseline_energy_j) * 100
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(times, energies, ".-", label=f"frontier ({len(times)} plans)")
    ax.plot([frontier.t0_s], [frontier.baseline_energy_j], "rx", ms=10,
            label="all GPUs at max clock (T0)")  # fmt: skip
    ax.plot([at_t0.iteration_time_s], [at_t0.energy_j], "bo", ms=7, mfc="none",
            label=f"no slowdown: {saving_pct:.2f}% less energy")  # fmt: skip
    star_pct = (1 - star.energy_j / frontier.baseline_energy_j) * 100
    slower_pct = (star.iteration_time_s / frontier.t0_s - 1) * 100
    ax.plot([star.iteration_time_s], [star.energy_j], "g*", ms=12,
            label=f"least energy (T*): {star_pct:.2f}% less, {slower_pct:+.1f}% time")  # fmt: skip
    shape = frontier.pipeline
    chunks = f" x {shape.virtual_stages} chunks" if shape.virtual_stages > 1 else ""
    ax.set_title(
        f"{profile_name}, {shape.schedule}: {shape.stages} stages{chunks} x "
        f"{shape.microbatches} microbatches\n{saving_pct:.2f}% less energy at T0 "
        f"({frontier.t0_s:.3f} s)",
        fontsize=10,
    )
    ax.set_xlabel("iteration time (s)")
    ax.set_ylabel("energy per pipeline iteration (J)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
