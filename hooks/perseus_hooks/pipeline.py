"""The pipeline vocabulary every part shares: schedules, each stage's instruction order, the
instructions' names, the dependencies between stages and the iteration time they imply.

The planner builds its DAG on these, the sidecar parses the schedules it is sent with them, the
simulated trainer plays them and the PyTorch example runs them, so all four agree by
construction. Standard library only.

An instruction is ``(forward, microbatch, chunk)``; the chunk is 0 in a plain 1F1B pipeline.

Synchronous 1F1B: stage s of S (0-based) with M microbatches runs min(S-s-1, M) warm-up
forwards, then alternates one forward and one backward until every forward ran, then the
remaining backwards. Across stages F(s,m) needs F(s-1,m) (the activation) and B(s,m) needs
B(s+1,m) (the gradient).

Interleaved 1F1B (Megatron-LM's ``forward_backward_pipelining_with_interleaving``, v model chunks
per stage): stage s holds chunks s, S+s, 2S+s, ... of a model cut into S*v pieces, so a
microbatch's forward runs piece by piece, from the last stage's chunk c to the first stage's
chunk c+1, and its backward the other way. Stage s runs M*v forwards and M*v backwards; its k-th
forward is chunk (k mod S*v) // S of microbatch (k // (S*v))*S + k mod S, and its k-th backward
the same microbatch on chunk v-1 minus that (the last chunk first). Warm-up: min(2*(S-s-1) +
(v-1)*S, M*v) forwards (all of them when M = S), then one forward and one backward alternate,
then the remaining backwards. M must be a multiple of S.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Literal

__all__ = [
    "MAX_CHUNKS",
    "SCHEDULES",
    "Instruction",
    "Schedule",
    "check_shape",
    "format_instruction",
    "interleaved_order",
    "iteration_time_s",
    "one_f_one_b_order",
    "parse_instruction",
    "pipeline_order",
    "stage_order",
    "upstream",
]

Schedule = Literal["1f1b", "interleaved-1f1b"]
SCHEDULES: tuple[Schedule, ...] = ("1f1b", "interleaved-1f1b")
MAX_CHUNKS = 64
"""Model chunks per stage an interleaved pipeline may have."""

Instruction = tuple[bool, int, int]
"""(is_forward, microbatch, chunk); the chunk is 0 in a 1F1B pipeline."""

_NAME = re.compile(r"^([FB])(0|[1-9][0-9]{0,5})(?:c(0|[1-9][0-9]?))?$")


def check_shape(stages: int, microbatches: int, schedule: str = "1f1b", chunks: int = 1) -> None:
    """Raise ValueError (one readable line) unless the schedule can run this shape: positive
    integers; one chunk per stage for 1F1B; for interleaved 1F1B 2-`MAX_CHUNKS` chunks, at least
    2 stages and microbatches a multiple of the stages (microbatches go through the chunks in
    groups of S, as in Megatron-LM)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; supported: {', '.join(SCHEDULES)}")
    for name, value in (
        ("stages", stages),
        ("microbatches", microbatches),
        ("virtual stages", chunks),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"pipeline {name} must be a positive integer, got {value!r}")
    if schedule == "1f1b":
        if chunks != 1:
            raise ValueError(
                f"1f1b has one model chunk per stage; {chunks} virtual stages "
                "need schedule interleaved-1f1b"
            )
        return
    if not 2 <= chunks <= MAX_CHUNKS:
        raise ValueError(
            f"interleaved-1f1b needs 2-{MAX_CHUNKS} virtual stages (model chunks per stage),"
            f" got {chunks}"
        )
    if stages < 2:
        raise ValueError("interleaved-1f1b needs at least 2 stages")
    if microbatches % stages:
        raise ValueError(
            f"interleaved-1f1b needs microbatches a multiple of the stages (as Megatron-LM): "
            f"{microbatches} is not a multiple of {stages}"
        )


def _schedule(chunks: int) -> Schedule:
    return "1f1b" if chunks == 1 else "interleaved-1f1b"


def stage_order(
    stages: int, microbatches: int, stage: int, chunks: int = 1
) -> tuple[Instruction, ...]:
    """Stage `stage`'s instructions in execution order: 1F1B for one chunk per stage, interleaved
    1F1B for more (see the module doc).

    >>> [format_instruction(i) for i in stage_order(3, 4, 1)]
    ['F0', 'F1', 'B0', 'F2', 'B1', 'F3', 'B2', 'B3']
    """
    check_shape(stages, microbatches, _schedule(chunks), chunks)
    if isinstance(stage, bool) or not isinstance(stage, int) or not 0 <= stage < stages:
        raise ValueError(f"stage must be 0-{stages - 1}, got {stage!r}")
    return _stage_order(stages, microbatches, stage, chunks)


def _stage_order(stages: int, mbs: int, stage: int, v: int) -> tuple[Instruction, ...]:
    if v == 1:
        warm_up = min(stages - stage - 1, mbs)
        seq: list[Instruction] = [(True, m, 0) for m in range(warm_up)]
        backward = 0
        for m in range(warm_up, mbs):
            seq += [(True, m, 0), (False, backward, 0)]
            backward += 1
        return (*seq, *((False, m, 0) for m in range(backward, mbs)))
    total, group = mbs * v, stages * v

    def nth(k: int, forward: bool) -> Instruction:
        chunk = (k % group) // stages
        return forward, (k // group) * stages + k % stages, chunk if forward else v - 1 - chunk

    all_warm_up = mbs == stages  # Megatron-LM then runs every forward first
    warm_up = total if all_warm_up else min(2 * (stages - stage - 1) + (v - 1) * stages, total)
    seq = [nth(k, True) for k in range(warm_up)]
    for k in range(total - warm_up):
        seq += [nth(warm_up + k, True), nth(k, False)]
    return (*seq, *(nth(k, False) for k in range(total - warm_up, total)))


def pipeline_order(
    stages: int, microbatches: int, chunks: int = 1
) -> tuple[tuple[Instruction, ...], ...]:
    """Every stage's order (`stage_order`): 1F1B for one chunk per stage, interleaved for more."""
    check_shape(stages, microbatches, _schedule(chunks), chunks)
    return tuple(_stage_order(stages, microbatches, s, chunks) for s in range(stages))


def one_f_one_b_order(stages: int, microbatches: int) -> tuple[tuple[Instruction, ...], ...]:
    """Every stage's synchronous 1F1B order.

    >>> [[format_instruction(i) for i in o] for o in one_f_one_b_order(2, 3)]
    [['F0', 'F1', 'B0', 'F2', 'B1', 'B2'], ['F0', 'B0', 'F1', 'B1', 'F2', 'B2']]
    """
    return pipeline_order(stages, microbatches)


def interleaved_order(
    stages: int, microbatches: int, chunks: int
) -> tuple[tuple[Instruction, ...], ...]:
    """Every stage's interleaved 1F1B order with `chunks` >= 2 model chunks per stage.

    >>> [format_instruction(i, True) for i in interleaved_order(2, 2, 2)[0]]
    ['F0c0', 'F1c0', 'F0c1', 'F1c1', 'B0c1', 'B1c1', 'B0c0', 'B1c0']
    """
    check_shape(stages, microbatches, "interleaved-1f1b", chunks)
    return pipeline_order(stages, microbatches, chunks)


def format_instruction(instruction: Instruction, chunked: bool = False) -> str:
    """``(True, 3, 0)`` -> ``"F3"``, or ``"F3c0"`` when `chunked` (an interleaved pipeline): the
    names of the frontier format's ``order`` and of the sidecar's schedules."""
    forward, m, chunk = instruction
    return f"{'F' if forward else 'B'}{m}" + (f"c{chunk}" if chunked else "")


def parse_instruction(text: str) -> tuple[bool, int, int | None]:
    """The inverse of `format_instruction`: ``"F3"`` -> (True, 3, None), ``"B0c1"`` ->
    (False, 0, 1); ValueError (one readable line) for anything else.

    >>> parse_instruction("B12c1")
    (False, 12, 1)
    """
    match = _NAME.match(text)
    chunk = None if match is None or match.group(3) is None else int(match.group(3))
    if match is None or (chunk is not None and chunk >= MAX_CHUNKS):
        raise ValueError(
            f"instruction {text!r} is not F<m> or B<m> (or F<m>c<chunk>, B<m>c<chunk> with"
            f" chunk < {MAX_CHUNKS}) with m >= 0"
        )
    return match.group(1) == "F", int(match.group(2)), chunk


def upstream(stages: int, chunks: int, stage: int, instruction: Instruction) -> tuple[int, int]:
    """The (stage, chunk) whose output this instruction needs, or (-1, -1) for none: the model
    piece before it (forward: the activation) or after it (backward: the gradient). Stage s's
    chunk c is piece c*S + s of the model."""
    forward, _, chunk = instruction
    piece = chunk * stages + stage + (-1 if forward else 1)
    if not 0 <= piece < stages * chunks:
        return -1, -1
    return piece % stages, piece // stages


def iteration_time_s(
    orders: Sequence[Sequence[Instruction]], duration_s: Callable[[int, Instruction], float]
) -> float:
    """Makespan of one iteration: the longest path of the pipeline's DAG (each stage's order,
    plus `upstream`'s dependencies), each instruction of stage s lasting
    ``duration_s(s, instruction)``, every stage starting at 0. ValueError if the orders deadlock.

    The planner computes the same path level by level over numpy arrays, for speed; its tests
    check it against this one.

    >>> iteration_time_s(one_f_one_b_order(2, 2), lambda s, i: 1.0 if i[0] else 2.0)
    9.0
    """
    stages = len(orders)
    chunks = 1 + max(c for order in orders for _, _, c in order)
    end: dict[tuple[int, bool, int, int], float] = {}
    position = [0] * stages
    free_at = [0.0] * stages
    remaining = sum(len(o) for o in orders)
    while remaining:
        progressed = False
        for s in range(stages):
            while position[s] < len(orders[s]):
                instruction = orders[s][position[s]]
                forward, m, _ = instruction
                dep_stage, dep_chunk = upstream(stages, chunks, s, instruction)
                dep = (dep_stage, forward, m, dep_chunk)
                if dep_stage >= 0 and dep not in end:
                    break
                start = max(free_at[s], end[dep] if dep_stage >= 0 else 0.0)
                free_at[s] = end[(s, forward, m, instruction[2])] = start + duration_s(
                    s, instruction
                )
                position[s] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            raise ValueError("the instruction orders deadlock: not a valid pipeline schedule")
    return max(free_at)
