"""The planner's DAG is the shared vocabulary's: the same orders, and its vectorised longest path
equals `perseus_hooks.pipeline.iteration_time_s` (the simulator's) on random durations."""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np
import pytest

from perseus_hooks.pipeline import (
    Instruction,
    format_instruction,
    iteration_time_s,
    pipeline_order,
)
from perseus_operator.planner.evaluate import makespan
from perseus_operator.planner.pipeline import FORWARD, PipelineShape, build_dag

SHAPES = [
    PipelineShape(1, 3),
    PipelineShape(3, 2),
    PipelineShape(4, 7),
    PipelineShape(8, 12),
    PipelineShape(2, 4, "interleaved-1f1b", 2),
    PipelineShape(3, 6, "interleaved-1f1b", 3),
    PipelineShape(4, 4, "interleaved-1f1b", 2),
]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_same_order_and_longest_path(shape: PipelineShape) -> None:
    orders = pipeline_order(shape.stages, shape.microbatches, shape.virtual_stages)
    dag = build_dag(shape)
    chunked = shape.virtual_stages > 1
    assert dag.order == tuple(tuple(format_instruction(i, chunked) for i in o) for o in orders)
    rng = random.Random(f"{shape}")
    for _ in range(5):
        # Every instruction its own duration, so a wrong dependency changes the result.
        durations = {(s, i): rng.uniform(0.1, 3.0) for s, order in enumerate(orders) for i in order}
        node_s = np.asarray(
            [
                durations[(int(s), (bool(k == FORWARD), int(m), int(c)))]
                for s, k, m, c in zip(dag.stage, dag.kind, dag.microbatch, dag.chunk, strict=True)
            ]
        )
        want = iteration_time_s(orders, _lookup(durations))
        assert makespan(dag, node_s) == pytest.approx(want, rel=1e-12)


def _lookup(durations: dict[tuple[int, Instruction], float]) -> Callable[[int, Instruction], float]:
    return lambda stage, instruction: durations[(stage, instruction)]
