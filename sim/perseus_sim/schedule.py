"""Pipeline schedules for the simulated trainer: each stage's instruction order and the
iteration time it implies. They are the shared vocabulary of `perseus_hooks.pipeline` (the
planner builds its DAG on the same functions), named here for the simulator's modules.
"""

from __future__ import annotations

from perseus_hooks.pipeline import (
    Instruction,
    format_instruction,
    interleaved_order,
    iteration_time_s,
    one_f_one_b_order,
    pipeline_order,
    upstream,
)

__all__ = [
    "Instruction",
    "format_instruction",
    "interleaved_order",
    "iteration_time_s",
    "one_f_one_b_order",
    "pipeline_order",
    "upstream",
]
