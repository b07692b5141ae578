"""Synchronous 1F1B: each stage's instruction order and the iteration time it implies.

Stage s of S (0-based) with M microbatches runs min(S-s-1, M) warm-up forwards, then alternates
one forward and one backward until every forward ran, then the remaining backwards. Across stages
F(s,m) needs F(s-1,m) (the activation) and B(s,m) needs B(s+1,m) (the gradient).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

__all__ = ["Instruction", "format_instruction", "iteration_time_s", "one_f_one_b_order"]

Instruction = tuple[bool, int]
"""(is_forward, microbatch)."""


def one_f_one_b_order(stages: int, microbatches: int) -> tuple[tuple[Instruction, ...], ...]:
    """Every stage's instruction order.

    >>> [[format_instruction(i) for i in o] for o in one_f_one_b_order(2, 3)]
    [['F0', 'F1', 'B0', 'F2', 'B1', 'B2'], ['F0', 'B0', 'F1', 'B1', 'F2', 'B2']]
    """
    if stages < 1:
        raise ValueError(f"a pipeline needs at least 1 stage, got {stages}")
    if microbatches < 1:
        raise ValueError(f"an iteration needs at least 1 microbatch, got {microbatches}")
    orders = []
    for s in range(stages):
        warmup = min(stages - s - 1, microbatches)
        order: list[Instruction] = [(True, m) for m in range(warmup)]
        next_backward = 0
        for m in range(warmup, microbatches):
            order.append((True, m))
            order.append((False, next_backward))
            next_backward += 1
        order.extend((False, m) for m in range(next_backward, microbatches))
        orders.append(tuple(order))
    return tuple(orders)


def format_instruction(instruction: Instruction) -> str:
    """``(True, 3)`` -> ``"F3"`` (the frontier format's instruction names)."""
    return f"{'F' if instruction[0] else 'B'}{instruction[1]}"


def iteration_time_s(
    orders: Sequence[Sequence[Instruction]], duration_s: Callable[[int, Instruction], float]
) -> float:
    """Makespan of one iteration: the longest path of the 1F1B DAG, each instruction of stage s
    lasting ``duration_s(s, instruction)``, every stage starting at 0."""
    stages = len(orders)
    end: dict[tuple[int, bool, int], float] = {}
    position = [0] * stages
    free_at = [0.0] * stages
    remaining = sum(len(o) for o in orders)
    while remaining:
        progressed = False
        for s in range(stages):
            while position[s] < len(orders[s]):
                forward, m = orders[s][position[s]]
                dep = (s - 1, True, m) if forward else (s + 1, False, m)
                has_dep = (s > 0) if forward else (s < stages - 1)
                if has_dep and dep not in end:
                    break
                start = max(free_at[s], end[dep] if has_dep else 0.0)
                free_at[s] = end[(s, forward, m)] = start + duration_s(s, (forward, m))
                position[s] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            raise ValueError("the instruction orders deadlock: not a valid pipeline schedule")
    return max(free_at)
