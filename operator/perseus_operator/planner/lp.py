"""The LP relaxation, solved along the deadline axis, and the per-instruction prices it implies.

Relaxing each instruction to any duration between its fastest and slowest option, with effective
cost on the lower convex hull of its (t, c) points, turns the least-energy plan for a deadline
into an LP (project crashing). Its optimum shares the float of the DAG the way its critical-path
flows price it, which no greedy filling matches; rounding it is how the planner gets close to
the bound.

Formulation (one column per hull segment, so the model stays small): an instruction's duration
is its fastest time plus the lengths y_k it uses of its hull segments, each costing the segment's
slope per second (convexity makes the cheaper segments fill first); start times x carry the
precedence rows ``x_child - x_parent - sum(y_parent) >= t_fast(parent)`` and the deadline rows
``x_last + sum(y_last) <= D - t_fast(last)``. A deadline change only moves those right-hand
sides, so HiGHS re-solves from the previous basis (dual simplex) in a few pivots: the planner
sweeps the deadline axis instead of solving from scratch.

HiGHS comes from `highspy` (its import costs about 50 ms, against 400 ms for scipy.optimize).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from perseus_operator.planner.model import OptionTable, option_classes
from perseus_operator.planner.pipeline import PipelineDag

__all__ = ["Fractional", "LpRelaxation", "LpSolution", "fractional_segments", "hull_prices"]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


class LpSolution(NamedTuple):
    duration_s: FloatArray
    """Each instruction's relaxed duration."""
    cost_j: float
    """The relaxed plan's summed effective cost: its energy is this plus idle power times the
    deadline, a lower bound on every discrete plan that meets the deadline."""
    pivots: int = 0
    """Simplex iterations this solve took (from the basis it started from)."""


class LpRelaxation:
    """The relaxation of one DAG and option table, built once and re-solved per deadline."""

    def __init__(self, dag: PipelineDag, table: OptionTable) -> None:
        import highspy

        self._highspy = highspy
        n = dag.num_nodes
        cls = option_classes(dag)
        self.num_nodes = n
        segments = [_hull_segments(table, c) for c in range(table.num_classes)]
        self.fastest_s: FloatArray = np.asarray([segments[c][0] for c in cls])
        self.fastest_cost_j = float(table.cost_j[cls, 0].sum())
        per_node = np.asarray([len(segments[c][1]) for c in cls], dtype=np.int64)
        # Node i's segment columns are n + first[i] ... n + first[i+1] - 1.
        self.first = np.concatenate(([0], np.cumsum(per_node))).astype(np.int64)
        num_cols = n + int(self.first[-1])
        cost = np.zeros(num_cols)
        upper = np.full(num_cols, np.inf)
        for c, (_, length_s, slope) in enumerate(segments):
            nodes = np.nonzero(cls == c)[0]
            for k in range(len(length_s)):
                col = n + self.first[nodes] + k
                cost[col], upper[col] = slope[k], length_s[k]
        # highspy's stubs lag its bindings (no changeRowsBounds): the model is used untyped.
        model: Any = _new_model(highspy)
        self.upper: FloatArray = upper  # each column's length (nodes' start times: no bound)
        model.addVars(num_cols, np.zeros(num_cols), upper)
        model.changeColsCost(num_cols, np.arange(num_cols, dtype=np.int32), cost)
        parents, children = [], []
        for k in range(2):
            has = dag.preds[:, k] != n
            parents.append(dag.preds[has, k])
            children.append(np.nonzero(has)[0])
        parent, child = np.concatenate(parents), np.concatenate(children)
        self.sinks: IntArray = np.nonzero((dag.succs == n).all(axis=1))[0]
        # Row r reads [child, parent, parent's segments...] (precedence) or [sink, its
        # segments...] (deadline): built as one CSR matrix.
        owner = np.concatenate((parent, self.sinks))  # the node whose segments the row reads
        segs = self.first[owner + 1] - self.first[owner]
        heads = np.concatenate((np.full(len(parent), 2), np.ones(len(self.sinks), dtype=np.int64)))
        lengths = heads + segs
        starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
        index = np.empty(int(lengths.sum()), dtype=np.int64)
        value = np.empty(len(index))
        index[starts[: len(parent)]], value[starts[: len(parent)]] = child, 1.0
        index[starts[: len(parent)] + 1], value[starts[: len(parent)] + 1] = parent, -1.0
        index[starts[len(parent) :]], value[starts[len(parent) :]] = self.sinks, 1.0
        # Segment entries: for row r, k = 0 .. segs[r]-1 at starts[r] + heads[r] + k.
        row_of = np.repeat(np.arange(len(owner)), segs)
        nth = np.arange(len(row_of)) - np.repeat(np.cumsum(segs) - segs, segs)
        at = starts[row_of] + heads[row_of] + nth
        index[at] = n + self.first[owner[row_of]] + nth
        value[at] = np.where(row_of < len(parent), -1.0, 1.0)
        lower = np.concatenate((self.fastest_s[parent], np.full(len(self.sinks), -np.inf)))
        upper_row = np.concatenate((np.full(len(parent), np.inf), np.zeros(len(self.sinks))))
        model.addRows(
            len(owner),
            lower,
            upper_row,
            len(index),
            starts.astype(np.int32),
            index.astype(np.int32),
            value,
        )
        self.sink_rows = np.arange(len(parent), len(owner), dtype=np.int32)
        self.model = model

    def basis(self) -> Any:
        """The basis HiGHS holds now (after a solve: that optimum's), to start a later solve
        from with `start_from`."""
        return self.model.getBasis()

    def start_from(self, basis: Any) -> None:
        """The next `solve` starts from `basis` (one of this relaxation's) instead of the last
        one: from a nearby deadline's optimum, a re-solve is a few pivots."""
        self.model.setBasis(basis)

    def solve_with_ends(
        self, deadline_s: float, nodes: IntArray, segment: IntArray, slow: npt.NDArray[np.bool_]
    ) -> LpSolution | None:
        """`solve` with each of `nodes` held at an end of its hull segment `segment` (index
        from the fastest): at its slow end or slower where `slow`, at its fast end or faster
        elsewhere; the other nodes free. The bounds are restored afterwards (the basis left
        is the held problem's: a later solve re-solves from it)."""
        n = self.num_nodes
        cols = np.concatenate(
            [np.arange(n + self.first[i], n + self.first[i + 1]) for i in nodes]
        ).astype(np.int32)
        lower, upper = np.zeros(len(cols)), self.upper[cols].copy()
        at = 0
        for i, k, s in zip(nodes, segment, slow, strict=True):
            width = int(self.first[i + 1] - self.first[i])
            if s:  # segments 0 .. k used in full
                lower[at : at + k + 1] = upper[at : at + k + 1]
            else:  # segments k .. unused
                upper[at + k : at + width] = 0.0
            at += width
        self.model.changeColsBounds(len(cols), cols, lower, upper)
        try:
            return self.solve(deadline_s)
        finally:
            self.model.changeColsBounds(len(cols), cols, np.zeros(len(cols)), self.upper[cols])

    def solve(self, deadline_s: float) -> LpSolution | None:
        """An optimal relaxed plan at `deadline_s`, or None when no relaxed plan meets it
        (faster than the fastest plan) or HiGHS fails."""
        model = self.model
        bound = deadline_s - self.fastest_s[self.sinks]
        model.changeRowsBounds(
            len(self.sink_rows), self.sink_rows, np.full(len(bound), -np.inf), bound
        )
        model.run()
        if model.getModelStatus() != self._highspy.HighsModelStatus.kOptimal:
            return None
        used = np.asarray(model.getSolution().col_value)[self.num_nodes :]
        sums = np.add.reduceat(np.concatenate((used, [0.0])), self.first[:-1])
        sums[self.first[:-1] == self.first[1:]] = 0.0  # nodes with a single option
        info = model.getInfo()
        return LpSolution(
            self.fastest_s + sums,
            self.fastest_cost_j + float(info.objective_function_value),
            int(info.simplex_iteration_count),
        )


def hull_prices(table: OptionTable, cls: IntArray, duration_s: FloatArray) -> FloatArray:
    """Each node's price of time (J/s) at its relaxed duration (nodes x lanes): the saving rate
    of the hull segment it lies inside, or between the two rates around a breakpoint it sits
    on. An option minimising ``c + price*t`` is then what the LP would pick, ties included."""
    out = np.zeros(duration_s.shape)
    for nodes, t, cost in _class_hulls(table, cls):
        rate = -np.diff(cost) / np.diff(t)
        # rate_at[j]: the rate of the segment ending at breakpoint j (j = 0: above any rate).
        rate_at = np.concatenate(([2.0 * rate[0] + 1.0], rate, [0.0]))
        d = duration_s[nodes]
        j = np.minimum(np.searchsorted(t, d, side="left"), len(t) - 1)
        on_point = np.abs(t[j] - d) <= 1e-9 * t[-1]
        out[nodes] = np.where(on_point, (rate_at[j] + rate_at[j + 1]) / 2, rate_at[j])
    return out


class Fractional(NamedTuple):
    """The instructions a relaxed plan leaves strictly inside a hull segment: what rounding has
    to decide."""

    nodes: IntArray
    segment: IntArray
    """Each one's segment (index from the fastest)."""
    penalty_j: FloatArray
    """What taking the segment's fast end costs over the relaxed point (effective joules)."""

    def by_class(self, cls: IntArray, num_classes: int) -> tuple[FloatArray, IntArray]:
        """Per class (`cls`: every node's class): the summed `penalty_j` of its fractional
        instructions, and how many it has."""
        mine = cls[self.nodes]
        penalty = np.bincount(mine, weights=self.penalty_j, minlength=num_classes).astype(float)
        count: IntArray = np.bincount(mine, minlength=num_classes).astype(np.int64)
        return penalty, count


def fractional_segments(table: OptionTable, cls: IntArray, duration_s: FloatArray) -> Fractional:
    """The nodes of a relaxed plan (one duration per node) that sit strictly inside a segment of
    their class's lower convex hull, by node."""
    nodes: list[IntArray] = []
    segment: list[IntArray] = []
    penalty: list[FloatArray] = []
    for members, t, cost in _class_hulls(table, cls):
        d = duration_s[members]
        j = np.clip(np.searchsorted(t, d), 1, len(t) - 1)
        inside = np.minimum(t[j] - d, d - t[j - 1]) > 1e-9 * t[-1]
        nodes.append(members[inside])
        segment.append(j[inside] - 1)
        penalty.append(cost[j[inside] - 1] - np.interp(d[inside], t, cost))
    if not nodes:
        return Fractional(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0))
    order = np.argsort(np.concatenate(nodes))
    return Fractional(
        np.concatenate(nodes)[order].astype(np.int64),
        np.concatenate(segment)[order].astype(np.int64),
        np.concatenate(penalty)[order],
    )


def _class_hulls(
    table: OptionTable, cls: IntArray
) -> Iterator[tuple[IntArray, FloatArray, FloatArray]]:
    """For each class with nodes and a hull of two points or more: its nodes, and its hull's
    times and effective costs, fastest first."""
    for c in range(table.num_classes):
        nodes = np.nonzero(cls == c)[0]
        hull = table.hull_indices(c)
        if len(nodes) and len(hull) >= 2:
            yield nodes, table.time_s[c, hull], table.cost_j[c, hull]


def _hull_segments(table: OptionTable, c: int) -> tuple[float, FloatArray, FloatArray]:
    """Class c's fastest time, and the length (s) and slope (J/s, negative) of each hull
    segment, fastest first."""
    hull = table.hull_indices(c)
    t, cost = table.time_s[c, hull], table.cost_j[c, hull]
    length = np.diff(t)
    return float(t[0]), length, np.diff(cost) / length


_FIRST_MODEL = threading.Lock()
_banner_printed = False


def _new_model(highspy: Any) -> Any:
    """A silent HiGHS model. HiGHS prints its banner to the C-level stdout when the process's
    first model is created, before any option can turn that off, and the planner's stdout is the
    user's summary (or a JSON frontier): that one creation runs with fd 1 pointed at /dev/null.
    The lock keeps two planning threads (the operator plans in worker threads) from swapping
    fd 1 under each other."""
    global _banner_printed  # noqa: PLW0603 (once per process, by design)
    with _FIRST_MODEL:
        if _banner_printed:
            model = highspy.Highs()
        else:
            with _quiet_stdout():
                model = highspy.Highs()
            _banner_printed = True
    model.setOptionValue("output_flag", False)
    # Devex pricing and a row-wise PRICE: about 8% faster along the deadline axis than the
    # defaults (dual steepest edge), though with a few more pivots (8 x 24, real profiles).
    model.setOptionValue("simplex_dual_edge_weight_strategy", 1)
    model.setOptionValue("simplex_price_strategy", 1)
    return model


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    """fd 1 to /dev/null for the duration (C-level writes included), then back."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with Path(os.devnull).open("w") as null:
            os.dup2(null.fileno(), 1)
            try:
                yield
            finally:
                with contextlib.suppress(OSError, AttributeError):
                    ctypes.CDLL(None).fflush(None)
                os.dup2(saved, 1)
    finally:
        os.close(saved)
