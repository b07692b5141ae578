"""The LP relaxation at one deadline, and a discrete plan rounded from it.

Relaxing each instruction to any duration between its fastest and slowest option, with effective
cost on the lower convex hull of its (t, c) points, turns the least-energy plan for a deadline
into an LP (project crashing). Its optimum distributes time along the DAG the way the
critical-path flows price it, which greedy filling only approximates; rounding it is how the
planner gets close to the bound at the deadline that matters most, T0 (no slowdown).

scipy's HiGHS solves it; scipy is imported here only, when the planner asks for the LP.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from perseus_operator.planner.model import OptionTable
from perseus_operator.planner.pipeline import PipelineDag

__all__ = ["lp_finish_times"]

FloatArray = npt.NDArray[np.float64]


def lp_finish_times(
    dag: PipelineDag, table: OptionTable, deadline_s: float, time_limit_s: float = 10.0
) -> FloatArray | None:
    """Each instruction's finish time in an optimal LP solution, or None if HiGHS fails or runs
    out of time (it grows superlinearly: 0.4 s for 1,536 instructions, minutes for 16,384)."""
    from scipy.optimize import linprog
    from scipy.sparse import coo_matrix

    n = dag.num_nodes
    cls = 2 * dag.stage + dag.kind
    hulls = [table.hull_indices(c) for c in range(table.num_classes)]
    # Variables: start x (0..n), duration d (n..2n), effective cost z (2n..3n).
    rows: list[npt.NDArray[np.int64]] = []
    cols: list[npt.NDArray[np.int64]] = []
    vals: list[FloatArray] = []
    rhs: list[FloatArray] = []
    n_rows = 0

    def block(entries: list[tuple[npt.NDArray[np.int64], FloatArray]], bound: FloatArray) -> None:
        nonlocal n_rows
        r = np.arange(n_rows, n_rows + len(bound))
        for col, val in entries:
            rows.append(r)
            cols.append(col)
            vals.append(np.broadcast_to(val, r.shape).astype(np.float64))
        rhs.append(bound)
        n_rows += len(bound)

    for k in range(2):
        child = np.arange(n)
        parent = dag.preds[:, k]
        has = parent != n
        child, parent = child[has], parent[has]
        one = np.ones(len(child))
        block([(parent, one), (n + parent, one), (child, -one)], np.zeros(len(child)))
    sinks = np.nonzero((dag.succs == n).all(axis=1))[0]
    block([(sinks, np.ones(len(sinks))), (n + sinks, np.ones(len(sinks)))],
          np.full(len(sinks), deadline_s))  # fmt: skip
    lower = np.empty(n)
    upper = np.empty(n)
    for c, hull in enumerate(hulls):
        nodes = np.nonzero(cls == c)[0]
        t, cost = table.time_s[c, hull], table.cost_j[c, hull]
        lower[nodes], upper[nodes] = t[0], t[-1]
        for a in range(len(hull) - 1):
            slope = (cost[a + 1] - cost[a]) / (t[a + 1] - t[a])
            block([(n + nodes, np.full(len(nodes), slope)), (2 * n + nodes, -np.ones(len(nodes)))],
                  np.full(len(nodes), slope * t[a] - cost[a]))  # fmt: skip
        if len(hull) == 1:
            block([(2 * n + nodes, -np.ones(len(nodes)))], np.full(len(nodes), -cost[0]))
    matrix = coo_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n_rows, 3 * n)
    ).tocsr()
    bounds = np.column_stack(
        [
            np.r_[np.zeros(n), lower, np.full(n, -np.inf)],
            np.r_[np.full(n, np.inf), upper, np.full(n, np.inf)],
        ]
    )
    objective = np.r_[np.zeros(2 * n), np.ones(n)]
    result = linprog(
        objective, A_ub=matrix, b_ub=np.concatenate(rhs), bounds=bounds, method="highs"
    )
    if result.status != 0:
        return None
    finish: FloatArray = result.x[:n] + result.x[n : 2 * n]
    return finish
