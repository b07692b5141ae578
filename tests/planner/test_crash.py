"""Crashing along minimum cuts: the cut is minimal, and every crashed plan is faster and exact."""

from __future__ import annotations

import numpy as np
import pytest

from perseus_operator.planner.crash import _min_vertex_cut, crash_by_cuts
from perseus_operator.planner.fill import BatchFill
from perseus_operator.planner.model import build_options
from perseus_operator.planner.pipeline import PipelineShape, build_dag
from perseus_profiles import load_example


def test_min_vertex_cut_prefers_the_shared_node() -> None:
    # Diamond 0 -> {1, 2} -> 3 plus a tail 3 -> 4: cutting 1 and 2 costs 2 + 2, node 0 costs 5,
    # node 3 costs 3 and node 4 costs 7: the cheapest cut is {3}.
    nodes = np.arange(5)
    tails = np.array([0, 0, 1, 2, 3])
    heads = np.array([1, 2, 3, 3, 4])
    capacity = np.array([5.0, 2.0, 2.0, 3.0, 7.0])
    cut = _min_vertex_cut(nodes, tails, heads, capacity)
    assert cut is not None
    assert sorted(cut.tolist()) == [3]
    capacity[3] = 4.5  # now 1 and 2 together (4) are cheaper
    cut = _min_vertex_cut(nodes, tails, heads, capacity)
    assert cut is not None
    assert sorted(cut.tolist()) == [1, 2]
    capacity[:] = np.inf  # nothing can be shortened
    assert _min_vertex_cut(nodes, tails, heads, capacity) is None


def test_crashed_plans_get_faster_and_costlier() -> None:
    profile = load_example("gpt3-175b-a100").select_stages((0, 2, 7))
    dag = build_dag(PipelineShape(stages=3, microbatches=4))
    table = build_options(profile, dag, 83.64)
    batch = BatchFill(dag, table)
    cheapest = (table.count[batch.cls] - 1).astype(np.int64)
    fastest = np.zeros(dag.num_nodes, dtype=np.int64)
    t_fast = float(batch.makespans(fastest[:, None])[0])
    t_slow = float(batch.makespans(cheapest[:, None])[0])
    plans = crash_by_cuts(batch, cheapest, t_fast, 0.002 * t_slow, 1000)
    assert len(plans) > 5
    times = batch.makespans(np.stack(plans, axis=1))
    costs = batch.costs(np.stack(plans, axis=1))
    assert times[0] < t_slow
    assert times[-1] <= t_fast * (1 + 1e-9) or len(plans) == 1000
    assert (np.diff(times) <= 1e-12).all()
    assert costs.min() >= float(batch.costs(cheapest[:, None])[0]) - 1e-9
    assert times[-1] == pytest.approx(t_fast, rel=0.01)


def test_near_critical_cuts_cross_the_frontier_in_about_one_round_per_step() -> None:
    """8 x 24 on a real profile has many almost-tied critical paths; cutting only the exactly
    critical ones used 600 rounds to cover a third of the way to the fastest plan."""
    profile = load_example("gpt3-175b-a100")
    dag = build_dag(PipelineShape(stages=8, microbatches=24))
    table = build_options(profile, dag, 83.64)
    batch = BatchFill(dag, table)
    cheapest = (table.count[batch.cls] - 1).astype(np.int64)
    fastest = np.zeros(dag.num_nodes, dtype=np.int64)
    t_fast = float(batch.makespans(fastest[:, None])[0])
    t_slow = float(batch.makespans(cheapest[:, None])[0])
    step = (t_slow - t_fast) / 100
    plans = crash_by_cuts(batch, cheapest, t_fast, step, 300)
    times = batch.makespans(np.stack(plans, axis=1))
    assert times[-1] <= t_fast * 1.01
