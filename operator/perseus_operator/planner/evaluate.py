"""Exact cost of a plan under the profile: the longest path through the pipeline DAG and the energy
of DESIGN.md (profiled instruction energies plus blocking power for each GPU's idle time).

`forward_pass` / `backward_pass` are the level-by-level longest-path sweeps the frontier search
reuses; `evaluate_plan` and `stage_spans` are the public checks of any frequency plan.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from perseus_operator.planner.model import check_profile_shape
from perseus_operator.planner.pipeline import PipelineDag, PipelineShape, build_dag
from perseus_profiles import INSTRUCTIONS, ProfileError, StageProfile

__all__ = [
    "backward_pass",
    "dag_cost",
    "evaluate_plan",
    "forward_pass",
    "makespan",
    "plan_durations",
    "stage_spans",
]

FloatArray = npt.NDArray[np.float64]


def forward_pass(dag: PipelineDag, duration_s: FloatArray) -> FloatArray:
    """Earliest finish time of every node (plus a trailing 0 for the sentinel)."""
    finish = np.zeros(dag.num_nodes + 1)
    for lv, (p0, p1) in zip(dag.levels, dag.level_preds, strict=True):
        finish[lv] = np.maximum(finish[p0], finish[p1]) + duration_s[lv]
    return finish


def makespan(dag: PipelineDag, duration_s: FloatArray) -> float:
    """The iteration time: the longest path through the DAG under these durations."""
    return float(forward_pass(dag, duration_s)[:-1].max())


def backward_pass(dag: PipelineDag, duration_s: FloatArray, deadline_s: float) -> FloatArray:
    """Latest finish time of every node such that the iteration ends by `deadline_s`."""
    latest_start = np.empty(dag.num_nodes + 1)
    latest_start[-1] = deadline_s
    latest_finish = np.empty(dag.num_nodes)
    for lv, (s0, s1) in zip(reversed(dag.levels), reversed(dag.level_succs), strict=True):
        lf = np.minimum(latest_start[s0], latest_start[s1])
        latest_finish[lv] = lf
        latest_start[lv] = lf - duration_s[lv]
    return latest_finish


def plan_durations(
    profile: StageProfile,
    dag: PipelineDag,
    frequencies_mhz: Sequence[Sequence[int]],
) -> tuple[FloatArray, FloatArray]:
    """Per-node profiled (time, energy) of a plan given as `frequencies_mhz[stage][position]`."""
    shape = dag.shape
    check_profile_shape(profile, shape)
    if len(frequencies_mhz) != shape.stages:
        raise ValueError(f"plan has {len(frequencies_mhz)} stages, pipeline has {shape.stages}")
    lookup = [
        [{m.frequency_mhz: m for m in per_kind[k]} for k in range(len(INSTRUCTIONS))]
        for per_kind in profile.options
    ]
    unit = dag.unit
    time_s = np.empty(dag.num_nodes)
    energy_j = np.empty(dag.num_nodes)
    for s, row in enumerate(frequencies_mhz):
        if len(row) != len(dag.order[s]):
            raise ValueError(
                f"plan stage {s} has {len(row)} frequencies, its order has {len(dag.order[s])}"
            )
        base = int(dag.offsets[s])
        for pos, freq in enumerate(row):
            i = base + pos
            kind = int(dag.kind[i])
            m = lookup[int(unit[i])][kind].get(freq) if isinstance(freq, int) else None
            if m is None:
                raise ProfileError(
                    f"plan stage {s} {dag.order[s][pos]}: {freq!r} MHz is not a profiled "
                    f"{INSTRUCTIONS[kind]} frequency"
                )
            time_s[i], energy_j[i] = m.time_s, m.energy_j
    return time_s, energy_j


def evaluate_plan(
    profile: StageProfile,
    pipeline: PipelineShape,
    blocking_power_w: float,
    frequencies_mhz: Sequence[Sequence[int]],
) -> tuple[float, float]:
    """(iteration_time_s, energy_j) that the plan really costs under the profile.

    >>> from perseus_profiles import load_example
    >>> from perseus_operator.planner.pipeline import instruction_order
    >>> prof = load_example("gpt3-175b-a100").select_stages((0, 7))
    >>> shape = PipelineShape(stages=2, microbatches=2)
    >>> plan = [[1410] * len(seq) for seq in instruction_order(shape)]
    >>> t, e = evaluate_plan(prof, shape, 83.64, plan)
    >>> round(t, 4), round(e, 1)
    (0.4489, 304.9)
    """
    dag = build_dag(pipeline)
    time_s, energy_j = plan_durations(profile, dag, frequencies_mhz)
    return dag_cost(dag, time_s, energy_j, blocking_power_w)


def dag_cost(
    dag: PipelineDag, time_s: FloatArray, energy_j: FloatArray, blocking_power_w: float
) -> tuple[float, float]:
    """(makespan, energy) from per-node profiled times and energies."""
    iteration_s = makespan(dag, time_s)
    idle = dag.shape.stages * iteration_s - float(time_s.sum())
    return iteration_s, float(energy_j.sum()) + blocking_power_w * idle


def stage_spans(
    profile: StageProfile,
    pipeline: PipelineShape,
    frequencies_mhz: Sequence[Sequence[int]],
) -> tuple[tuple[float, float], ...]:
    """Predicted (start_s, end_s) of each stage's compute in one iteration: when its first
    instruction starts and its last one ends, as the operator compares with measured spans."""
    dag = build_dag(pipeline)
    time_s, _ = plan_durations(profile, dag, frequencies_mhz)
    finish = forward_pass(dag, time_s)
    first = dag.offsets[:-1]
    last = dag.last_of_stage
    return tuple(
        (float(finish[f] - time_s[f]), float(finish[la])) for f, la in zip(first, last, strict=True)
    )
