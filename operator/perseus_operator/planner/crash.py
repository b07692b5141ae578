"""Crashing along minimum cuts of the critical subgraph (after Phillips and Dessouky).

From a slow plan, repeatedly shorten every critical path at the least cost: the instructions to
speed up form a minimum vertex cut of the critical subgraph (capacity: the energy it costs to run
the instruction `step_s` faster, on its real options). Where uniform prices speed up whole
stages, a cut speeds up only what every critical path shares: the pipeline's fill and drain.
"Critical" means within `step_s` of the longest path: a pipeline's paths are almost tied, and
cutting only the exactly critical ones shortens the iteration by a sliver per round.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from perseus_operator.planner.fill import BatchFill

__all__ = ["crash_by_cuts"]

CAPACITY_UNIT_J = 1e-4  # cut capacities are integers in this unit
_INF_CAP = 2**30
NEAR_CRITICAL = 1.0  # paths this many steps shorter than the longest are cut too

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]


def crash_by_cuts(
    batch: BatchFill, start: IntArray, stop_s: float, step_s: float, max_rounds: int
) -> list[IntArray]:
    """Plans from `start` down to `stop_s` (or until no cut can be sped up), one per cut."""
    dag = batch.dag
    n = dag.num_nodes
    idx = start.copy()
    out: list[IntArray] = []
    for _ in range(max_rounds):
        duration = batch.durations(idx[:, None])[:, 0]
        finish = batch.forward(duration[:, None])[:, 0]
        span = float(finish[:-1].max())
        if span <= stop_s:
            break
        latest_start = batch.backward(duration[:, None], np.asarray([span]))[:, 0]
        # Near-critical: every path within `step_s` of the longest one is cut at once, so each
        # round shortens the iteration by about `step_s` (with exact criticality, the many
        # almost-tied paths of a pipeline each take a round of their own).
        tol = 1e-9 * span + NEAR_CRITICAL * step_s
        critical = latest_start[:-1] + duration - finish[:-1] <= tol
        # Moves: the slowest option at least step_s faster (else the fastest), and its cost.
        cls = batch.cls
        times = batch.time[cls]  # n x K
        costs = batch.cost[cls]
        want = duration - step_s
        faster = np.where(times <= want[:, None] + 1e-15, np.arange(times.shape[1])[None, :], -1)
        move = faster.max(axis=1)
        move = np.where((move < 0) & (idx > 0), 0, move)
        move = np.where(idx > 0, np.minimum(move, idx - 1), -1)
        gain = np.where(move >= 0, duration - times[np.arange(n), np.maximum(move, 0)], 0.0)
        extra = np.where(
            move >= 0, costs[np.arange(n), np.maximum(move, 0)] - costs[np.arange(n), idx], np.inf
        )
        capacity = np.where(move >= 0, extra / np.maximum(gain, 1e-12) * step_s, np.inf)
        crit = np.append(critical, False)
        sources, targets = [], []
        for k in range(2):
            parent = dag.preds[:, k]
            link = critical & crit[parent] & (latest_start[:-1] - finish[parent] <= tol)
            sources.append(parent[link])
            targets.append(np.nonzero(link)[0])
        cut = _min_vertex_cut(
            np.nonzero(critical)[0], np.concatenate(sources), np.concatenate(targets), capacity
        )
        if cut is None or len(cut) == 0:
            break
        idx = idx.copy()
        idx[cut] = move[cut]
        out.append(idx)
    return out


def _min_vertex_cut(
    nodes: IntArray, tails: IntArray, heads: IntArray, capacity: FloatArray
) -> IntArray | None:
    """Minimum-capacity set of `nodes` meeting every path of the DAG given by the edges
    tails[k] -> heads[k] from a node without predecessors to one without successors. Max-flow
    (scipy's Dinic, integer capacities in units of CAPACITY_UNIT_J) on the node-split network,
    then the source side of the residual graph. None if some path cannot be cut."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import breadth_first_order, maximum_flow

    m = len(nodes)
    local = np.full(int(nodes.max()) + 1 if m else 1, -1, dtype=np.int64)
    local[nodes] = np.arange(m)
    t, h = local[tails], local[heads]
    source, sink = 2 * m, 2 * m + 1
    starts = np.setdiff1d(np.arange(m), h)
    ends = np.setdiff1d(np.arange(m), t)
    node_cap = capacity[nodes] / CAPACITY_UNIT_J
    finite = np.isfinite(node_cap)
    node_cap = np.where(finite, np.minimum(np.ceil(node_cap), _INF_CAP // 4), _INF_CAP)
    rows = np.concatenate([2 * np.arange(m), 2 * t + 1, np.full(len(starts), source), 2 * ends + 1])
    cols = np.concatenate([2 * np.arange(m) + 1, 2 * h, 2 * starts, np.full(len(ends), sink)])
    caps = np.concatenate([node_cap, np.full(len(t) + len(starts) + len(ends), _INF_CAP)]).astype(
        np.int32
    )
    graph = coo_matrix((caps, (rows, cols)), shape=(2 * m + 2, 2 * m + 2)).tocsr()
    flow = maximum_flow(graph, source, sink)
    if flow.flow_value >= _INF_CAP:
        return None  # a critical path that nothing can shorten
    residual = (graph - flow.flow).tocsr()
    residual.data = (residual.data > 0).astype(np.int8)
    residual.eliminate_zeros()
    reach = np.zeros(2 * m + 2, dtype=bool)
    reach[breadth_first_order(residual, source, directed=True, return_predecessors=False)] = True
    out: IntArray = nodes[reach[0::2][:m] & ~reach[1::2][:m]]
    return out
