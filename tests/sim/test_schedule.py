"""1F1B and interleaved 1F1B orders and the iteration time they imply, on hand-computable
cases."""

from __future__ import annotations

import pytest

from perseus_hooks.pipeline import (
    Instruction,
    format_instruction,
    interleaved_order,
    iteration_time_s,
    one_f_one_b_order,
    pipeline_order,
)


def _names(stages: int, microbatches: int) -> list[list[str]]:
    return [[format_instruction(i) for i in o] for o in one_f_one_b_order(stages, microbatches)]


def test_four_stage_orders_follow_warmup_then_alternation() -> None:
    orders = _names(4, 4)
    assert orders[0] == ["F0", "F1", "F2", "F3", "B0", "B1", "B2", "B3"]
    assert orders[1] == ["F0", "F1", "F2", "B0", "F3", "B1", "B2", "B3"]
    assert orders[2] == ["F0", "F1", "B0", "F2", "B1", "F3", "B2", "B3"]
    assert orders[3] == ["F0", "B0", "F1", "B1", "F2", "B2", "F3", "B3"]


def test_fewer_microbatches_than_stages() -> None:
    assert _names(4, 2)[0] == ["F0", "F1", "B0", "B1"]
    assert _names(4, 2)[3] == ["F0", "B0", "F1", "B1"]


@pytest.mark.parametrize(("stages", "microbatches"), [(0, 3), (3, 0)])
def test_bad_shapes(stages: int, microbatches: int) -> None:
    with pytest.raises(ValueError, match="must be a positive integer"):
        one_f_one_b_order(stages, microbatches)


def test_uniform_two_stage_pipeline() -> None:
    # s0: F0[0,1] F1[1,2] B0[4,6] B1[7,9]; s1: F0[1,2] B0[2,4] F1[4,5] B1[5,7]
    orders = one_f_one_b_order(2, 2)
    assert iteration_time_s(orders, lambda s, i: 1.0 if i[0] else 2.0) == pytest.approx(9.0)


@pytest.mark.parametrize(("stages", "microbatches"), [(3, 3), (4, 8), (8, 12)])
def test_uniform_pipelines_take_m_plus_s_minus_1_slots(stages: int, microbatches: int) -> None:
    orders = one_f_one_b_order(stages, microbatches)
    total = iteration_time_s(orders, lambda s, i: 1.0 if i[0] else 2.0)
    assert total == pytest.approx((microbatches + stages - 1) * 3.0)


def test_one_microbatch_is_the_sum_of_the_chain() -> None:
    durations = {(0, True): 1.0, (1, True): 10.0, (1, False): 100.0, (0, False): 1000.0}

    def duration(stage: int, instruction: Instruction) -> float:
        return durations[(stage, instruction[0])]

    assert iteration_time_s(one_f_one_b_order(2, 1), duration) == pytest.approx(1111.0)


def test_slowest_stage_dominates() -> None:
    """Stage 1 three times slower: its 2M instructions plus the fill and drain around it."""
    orders = one_f_one_b_order(3, 4)

    def duration(stage: int, instruction: Instruction) -> float:
        return (3.0 if stage == 1 else 1.0) * (1.0 if instruction[0] else 2.0)

    # Stage 1 busy 4*(3+6)=36; before its first F: stage 0's F0 (1); after its last B: B3 on
    # stage 0 (2); it never idles in between because stages 0 and 2 are faster.
    assert iteration_time_s(orders, duration) == pytest.approx(1 + 36 + 2)


def test_a_deadlocking_order_is_rejected() -> None:
    orders = (((False, 0, 0), (True, 0, 0)), ((True, 0, 0), (False, 0, 0)))
    with pytest.raises(ValueError, match="deadlock"):
        iteration_time_s(orders, lambda s, i: 1.0)


def test_interleaved_order_is_megatrons() -> None:
    """The simulator's interleaved order (the shared one) agrees with the planner's and with the
    reference written from Megatron-LM's loop."""
    from perseus_operator.planner import PipelineShape, instruction_order
    from tests.planner.reference import order_interleaved

    for stages, microbatches, chunks in ((2, 4, 2), (3, 6, 3), (4, 8, 2), (4, 4, 4)):
        ours = [
            [format_instruction(i, chunked=True) for i in o]
            for o in interleaved_order(stages, microbatches, chunks)
        ]
        shape = PipelineShape(stages, microbatches, "interleaved-1f1b", chunks)
        assert ours == [list(o) for o in instruction_order(shape)]
        want = order_interleaved(stages, microbatches, chunks)
        assert ours == [[f"{k}{m}c{c}" for k, m, c in seq] for seq in want]
    with pytest.raises(ValueError, match="not a multiple of 4"):
        interleaved_order(4, 6, 2)
    with pytest.raises(ValueError, match="needs 2-64 virtual stages"):
        interleaved_order(4, 8, 1)
    assert pipeline_order(3, 4) == one_f_one_b_order(3, 4)


def test_interleaved_iteration_time_by_hand() -> None:
    """2 stages x 2 microbatches x 2 chunks, per (stage, chunk) times F/B: s0c0 1/2, s0c1 1/1,
    s1c0 2/3, s1c1 3/4: 27 s (the planner's hand case, tests/planner/test_interleaved.py)."""
    times = {(0, 0): (1.0, 2.0), (0, 1): (1.0, 1.0), (1, 0): (2.0, 3.0), (1, 1): (3.0, 4.0)}

    def duration(stage: int, instruction: Instruction) -> float:
        forward, _, chunk = instruction
        return times[(stage, chunk)][0 if forward else 1]

    assert iteration_time_s(interleaved_order(2, 2, 2), duration) == pytest.approx(27.0)
