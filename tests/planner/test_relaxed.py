"""The relaxation's path: solved plans meet their deadlines and bound every discrete plan, long
pipelines stretch a short copy correctly, and interpolated plans stay feasible."""

from __future__ import annotations

import numpy as np
import pytest

from perseus_operator.planner import SearchConfig, relaxed
from perseus_operator.planner.evaluate import makespan
from perseus_operator.planner.lp import LpRelaxation
from perseus_operator.planner.model import build_options, option_classes
from perseus_operator.planner.pipeline import PipelineShape, build_dag
from perseus_profiles import load_example

# Distinct stages: the real profiles' stages 0-6 are identical, 7 is not.
PROFILE = load_example("gpt3-175b-a40").select_stages((0, 3, 7))
BLOCKING_W = 70.38


def test_short_pipeline_only_for_long_ones() -> None:
    assert relaxed.short_pipeline(PipelineShape(stages=8, microbatches=24)) is None
    assert relaxed.short_pipeline(PipelineShape(stages=8, microbatches=96)) == PipelineShape(
        stages=8, microbatches=24
    )
    # A deep pipeline needs a longer copy to have a steady state at all.
    assert relaxed.short_pipeline(PipelineShape(stages=16, microbatches=96)) == PipelineShape(
        stages=16, microbatches=48
    )


def test_stretch_index_maps_fill_drain_and_steady_state() -> None:
    long, short = build_dag(PipelineShape(3, 20)), build_dag(PipelineShape(3, 8))
    index = relaxed._stretch_index(long, short)
    assert (short.stage[index] == long.stage).all()
    assert (short.kind[index] == long.kind).all()
    m, j = long.microbatch, short.microbatch[index]
    assert (j[m < 4] == m[m < 4]).all()  # fill: the same microbatch
    assert (j[m >= 16] == m[m >= 16] - 12).all()  # drain: counted from the end
    assert (j[(m >= 4) & (m < 16)] == 4).all()  # steady state: the middle one


@pytest.mark.parametrize("stretch", [False, True])
def test_path_plans_meet_their_deadlines_and_bound_discrete_plans(stretch: bool) -> None:
    config = SearchConfig(short_microbatches=6)
    shape = PipelineShape(stages=3, microbatches=14)
    dag = build_dag(shape)
    table = build_options(PROFILE, dag, BLOCKING_W)
    cls = option_classes(dag)
    t0 = makespan(dag, table.max_clock_time_s[cls])
    fastest = makespan(dag, table.time_s[cls, 0])
    slowest = makespan(dag, table.time_s[np.arange(table.num_classes), table.count - 1][cls])
    short = relaxed.short_pipeline(shape, config)
    assert short is not None
    copy = relaxed.short_copy(PROFILE, shape, BLOCKING_W, config) if stretch else None
    path = relaxed.relaxed_path(dag, table, t0, fastest, slowest, short=copy, config=config)
    assert path is not None
    assert (np.diff(path.deadline_s) >= 0).all()
    assert any(abs(t - t0) < 1e-12 for t, _ in path.near_t0)
    lp = LpRelaxation(dag, table)
    idle_w = shape.stages * BLOCKING_W
    for k, deadline in enumerate(path.deadline_s):
        duration = path.duration_s[:, k]
        assert makespan(dag, duration) <= deadline * (1 + 1e-9)
        optimum = lp.solve(float(deadline))
        assert optimum is not None
        # No relaxed plan beats the LP; a solved one matches it unless it was stretched.
        assert path.energy_j[k] >= optimum.cost_j + idle_w * deadline - 1e-6
        assert path.energy_j[k] == pytest.approx(
            table.relaxed_cost_j(cls, duration) + idle_w * deadline
        )
    if stretch:
        assert path.deadline_s.max() > t0 * (1 + config.dense_above_t0)
    between = (path.deadline_s[:-1] + path.deadline_s[1:]) / 2
    for deadline, column in zip(between, path.at(between).T, strict=True):
        assert makespan(dag, column) <= deadline * (1 + 1e-9)
