"""The LP rounding and the batched filling keep every deadline and never raise the cost."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import numpy.typing as npt
import pytest

from perseus_operator.planner.fill import BatchFill
from perseus_operator.planner.lp import lp_finish_times
from perseus_operator.planner.model import OptionTable, build_options
from perseus_operator.planner.pipeline import PipelineShape, build_dag
from perseus_profiles import load_example
from tests.planner import reference

# Distinct stages: the real profiles' stages 0-6 are identical, 7 is not.
PROFILE = load_example("bloom-176b-a40").select_stages((0, 3, 7))
BLOCKING_W = 70.38
MICROBATCHES = 5


class Setup(NamedTuple):
    batch: BatchFill
    table: OptionTable
    t_fast_s: float


@pytest.fixture(scope="module")
def setup() -> Setup:
    dag = build_dag(PipelineShape(stages=3, microbatches=MICROBATCHES))
    table = build_options(PROFILE, dag, BLOCKING_W)
    batch = BatchFill(dag, table)
    fastest = np.zeros((dag.num_nodes, 1), dtype=np.int64)
    return Setup(batch, table, float(batch.makespans(fastest)[0]))


def frequencies(s: Setup, column: npt.NDArray[np.int64]) -> list[list[int]]:
    freqs = s.table.frequency_mhz[s.batch.cls, column]
    return [[int(f) for f in row] for row in np.split(freqs, s.batch.dag.offsets[1:-1])]


def test_lp_rounding_meets_the_deadline(setup: Setup) -> None:
    deadline = 1.02 * setup.t_fast_s
    finish = lp_finish_times(setup.batch.dag, setup.table, deadline)
    assert finish is not None
    assert finish.max() <= deadline * (1 + 1e-9)
    idx = setup.batch.round_under(finish)
    # Every instruction finishes no later than in the LP solution, so the plan meets the deadline.
    done = setup.batch.forward(setup.batch.durations(idx))[:-1, 0]
    assert (done <= finish + 1e-9).all()
    t, _ = reference.cost(PROFILE, MICROBATCHES, BLOCKING_W, frequencies(setup, idx[:, 0]))
    assert t <= deadline * (1 + 1e-12)


@pytest.mark.parametrize("backward", [False, True])
@pytest.mark.parametrize("prices", [[0.0], [500.0, 100.0, 0.0]])
def test_fill_never_misses_a_deadline_nor_costs_more(
    setup: Setup, backward: bool, prices: list[float]
) -> None:
    batch = setup.batch
    base = np.zeros((batch.dag.num_nodes, 6), dtype=np.int64)
    deadlines = setup.t_fast_s * np.array([1.0, 1.01, 1.05, 1.1, 1.3, 2.0])
    idx = batch.fill(base, deadlines, prices, backward=backward)
    assert (batch.costs(idx) <= batch.costs(base) + 1e-9).all()
    assert (batch.costs(idx[:, 1:]) < batch.costs(base[:, 1:])).all()  # float was used
    for col in range(6):
        t, _ = reference.cost(PROFILE, MICROBATCHES, BLOCKING_W, frequencies(setup, idx[:, col]))
        assert t == pytest.approx(float(batch.makespans(idx[:, [col]])[0]))
        assert t <= deadlines[col] * (1 + 1e-12)
