"""Pipeline schedules for the simulated trainer: each stage's instruction order and the
iteration time it implies.

Synchronous 1F1B: stage s of S (0-based) with M microbatches runs min(S-s-1, M) warm-up
forwards, then alternates one forward and one backward until every forward ran, then the
remaining backwards. Across stages F(s,m) needs F(s-1,m) (the activation) and B(s,m) needs
B(s+1,m) (the gradient).

Interleaved 1F1B (Megatron-LM's, v model chunks per stage): stage s holds chunks s, S+s, ...
of a model cut into S*v pieces, so a microbatch's forward runs piece by piece, from the last
stage's chunk c to the first stage's chunk c+1, and its backward the other way. Stage s runs
its k-th forward on chunk (k mod S*v) // S of microbatch (k // (S*v))*S + k mod S, its k-th
backward on the same microbatch and the mirrored chunk; min(2*(S-s-1) + (v-1)*S, M*v) warm-up
forwards (all of them when M = S), then one forward and one backward alternate. M must be a
multiple of S. (The planner has its own copy: the sidecar never imports the operator.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

__all__ = [
    "Instruction",
    "format_instruction",
    "interleaved_order",
    "iteration_time_s",
    "one_f_one_b_order",
    "pipeline_order",
    "upstream",
]

Instruction = tuple[bool, int, int]
"""(is_forward, microbatch, chunk); the chunk is 0 in a 1F1B pipeline."""


def one_f_one_b_order(stages: int, microbatches: int) -> tuple[tuple[Instruction, ...], ...]:
    """Every stage's instruction order.

    >>> [[format_instruction(i) for i in o] for o in one_f_one_b_order(2, 3)]
    [['F0', 'F1', 'B0', 'F2', 'B1', 'B2'], ['F0', 'B0', 'F1', 'B1', 'F2', 'B2']]
    """
    _check(stages, microbatches)
    orders = []
    for s in range(stages):
        warmup = min(stages - s - 1, microbatches)
        order: list[Instruction] = [(True, m, 0) for m in range(warmup)]
        next_backward = 0
        for m in range(warmup, microbatches):
            order.append((True, m, 0))
            order.append((False, next_backward, 0))
            next_backward += 1
        order.extend((False, m, 0) for m in range(next_backward, microbatches))
        orders.append(tuple(order))
    return tuple(orders)


def interleaved_order(
    stages: int, microbatches: int, chunks: int
) -> tuple[tuple[Instruction, ...], ...]:
    """Every stage's interleaved 1F1B order (see the module doc).

    >>> [format_instruction(i, True) for i in interleaved_order(2, 2, 2)[0]]
    ['F0c0', 'F1c0', 'F0c1', 'F1c1', 'B0c1', 'B1c1', 'B0c0', 'B1c0']
    """
    _check(stages, microbatches)
    if chunks < 2 or stages < 2:
        raise ValueError(f"interleaved 1F1B needs 2+ stages and 2+ chunks, got {stages}, {chunks}")
    if microbatches % stages:
        raise ValueError(
            f"interleaved 1F1B needs microbatches a multiple of the stages: {microbatches} is "
            f"not a multiple of {stages}"
        )
    total, group = microbatches * chunks, stages * chunks

    def nth(k: int, forward: bool) -> Instruction:
        chunk = (k % group) // stages
        return forward, (k // group) * stages + k % stages, chunk if forward else chunks - 1 - chunk

    orders = []
    for s in range(stages):
        warmup = (
            total if microbatches == stages else min(2 * (stages - s - 1) + group - stages, total)
        )
        order = [nth(k, True) for k in range(warmup)]
        for k in range(total - warmup):
            order += [nth(warmup + k, True), nth(k, False)]
        order += [nth(k, False) for k in range(total - warmup, total)]
        orders.append(tuple(order))
    return tuple(orders)


def pipeline_order(
    stages: int, microbatches: int, chunks: int = 1
) -> tuple[tuple[Instruction, ...], ...]:
    """1F1B for one chunk per stage, interleaved 1F1B for more."""
    if chunks == 1:
        return one_f_one_b_order(stages, microbatches)
    return interleaved_order(stages, microbatches, chunks)


def _check(stages: int, microbatches: int) -> None:
    if stages < 1:
        raise ValueError(f"a pipeline needs at least 1 stage, got {stages}")
    if microbatches < 1:
        raise ValueError(f"an iteration needs at least 1 microbatch, got {microbatches}")


def format_instruction(instruction: Instruction, chunked: bool = False) -> str:
    """``(True, 3, 0)`` -> ``"F3"``, or ``"F3c0"`` when `chunked` (the frontier format's
    instruction names)."""
    forward, m, chunk = instruction
    return f"{'F' if forward else 'B'}{m}" + (f"c{chunk}" if chunked else "")


def upstream(stages: int, chunks: int, stage: int, instruction: Instruction) -> tuple[int, int]:
    """The (stage, chunk) whose output this instruction needs, or (-1, -1) for none: the model
    piece before it (forward) or after it (backward)."""
    forward, _, chunk = instruction
    piece = chunk * stages + stage + (-1 if forward else 1)
    if not 0 <= piece < stages * chunks:
        return -1, -1
    return piece % stages, piece // stages


def iteration_time_s(
    orders: Sequence[Sequence[Instruction]], duration_s: Callable[[int, Instruction], float]
) -> float:
    """Makespan of one iteration: the longest path of the pipeline's DAG, each instruction of
    stage s lasting ``duration_s(s, instruction)``, every stage starting at 0."""
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
