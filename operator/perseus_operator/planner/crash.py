"""Crashing along minimum cuts of the critical subgraph (after Phillips and Dessouky).

From a slow plan, repeatedly shorten every critical path at the least cost: the instructions to
speed up form a minimum vertex cut of the critical subgraph (capacity: the energy it costs to run
the instruction `step_s` faster, on its real options). Where uniform prices speed up whole
stages, a cut speeds up only what every critical path shares: the pipeline's fill and drain.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import numpy.typing as npt

from perseus_operator.planner.fill import BatchFill

__all__ = ["crash_by_cuts"]

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
        tol = 1e-9 * span
        critical = latest_start[:-1] + duration - finish[:-1] <= tol
        begin = finish[:-1] - duration
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
            link = critical & crit[parent] & (np.abs(finish[parent] - begin) <= tol)
            sources.append(parent[link])
            targets.append(np.nonzero(link)[0])
        cut = _min_vertex_cut(
            np.nonzero(critical)[0], np.concatenate(sources), np.concatenate(targets), capacity
        )
        if cut is None:
            break
        idx = idx.copy()
        idx[cut] = move[cut]
        out.append(idx)
    return out


def _min_vertex_cut(
    nodes: IntArray, tails: IntArray, heads: IntArray, capacity: FloatArray
) -> list[int] | None:
    """Minimum-capacity set of `nodes` meeting every path of the DAG given by the edges
    tails[k] -> heads[k] from a node without predecessors to one without successors
    (Edmonds-Karp on the node-split network). None if some path cannot be cut."""
    has_pred = {int(h) for h in heads}
    has_succ = {int(t) for t in tails}
    # Flow network: node i split into in (2i) and out (2i+1), plus a source and a sink.
    source, sink = -1, -2
    cap: dict[int, dict[int, float]] = {source: {}, sink: {}}

    def add(u: int, v: int, c: float) -> None:
        cap.setdefault(u, {})
        cap.setdefault(v, {})
        cap[u][v] = cap[u].get(v, 0.0) + c
        cap[v].setdefault(u, 0.0)

    inf = float("inf")
    for i in nodes.tolist():
        add(2 * i, 2 * i + 1, float(capacity[i]))
        if i not in has_pred:
            add(source, 2 * i, inf)
        if i not in has_succ:
            add(2 * i + 1, sink, inf)
    for t, h in zip(tails.tolist(), heads.tolist(), strict=True):
        add(2 * t + 1, 2 * h, inf)
    while True:
        parent = {source: source}
        queue = deque([source])
        while queue and sink not in parent:
            u = queue.popleft()
            for v, c in cap[u].items():
                if c > 1e-12 and v not in parent:
                    parent[v] = u
                    queue.append(v)
        if sink not in parent:
            break
        bottleneck = inf
        v = sink
        while v != source:
            u = parent[v]
            bottleneck = min(bottleneck, cap[u][v])
            v = u
        if bottleneck == inf:
            return None  # a critical path that nothing can shorten
        v = sink
        while v != source:
            u = parent[v]
            cap[u][v] -= bottleneck
            cap[v][u] += bottleneck
            v = u
    reach = set(parent)
    return [i for i in nodes.tolist() if 2 * i in reach and 2 * i + 1 not in reach]
