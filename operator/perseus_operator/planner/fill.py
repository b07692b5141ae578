"""Slack filling, batched: many plans ("lanes"), each with its own deadline, swept at once.

Filling slows instructions down within their float (how much later they may finish without the
iteration missing its deadline), never to a costlier option. A sweep visits the DAG one level (an
antichain) at a time, so the moves of one level never conflict; forwards, each node's earliest
start is exact and its latest finish comes from a backward pass, and backwards the other way
round. Which option a node takes follows a descending ladder of prices of time μ: at each rung a
node moves towards the option minimising ``c + μ*t`` on its lower convex hull, so float goes first
to the instructions that save most energy per second; the last rung (μ = 0) takes the cheapest
option that still fits.

Every per-level operation works on a (lanes x level width) block, so the cost of Python's loop
over levels is shared by all lanes: this is what makes a dense frontier fast. Inside the passes,
nodes are renumbered level by level, so that a level's rows are one contiguous slice (a view)
rather than a gather; plans come in and go out in the DAG's node order.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from perseus_operator.planner.model import OptionTable, option_classes
from perseus_operator.planner.pipeline import PipelineDag

__all__ = ["BatchFill"]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
PAD_S = 1e30  # padded options never fit any float and are never cheapest


class BatchFill:
    """Batched passes over one DAG and option table. Plans are option indices per node into the
    class tables (class = 2*stage + kind; options sorted fastest first, each cheaper than the one
    before), laid out nodes x lanes: gathering a level's predecessors then reads whole rows."""

    def __init__(self, dag: PipelineDag, table: OptionTable) -> None:
        self.dag = dag
        self.cls = option_classes(dag)
        self.time = np.where(np.isfinite(table.time_s), table.time_s, PAD_S)
        self.cost = np.where(np.isfinite(table.cost_j), table.cost_j, PAD_S)
        classes, width = self.time.shape
        hull = np.zeros((classes, width), dtype=bool)
        for c in range(classes):
            hull[c, table.hull_indices(c)] = True
        # next_hull[c, k]: first hull option at or after k (width if none);
        # prev_hull[c, k]: last hull option at or before k (-1 if none).
        self.next_hull = np.full((classes, width + 1), width, dtype=np.int64)
        self.prev_hull = np.full((classes, width), -1, dtype=np.int64)
        for c in range(classes):
            nxt, prv = width, -1
            for k in range(width - 1, -1, -1):
                nxt = k if hull[c, k] else nxt
                self.next_hull[c, k] = nxt
            for k in range(width):
                prv = k if hull[c, k] else prv
                self.prev_hull[c, k] = prv
        self.hull = hull
        self.level_cls = tuple(self.cls[lv] for lv in dag.levels)
        # All classes' option times in one sorted array (class c's block starts at c * span), so
        # one searchsorted finds, for every node at once, the slowest option that fits its float.
        self.count = table.count
        self.max_time_s = float(table.time_s[np.isfinite(table.time_s)].max())
        self.span = 2.0 * self.max_time_s + 1.0
        self.block_start = np.concatenate(([0], np.cumsum(table.count)[:-1]))
        self.keys = np.concatenate(
            [c * self.span + table.time_s[c, : table.count[c]] for c in range(classes)]
        )
        # Per level, precomputed once: its classes as a column, their offset into the flat option
        # tables and into `keys` (the per-level loops run tens of thousands of times).
        self.width = width
        self.flat_time = self.time.ravel()
        self.flat_next_hull = self.next_hull.ravel()
        self.flat_prev_hull = self.prev_hull.ravel()
        self.level_col = tuple(c[:, None] for c in self.level_cls)
        self.level_row = tuple(c[:, None] * width for c in self.level_cls)
        self.level_key = tuple(c[:, None] * self.span for c in self.level_cls)
        self.level_block = tuple(self.block_start[c][:, None] for c in self.level_cls)
        self.node_row = self.cls[:, None] * width
        # Level-major positions: level k's nodes sit at rows level_rows[k] of every array the
        # passes work on; `position[node]` (the sentinel maps to itself) and `by_position`.
        n = dag.num_nodes
        self.by_position = np.concatenate(dag.levels)
        self.position = np.empty(n + 1, dtype=np.int64)
        self.position[self.by_position] = np.arange(n)
        self.position[n] = n
        ends = np.cumsum([len(lv) for lv in dag.levels])
        self.level_rows = tuple(
            slice(int(end) - len(lv), int(end)) for lv, end in zip(dag.levels, ends, strict=True)
        )
        self.level_pred_rows = tuple(
            (self.position[a], self.position[b]) for a, b in dag.level_preds
        )
        self.level_succ_rows = tuple(
            (self.position[a], self.position[b]) for a, b in dag.level_succs
        )
        self.row_offset = self.node_row[self.by_position]  # node_row, level-major

    def best_on_hull(self, price: float) -> IntArray:
        """Per class, the hull option minimising ``c + price*t``."""
        score = np.where(self.hull, self.cost + price * self.time, np.inf)
        out: IntArray = np.argmin(score, axis=1)
        return out

    def durations(self, idx: IntArray) -> FloatArray:
        out: FloatArray = self.flat_time[self.node_row + idx]
        return out

    def makespans(self, idx: IntArray) -> FloatArray:
        # Durations first, then reordered: no index array lives beside them (large pipelines).
        finish = self._forward_rows(self._to_rows(self.durations(idx)))
        out: FloatArray = finish[:-1].max(axis=0)
        return out

    def costs(self, idx: IntArray) -> FloatArray:
        out: FloatArray = self.cost[self.cls[:, None], idx].sum(axis=0)
        return out

    def _to_rows(self, per_node: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """A nodes x lanes array in level-major row order."""
        return per_node[self.by_position]

    def _to_nodes(self, rows: IntArray) -> IntArray:
        """A level-major nodes x lanes array back in node order."""
        out: IntArray = rows[self.position[:-1]]
        return out

    def _forward_rows(self, duration_s: FloatArray) -> FloatArray:
        """Earliest finish times from level-major durations, (rows + sentinel) x lanes."""
        finish = np.zeros((self.dag.num_nodes + 1, duration_s.shape[1]))
        for rows, (p0, p1) in zip(self.level_rows, self.level_pred_rows, strict=True):
            finish[rows] = np.maximum(finish[p0], finish[p1]) + duration_s[rows]
        return finish

    def _backward_rows(self, duration_s: FloatArray, deadline_s: FloatArray) -> FloatArray:
        """Latest start times from level-major durations, (rows + sentinel = the deadline) x
        lanes."""
        latest_start = np.empty((self.dag.num_nodes + 1, duration_s.shape[1]))
        latest_start[-1] = deadline_s
        for rows, (s0, s1) in zip(
            reversed(self.level_rows), reversed(self.level_succ_rows), strict=True
        ):
            latest_start[rows] = np.minimum(latest_start[s0], latest_start[s1]) - duration_s[rows]
        return latest_start

    def _choose(
        self, k: int, current: IntArray, avail_s: FloatArray, target: IntArray | None
    ) -> IntArray:
        """The option each node of level k (rows) takes in each lane (columns), given the time it
        may use."""
        row = self.level_row[k]
        query = self.level_key[k] + np.minimum(np.maximum(avail_s, -0.5), self.max_time_s)
        hi = self.keys.searchsorted(query, side="right") - 1 - self.level_block[k]
        # Guard the last ulp of the offset keys against the true times.
        hi -= (hi >= 0) & (self.flat_time[row + np.maximum(hi, 0)] > avail_s)
        hi = np.maximum(hi, current)
        if target is None:
            out_hi: IntArray = hi
            return out_hi
        lo = self.flat_next_hull[row + row // self.width + current]
        top = self.flat_prev_hull[row + hi]
        moved = np.minimum(np.maximum(target[self.level_col[k]], lo), np.maximum(top, lo))
        out: IntArray = np.where(lo <= top, np.maximum(moved, current), current)
        return out

    def round_priced(
        self, duration_s: FloatArray, price: FloatArray, deadline_s: FloatArray
    ) -> IntArray:
        """Discrete plans (nodes x lanes) from relaxed durations and per-node prices of time.

        In topological order, each node may finish as late as the relaxed plan lets it (its
        latest finish under `duration_s` and the lane's deadline), from wherever its
        predecessors really finished. Among the options that fit, it takes the one minimising
        ``c + price*t``, the slower one on a tie: a node the relaxation left between two hull
        points goes up whenever the time its predecessors saved allows it, and down otherwise,
        passing on what it saved. Every lane meets its deadline: no node ever finishes later than
        its latest finish, and its relaxed duration always fits."""
        lanes = duration_s.shape[1]
        duration_s, price = self._to_rows(duration_s), self._to_rows(price)
        latest_finish = self._backward_rows(duration_s, deadline_s)[:-1] + duration_s
        idx = np.zeros((self.dag.num_nodes, lanes), dtype=np.int64)
        finish = np.zeros((self.dag.num_nodes + 1, lanes))
        slack = 1e-12 * float(np.max(deadline_s))
        for k, (rows, (p0, p1)) in enumerate(
            zip(self.level_rows, self.level_pred_rows, strict=True)
        ):
            start = np.maximum(finish[p0], finish[p1])
            avail = latest_finish[rows] - start + slack  # (width, lanes)
            # Options are sorted fastest first: those slower than any node's float never fit.
            times = self.time[self.level_cls[k]]
            fits = int((times <= avail.max()).sum(axis=1).max())
            times = times[:, None, :fits]  # (width, 1, options)
            score = np.where(
                times <= avail[:, :, None],
                self.cost[self.level_cls[k]][:, None, :fits] + price[rows][:, :, None] * times,
                np.inf,
            )
            best = score.min(axis=2, keepdims=True)
            tied = score <= best + 1e-9 * np.abs(best) + 1e-12
            chosen = fits - 1 - np.argmax(tied[:, :, ::-1], axis=2)
            idx[rows] = chosen
            finish[rows] = start + self.flat_time[self.level_row[k] + chosen]
        del finish, latest_finish, duration_s, price  # before the reordered copy (memory)
        return self._to_nodes(idx)

    def fill(
        self, idx: IntArray, deadline_s: FloatArray, prices: list[float], *, backward: bool
    ) -> IntArray:
        """Fill every lane's float up to its deadline along the price ladder (see module doc)."""
        idx = self._to_rows(idx)  # a copy, level-major
        n = self.dag.num_nodes
        for price in prices:
            target = self.best_on_hull(price) if price > 0 else None
            duration = self.flat_time[self.row_offset + idx]
            if not backward:
                latest_start = self._backward_rows(duration, deadline_s)
                finish = np.zeros((n + 1, idx.shape[1]))
                for k, (rows, (p0, p1)) in enumerate(
                    zip(self.level_rows, self.level_pred_rows, strict=True)
                ):
                    start = np.maximum(finish[p0], finish[p1])
                    avail = latest_start[rows] + duration[rows] - start
                    chosen = self._choose(k, idx[rows], avail, target)
                    idx[rows] = chosen
                    finish[rows] = start + self.flat_time[self.level_row[k] + chosen]
            else:
                finish = self._forward_rows(duration)
                latest_start = np.empty((n + 1, idx.shape[1]))
                latest_start[-1] = deadline_s
                for k in range(len(self.level_rows) - 1, -1, -1):
                    rows = self.level_rows[k]
                    s0, s1 = self.level_succ_rows[k]
                    latest_finish = np.minimum(latest_start[s0], latest_start[s1])
                    avail = latest_finish - (finish[rows] - duration[rows])
                    chosen = self._choose(k, idx[rows], avail, target)
                    idx[rows] = chosen
                    latest_start[rows] = latest_finish - self.flat_time[self.level_row[k] + chosen]
            del duration, finish, latest_start  # before the next rung's, or the reordered copy
        return self._to_nodes(idx)
