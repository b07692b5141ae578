"""Pipeline shapes and their instruction DAGs.

A schedule turns a shape (stages S, microbatches M, model chunks per stage v) into each stage's
instruction order; the DAG adds the cross-stage data dependencies. Two schedules exist:
synchronous 1F1B (v = 1) and Megatron-LM's interleaved 1F1B (v >= 2: stage s holds chunks
s, S+s, 2S+s, ... of a model cut into S*v chunks, so a microbatch passes every stage v times).
The orders, the instruction names and the dependency rule are the shared vocabulary of
`perseus_hooks.pipeline`, which the sidecar and the simulated trainer use too.
Everything downstream (evaluation, frontier) works on the generic `PipelineDag`, whose nodes
carry their chunk; a profile gives each (stage, chunk) its own options.

The DAG is stored as flat numpy arrays so that the longest-path passes the planner runs hundreds
of times are level-by-level vector operations: `levels[k]` holds the nodes whose longest chain of
predecessors has k edges, an antichain, so every node of a level can be computed at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import numpy.typing as npt

from perseus_hooks.pipeline import (
    SCHEDULES,
    Instruction,
    Schedule,
    check_shape,
    format_instruction,
    stage_order,
    upstream,
)

__all__ = [
    "SCHEDULES",
    "PipelineDag",
    "PipelineShape",
    "build_dag",
    "instruction_order",
]

IntArray = npt.NDArray[np.int64]
FORWARD = 0
BACKWARD = 1


@dataclass(frozen=True)
class PipelineShape:
    """A synchronous pipeline: `stages` GPUs in a chain (one per stage, as profiled), `microbatches`
    per iteration. Fewer microbatches than stages is a valid (bubble-heavy) 1F1B pipeline.

    ``schedule="interleaved-1f1b"`` with `virtual_stages` v >= 2 model chunks per stage is
    Megatron-LM's interleaved schedule, with its rules: at least 2 stages and microbatches a
    multiple of the stages (microbatches go through the chunks in groups of S)."""

    stages: int
    microbatches: int
    schedule: Schedule = "1f1b"
    virtual_stages: int = 1

    def __post_init__(self) -> None:
        check_shape(self.stages, self.microbatches, self.schedule, self.virtual_stages)

    @property
    def num_instructions(self) -> int:
        return 2 * self.stages * self.microbatches * self.virtual_stages


def instruction_order(shape: PipelineShape) -> tuple[tuple[str, ...], ...]:
    """Each stage's instructions in execution order (`perseus_hooks.pipeline.stage_order`),
    as `F<m>` / `B<m>` strings, `F<m>c<chunk>` / `B<m>c<chunk>` in an interleaved pipeline.

    >>> instruction_order(PipelineShape(stages=2, microbatches=3))
    (('F0', 'F1', 'B0', 'F2', 'B1', 'B2'), ('F0', 'B0', 'F1', 'B1', 'F2', 'B2'))
    >>> interleaved = PipelineShape(2, 4, "interleaved-1f1b", virtual_stages=2)
    >>> instruction_order(interleaved)[1]  # doctest: +NORMALIZE_WHITESPACE
    ('F0c0', 'F1c0', 'F0c1', 'B0c1', 'F1c1', 'B1c1', 'F2c0', 'B0c0', 'F3c0', 'B1c0',
     'F2c1', 'B2c1', 'F3c1', 'B3c1', 'B2c0', 'B3c0')
    """
    chunked = shape.schedule != "1f1b"
    return tuple(
        tuple(format_instruction(i, chunked) for i in _stage(shape, s)) for s in range(shape.stages)
    )


def _stage(shape: PipelineShape, stage: int) -> tuple[Instruction, ...]:
    return stage_order(shape.stages, shape.microbatches, stage, shape.virtual_stages)


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
    chunk: IntArray  # the model chunk of the stage (0 unless interleaved)

    @property
    def num_nodes(self) -> int:
        return len(self.stage)

    @cached_property
    def unit(self) -> IntArray:
        """Each node's (stage, chunk) as one index, ``stage * v + chunk``: its profile row."""
        out: IntArray = self.stage * self.shape.virtual_stages + self.chunk
        return out

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
    """The dependency DAG: within a stage its order; across stages each model chunk's forward
    needs the previous chunk's (F(s,m) -> F(s+1,m), and from the last stage's chunk c to the
    first stage's chunk c+1 when interleaved) and each backward the next chunk's, in reverse.
    (F before B of the same microbatch and chunk is implied by every stage's order, which is
    checked.)"""
    stages, mbs, v = shape.stages, shape.microbatches, shape.virtual_stages
    n = shape.num_instructions
    per_stage = 2 * mbs * v
    stage = np.repeat(np.arange(stages, dtype=np.int64), per_stage)
    kind = np.empty(n, dtype=np.int64)
    microbatch = np.empty(n, dtype=np.int64)
    chunk = np.empty(n, dtype=np.int64)
    index: dict[tuple[int, int, int, int], int] = {}
    node = 0
    for s in range(stages):
        for forward, m, c in _stage(shape, s):
            k = FORWARD if forward else BACKWARD
            kind[node], microbatch[node], chunk[node] = k, m, c
            index[(s, c, k, m)] = node
            node += 1
    for (s, c, k, m), i in index.items():
        if k == BACKWARD and index[(s, c, FORWARD, m)] > i:
            raise ValueError(f"pipeline schedule runs B{m} before F{m} of chunk {c} on stage {s}")
    offsets = np.arange(0, n + 1, per_stage, dtype=np.int64)
    preds = np.full((n, 2), n, dtype=np.int64)
    succs = np.full((n, 2), n, dtype=np.int64)
    for i in range(n):
        s, k, m, c = int(stage[i]), int(kind[i]), int(microbatch[i]), int(chunk[i])
        if i > offsets[s]:
            preds[i, 0] = i - 1
            succs[i - 1, 0] = i
        other_stage, other_chunk = upstream(stages, v, s, (k == FORWARD, m, c))
        j = index.get((other_stage, other_chunk, k, m)) if other_stage >= 0 else None
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
        shape, instruction_order(shape), stage, kind, microbatch, offsets, preds, succs,
        tuple(lv for lv in levels if len(lv)), chunk,
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
