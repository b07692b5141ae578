"""The LP relaxation bounds every plan, its roundings and the batched filling keep every deadline,
and filling never raises the cost."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
import pytest

from perseus_operator.planner.evaluate import makespan
from perseus_operator.planner.fill import BatchFill
from perseus_operator.planner.lp import LpRelaxation, hull_prices
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


def test_lp_bounds_every_discrete_plan_and_is_infeasible_below_the_fastest(setup: Setup) -> None:
    batch, table = setup.batch, setup.table
    lp = LpRelaxation(batch.dag, table)
    assert lp.solve(0.999 * setup.t_fast_s) is None
    deadlines = setup.t_fast_s * np.array([1.0, 1.02, 1.1, 1.3])
    # Discrete plans that meet each deadline: filled from the all-fastest plan.
    base = np.zeros((batch.dag.num_nodes, len(deadlines)), dtype=np.int64)
    plans = batch.fill(base, deadlines, [0.0], backward=False)
    previous = np.inf
    for col, deadline in enumerate(deadlines):
        solution = lp.solve(float(deadline))
        assert solution is not None
        relaxed = solution.duration_s
        assert makespan(batch.dag, relaxed) <= deadline * (1 + 1e-9)
        assert float(batch.costs(plans[:, [col]])[0]) >= solution.cost_j - 1e-6
        assert solution.cost_j <= previous + 1e-9  # more time never costs more
        previous = solution.cost_j


def test_hull_prices_pick_what_the_relaxation_picked(setup: Setup) -> None:
    """At the price of its relaxed duration, a node's best hull option is that duration's
    breakpoint, or one of the two ends of the segment it lies inside."""
    batch, table = setup.batch, setup.table
    solution = LpRelaxation(batch.dag, table).solve(1.05 * setup.t_fast_s)
    assert solution is not None
    price = hull_prices(table, batch.cls, solution.duration_s[:, None])[:, 0]
    for node in range(batch.dag.num_nodes):
        c = batch.cls[node]
        hull = table.hull_indices(c)
        t, cost = table.time_s[c, hull], table.cost_j[c, hull]
        score = cost + price[node] * t
        best = t[np.isclose(score, score.min(), rtol=1e-9, atol=1e-9)]
        assert best.min() - 1e-9 <= solution.duration_s[node] <= best.max() + 1e-9


def test_priced_rounding_meets_every_deadline(setup: Setup) -> None:
    batch, table = setup.batch, setup.table
    lp = LpRelaxation(batch.dag, table)
    deadlines = setup.t_fast_s * np.array([1.0, 1.01, 1.04, 1.2])
    relaxed = []
    for deadline in deadlines:
        solution = lp.solve(float(deadline))
        assert solution is not None
        relaxed.append(solution.duration_s)
    duration = np.stack(relaxed, axis=1)
    jitter = np.exp(0.2 * np.random.default_rng(1).standard_normal(duration.shape))
    for price in (hull_prices(table, batch.cls, duration), jitter, np.zeros(duration.shape)):
        idx = batch.round_priced(duration, price, deadlines)
        assert ((idx >= 0) & (idx < table.count[batch.cls][:, None])).all()
        for col in range(len(deadlines)):
            freqs = frequencies(setup, idx[:, col])
            t, _ = reference.cost(PROFILE, MICROBATCHES, BLOCKING_W, freqs)
            assert t <= deadlines[col] * (1 + 1e-12)


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


def test_models_built_in_parallel_threads_leave_stdout_where_it_was(setup: Setup) -> None:
    """The operator plans in worker threads: building HiGHS models (the first one silenced
    through fd 1) from several threads at once must leave fd 1 pointing where it did."""
    import os
    import threading

    before = os.fstat(1)
    errors: list[BaseException] = []

    def build() -> None:
        try:
            for _ in range(3):
                assert (
                    LpRelaxation(setup.batch.dag, setup.table).solve(1.1 * setup.t_fast_s)
                    is not None
                )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    after = os.fstat(1)
    assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)


def test_batched_passes_agree_with_the_reference_cost_on_random_plans(setup: Setup) -> None:
    """The batched passes renumber nodes level by level; plans come back in node order and
    their times and energies are what the independent reference computes."""
    batch, table = setup.batch, setup.table
    rng = np.random.default_rng(11)
    idx = rng.integers(0, table.count[batch.cls][:, None], size=(batch.dag.num_nodes, 6))
    times = batch.makespans(idx)
    energies = batch.costs(idx) + BLOCKING_W * PROFILE.num_stages * times
    for col in range(idx.shape[1]):
        t, e = reference.cost(PROFILE, MICROBATCHES, BLOCKING_W, frequencies(setup, idx[:, col]))
        assert times[col] == pytest.approx(t, rel=1e-12)
        assert energies[col] == pytest.approx(e, rel=1e-12)
    # Filling and rounding hand plans back in node order: a plan already at its slowest
    # options stays exactly where it is.
    slowest = np.repeat((table.count[batch.cls] - 1)[:, None], 2, axis=1)
    deadline = batch.makespans(slowest) * 1.5
    for backward in (False, True):
        assert (batch.fill(slowest, deadline, [1.0, 0.0], backward=backward) == slowest).all()


def test_lp_optimum_equals_an_independently_built_epigraph_lp(setup: Setup) -> None:
    """The segment LP (one CSR row per edge, built vectorised) against the textbook model:
    start and duration per instruction, cost above every hull segment's line, no shared code."""
    import highspy

    highs: Any = highspy  # its stubs lag its bindings, as in `lp`
    batch, table = setup.batch, setup.table
    dag, n = batch.dag, batch.dag.num_nodes
    lp = LpRelaxation(dag, table)
    for deadline in setup.t_fast_s * np.array([1.0, 1.05, 1.2]):
        model = highs.Highs()
        model.setOptionValue("output_flag", False)
        # Columns: start x (n), duration d (n), cost z (n).
        lower = np.concatenate((np.zeros(n), np.zeros(n), np.full(n, -np.inf)))
        upper = np.full(3 * n, np.inf)
        rows: list[tuple[list[int], list[float], float, float]] = []
        for i in range(n):
            c = int(batch.cls[i])
            hull = table.hull_indices(c)
            t, cost = table.time_s[c, hull], table.cost_j[c, hull]
            lower[n + i], upper[n + i] = t[0], t[-1]
            if len(t) == 1:
                lower[2 * n + i] = upper[2 * n + i] = cost[0]
            for a in range(len(t) - 1):  # z >= cost[a] + slope * (d - t[a])
                slope = (cost[a + 1] - cost[a]) / (t[a + 1] - t[a])
                rows.append(([2 * n + i, n + i], [1.0, -slope], cost[a] - slope * t[a], np.inf))
            for p in dag.preds[i]:
                if p != n:  # x_i >= x_p + d_p
                    rows.append(([i, int(p), n + int(p)], [1.0, -1.0, -1.0], 0.0, np.inf))
            rows.append(([i, n + i], [1.0, 1.0], -np.inf, float(deadline)))
        model.addVars(3 * n, lower, upper)
        model.changeColsCost(
            n, np.arange(2 * n, 3 * n, dtype=np.int32), np.ones(n, dtype=np.float64)
        )
        for cols, vals, lo, hi in rows:
            model.addRow(lo, hi, len(cols), np.asarray(cols, dtype=np.int32), np.asarray(vals))
        model.run()
        expected = model.getInfo().objective_function_value
        solution = lp.solve(float(deadline))
        assert solution is not None
        assert solution.cost_j == pytest.approx(expected, rel=1e-7)
