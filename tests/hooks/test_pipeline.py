"""The shared pipeline vocabulary: each stage's order checked against hand-written 1F1B and
interleaved 1F1B cases, instruction names both ways, shape rules, dependencies and the iteration
time they imply."""

from __future__ import annotations

import doctest

import pytest

from perseus_hooks import pipeline
from perseus_hooks.pipeline import (
    MAX_CHUNKS,
    Instruction,
    check_shape,
    format_instruction,
    interleaved_order,
    iteration_time_s,
    one_f_one_b_order,
    parse_instruction,
    pipeline_order,
    stage_order,
    upstream,
)


def names(stages: int, microbatches: int, chunks: int = 1) -> list[str]:
    """Every stage's order as one space-separated line of names."""
    return [
        " ".join(format_instruction(i, chunks > 1) for i in order)
        for order in pipeline_order(stages, microbatches, chunks)
    ]


@pytest.mark.parametrize(
    ("stages", "microbatches", "chunks", "want"),
    [
        # One stage: no warm-up, forward and backward in turn.
        (1, 3, 1, ["F0 B0 F1 B1 F2 B2"]),
        # Fewer microbatches than stages: the warm-up is cut at M.
        (3, 2, 1, ["F0 F1 B0 B1", "F0 F1 B0 B1", "F0 B0 F1 B1"]),
        (
            4,
            4,
            1,
            [
                "F0 F1 F2 F3 B0 B1 B2 B3",
                "F0 F1 F2 B0 F3 B1 B2 B3",
                "F0 F1 B0 F2 B1 F3 B2 B3",
                "F0 B0 F1 B1 F2 B2 F3 B3",
            ],
        ),
        (2, 5, 1, ["F0 F1 B0 F2 B1 F3 B2 F4 B3 B4", "F0 B0 F1 B1 F2 B2 F3 B3 F4 B4"]),
        # Interleaved, M = S: every forward first (Megatron-LM's rule), backwards from the
        # last chunk.
        (
            2,
            2,
            2,
            [
                "F0c0 F1c0 F0c1 F1c1 B0c1 B1c1 B0c0 B1c0",
                "F0c0 F1c0 F0c1 F1c1 B0c1 B1c1 B0c0 B1c0",
            ],
        ),
        # Interleaved, M = 2S: stage 0 warms up with 2*(S-1) + (v-1)*S = 4 forwards, stage 1
        # with 2; microbatches go through the chunks in groups of S.
        (
            2,
            4,
            2,
            [
                "F0c0 F1c0 F0c1 F1c1 F2c0 B0c1 F3c0 B1c1 F2c1 B0c0 F3c1 B1c0 B2c1 B3c1 B2c0 B3c0",
                "F0c0 F1c0 F0c1 B0c1 F1c1 B1c1 F2c0 B0c0 F3c0 B1c0 F2c1 B2c1 F3c1 B3c1 B2c0 B3c0",
            ],
        ),
        # Three chunks, M = S: all forwards (chunk 0, 1, 2), then backwards chunk 2, 1, 0.
        (
            3,
            3,
            3,
            [
                "F0c0 F1c0 F2c0 F0c1 F1c1 F2c1 F0c2 F1c2 F2c2 "
                "B0c2 B1c2 B2c2 B0c1 B1c1 B2c1 B0c0 B1c0 B2c0"
            ]
            * 3,
        ),
    ],
)
def test_orders_by_hand(stages: int, microbatches: int, chunks: int, want: list[str]) -> None:
    assert names(stages, microbatches, chunks) == want
    for s in range(stages):
        assert (
            stage_order(stages, microbatches, s, chunks)
            == pipeline_order(stages, microbatches, chunks)[s]
        )


def test_every_order_runs_each_instruction_once_forward_first() -> None:
    for stages, microbatches, chunks in ((1, 1, 1), (5, 3, 1), (8, 12, 1), (4, 8, 3), (3, 9, 4)):
        for order in pipeline_order(stages, microbatches, chunks):
            want = {(f, m, c) for f in (True, False) for m in range(microbatches)
                    for c in range(chunks)}  # fmt: skip
            assert sorted(order) == sorted(want)
            for m in range(microbatches):
                for c in range(chunks):
                    assert order.index((True, m, c)) < order.index((False, m, c))


def test_named_schedules_are_the_general_one() -> None:
    assert one_f_one_b_order(3, 4) == pipeline_order(3, 4)
    assert interleaved_order(2, 4, 2) == pipeline_order(2, 4, 2)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: pipeline_order(0, 3), "pipeline stages must be a positive integer, got 0"),
        (lambda: pipeline_order(3, 0), "pipeline microbatches must be a positive integer"),
        (lambda: pipeline_order(3, True), "pipeline microbatches must be a positive integer"),
        (lambda: pipeline_order(2, 4, 0), "virtual stages must be a positive integer"),
        (lambda: interleaved_order(4, 8, 1), "needs 2-64 virtual stages"),
        (lambda: pipeline_order(2, 4, MAX_CHUNKS + 1), "needs 2-64 virtual stages"),
        (lambda: pipeline_order(1, 4, 2), "at least 2 stages"),
        (lambda: pipeline_order(4, 6, 2), "6 is not a multiple of 4"),
        (lambda: stage_order(3, 4, 3), "stage must be 0-2, got 3"),
        (lambda: stage_order(3, 4, -1), "stage must be 0-2, got -1"),
        (lambda: check_shape(2, 2, "gpipe"), "unknown schedule 'gpipe'"),
        (lambda: check_shape(2, 2, "1f1b", 2), "need schedule interleaved-1f1b"),
    ],
)
def test_bad_shapes_are_one_readable_error(call: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()  # type: ignore[operator]


@pytest.mark.parametrize(
    ("instruction", "chunked", "text"),
    [
        ((True, 0, 0), False, "F0"),
        ((False, 12, 0), False, "B12"),
        ((True, 3, 1), True, "F3c1"),
        ((False, 999_999, 63), True, "B999999c63"),
    ],
)
def test_names_round_trip(instruction: Instruction, chunked: bool, text: str) -> None:
    assert format_instruction(instruction, chunked) == text
    forward, m, chunk = parse_instruction(text)
    assert (forward, m, chunk if chunked else 0) == instruction
    assert (chunk is None) == (not chunked)


@pytest.mark.parametrize(
    "text", ["", "F", "f3", "X3", "F01", "F-1", "F3c", "F3c64", "F3c01", "F1234567", " F3", "F3 "]
)
def test_bad_names_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="is not F<m> or B<m>"):
        parse_instruction(text)


def test_upstream_follows_the_model_pieces() -> None:
    # 1F1B, 3 stages: activations come from the stage before, gradients from the stage after.
    assert upstream(3, 1, 0, (True, 5, 0)) == (-1, -1)
    assert upstream(3, 1, 1, (True, 5, 0)) == (0, 0)
    assert upstream(3, 1, 1, (False, 5, 0)) == (2, 0)
    assert upstream(3, 1, 2, (False, 5, 0)) == (-1, -1)
    # Interleaved, 2 stages x 2 chunks: pieces s0c0, s1c0, s0c1, s1c1 in model order.
    assert upstream(2, 2, 0, (True, 0, 1)) == (1, 0)
    assert upstream(2, 2, 1, (False, 0, 0)) == (0, 1)
    assert upstream(2, 2, 1, (True, 0, 1)) == (0, 1)
    assert upstream(2, 2, 1, (False, 0, 1)) == (-1, -1)


def test_iteration_time_by_hand() -> None:
    # 2 stages, F 1 s, B 2 s: s0 F0[0,1] F1[1,2] B0[4,6] B1[7,9]; s1 F0[1,2] B0[2,4] F1[4,5]
    # B1[5,7].
    uniform = iteration_time_s(one_f_one_b_order(2, 2), lambda s, i: 1.0 if i[0] else 2.0)
    assert uniform == pytest.approx(9.0)
    # Interleaved 2 x 2 x 2, per (stage, chunk) F/B times s0c0 1/2, s0c1 1/1, s1c0 2/3,
    # s1c1 3/4: 27 s (the planner's hand case, tests/planner/test_interleaved.py).
    times = {(0, 0): (1.0, 2.0), (0, 1): (1.0, 1.0), (1, 0): (2.0, 3.0), (1, 1): (3.0, 4.0)}

    def duration(stage: int, instruction: Instruction) -> float:
        forward, _, chunk = instruction
        return times[(stage, chunk)][0 if forward else 1]

    assert iteration_time_s(interleaved_order(2, 2, 2), duration) == pytest.approx(27.0)


def test_a_deadlocking_order_is_rejected() -> None:
    orders = (((False, 0, 0), (True, 0, 0)), ((True, 0, 0), (False, 0, 0)))
    with pytest.raises(ValueError, match="deadlock"):
        iteration_time_s(orders, lambda s, i: 1.0)


def test_the_docstring_examples_hold() -> None:
    results = doctest.testmod(pipeline)
    assert results.attempted >= 5
    assert results.failed == 0
