"""Pipeline shapes and their instruction DAGs.

A schedule turns a shape (stages S, microbatches M) into each stage's instruction order; the DAG
adds the cross-stage data dependencies. Only synchronous 1F1B exists today; another schedule
(GPipe, interleaved 1F1B) is a new order function plus its cross-stage edges in `build_dag`, and
everything downstream (evaluation, frontier) works on the generic `PipelineDag`.

The DAG is stored as flat numpy arrays so that the longest-path passes the planner runs hundreds
of times are level-by-level vector operations: `levels[k]` holds the nodes whose longest chain of
predecessors has k edges, an antichain, so every node of a level can be computed at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import numpy as np
import numpy.typing as npt

__all__ = ["SCHEDULES", "PipelineDag", "PipelineShape", "build_dag", "instruction_order"]

Schedule = Literal["1f1b"]
SCHEDULES: tuple[Schedule, ...] = ("1f1b",)

IntArray = npt.NDArray[np.int64]
FORWARD = 0
BACKWARD = 1


@dataclass(frozen=True)
class PipelineShape:
    """A synchronous pipeline: `stages` GPUs in a chain (one per stage, as profiled), `microbatches`
    per iteration. Fewer microbatches than stages is a valid (bubble-heavy) 1F1B pipeline."""

    stages: int
    microbatches: int
    schedule: Schedule = "1f1b"

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(
                f"unknown schedule {self.schedule!r}; supported: {', '.join(SCHEDULES)}"
            )
        for name, value in (("stages", self.stages), ("microbatches", self.microbatches)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"pipeline {name} must be a positive integer, got {value!r}")

    @property
    def num_instructions(self) -> int:
        return 2 * self.stages * self.microbatches


def instruction_order(shape: PipelineShape) -> tuple[tuple[str, ...], ...]:
    """Each stage's instructions in execution order, as `F<m>` / `B<m>` strings.

    Synchronous 1F1B: stage s runs min(S-s-1, M) warm-up forwards, then alternates one forward and
    one backward until every forward ran, then the remaining backwards.

    >>> instruction_order(PipelineShape(stages=2, microbatches=3))
    (('F0', 'F1', 'B0', 'F2', 'B1', 'B2'), ('F0', 'B0', 'F1', 'B1', 'F2', 'B2'))
    """
    order = []
    for s in range(shape.stages):
        warm_up = min(shape.stages - s - 1, shape.microbatches)
        seq = [f"F{m}" for m in range(warm_up)]
        backward = 0
        for m in range(warm_up, shape.microbatches):
            seq += [f"F{m}", f"B{backward}"]
            backward += 1
        seq += [f"B{m}" for m in range(backward, shape.microbatches)]
        order.append(tuple(seq))
    return tuple(order)


@dataclass(frozen=True, eq=False)
class PipelineDag:
    """Instruction DAG. Node ids run stage by stage in execution order (stage s's nodes are
    `offsets[s]:offsets[s+1]`). Every node has at most two predecessors and two successors;
    missing ones point at the sentinel id `num_nodes`."""

    shape: PipelineShape
    order: tuple[tuple[str, ...], ...]
    stage: IntArray
    kind: IntArray  # FORWARD / BACKWARD
    microbatch: IntArray
    offsets: IntArray
    preds: IntArray  # (num_nodes, 2)
    succs: IntArray  # (num_nodes, 2)
    levels: tuple[IntArray, ...]

    @property
    def num_nodes(self) -> int:
        return len(self.stage)

    @cached_property
    def level_preds(self) -> tuple[tuple[IntArray, IntArray], ...]:
        return tuple((self.preds[lv, 0], self.preds[lv, 1]) for lv in self.levels)

    @cached_property
    def level_succs(self) -> tuple[tuple[IntArray, IntArray], ...]:
        return tuple((self.succs[lv, 0], self.succs[lv, 1]) for lv in self.levels)

    @cached_property
    def last_of_stage(self) -> IntArray:
        return self.offsets[1:] - 1


def build_dag(shape: PipelineShape) -> PipelineDag:
    """The dependency DAG: within a stage its order; F(s,m) -> F(s+1,m); B(s+1,m) -> B(s,m).
    (F(s,m) before B(s,m) is implied by every stage's order.)"""
    order = instruction_order(shape)
    stages, mbs = shape.stages, shape.microbatches
    n = shape.num_instructions
    stage = np.repeat(np.arange(stages, dtype=np.int64), 2 * mbs)
    kind = np.empty(n, dtype=np.int64)
    microbatch = np.empty(n, dtype=np.int64)
    index: dict[tuple[int, int, int], int] = {}
    node = 0
    for s, seq in enumerate(order):
        for token in seq:
            k = FORWARD if token[0] == "F" else BACKWARD
            m = int(token[1:])
            kind[node], microbatch[node] = k, m
            index[(s, k, m)] = node
            node += 1
    offsets = np.arange(0, n + 1, 2 * mbs, dtype=np.int64)
    preds = np.full((n, 2), n, dtype=np.int64)
    succs = np.full((n, 2), n, dtype=np.int64)
    for i in range(n):
        s, k, m = int(stage[i]), int(kind[i]), int(microbatch[i])
        if i > offsets[s]:
            preds[i, 0] = i - 1
            succs[i - 1, 0] = i
        cross = (s - 1, k, m) if k == FORWARD else (s + 1, k, m)
        j = index.get(cross)
        if j is not None:
            preds[i, 1] = j
            succs[j, 1] = i
    depth = np.zeros(n + 1, dtype=np.int64)
    for i in _topological(preds, n):
        depth[i] = 1 + max(depth[preds[i, 0]], depth[preds[i, 1]]) if _has_pred(preds, i, n) else 0
    depth = depth[:n]
    sort = np.argsort(depth, kind="stable")
    bounds = np.searchsorted(depth[sort], np.arange(int(depth.max()) + 2))
    levels = tuple(sort[bounds[k] : bounds[k + 1]] for k in range(len(bounds) - 1))
    return PipelineDag(
        shape, order, stage, kind, microbatch, offsets, preds, succs,
        tuple(lv for lv in levels if len(lv)),
    )  # fmt: skip


def _has_pred(preds: IntArray, i: int, n: int) -> bool:
    return bool(preds[i, 0] != n or preds[i, 1] != n)


def _topological(preds: IntArray, n: int) -> list[int]:
    """Kahn's algorithm; raises if the schedule's dependencies form a cycle (a deadlock)."""
    indegree = np.count_nonzero(preds != n, axis=1)
    children: list[list[int]] = [[] for _ in range(n)]
    for i in range(n):
        for p in preds[i]:
            if p != n:
                children[int(p)].append(i)
    ready = [i for i in range(n) if indegree[i] == 0]
    out: list[int] = []
    while ready:
        i = ready.pop()
        out.append(i)
        for c in children[i]:
            indegree[c] -= 1
            if indegree[c] == 0:
                ready.append(c)
    if len(out) != n:
        raise ValueError("pipeline schedule deadlocks: its dependencies form a cycle")
    return out
