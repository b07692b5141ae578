"""Per-instruction energy from a coarse energy counter.

NVML's total-energy counter moves only every 20-100 ms while one instruction lasts 45-350 ms, so
no instruction can be read off the counter directly. Every interval between two counter updates
is one equation: the energy the counter gained equals, for each instruction overlapping the
interval, its energy times the fraction of it that falls inside (power taken as constant within
an instruction), plus idle power times the idle time inside. Over a few hundred intervals the
least-squares solution gives the forward energy, the backward energy and the idle (blocking)
power, and the residuals give their standard errors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["EnergyEstimate", "estimate_energy"]


@dataclass(frozen=True)
class EnergyEstimate:
    forward_j: float
    forward_stderr_j: float
    backward_j: float
    backward_stderr_j: float
    idle_w: float | None
    idle_stderr_w: float | None
    windows: int


def estimate_energy(
    instructions: Sequence[tuple[bool, int, int]],
    samples: Sequence[tuple[int, int]],
    seconds_per_ns: float = 1e-9,
) -> EnergyEstimate | None:
    """Least-squares forward/backward energy (J) and idle power (W).

    `instructions` are (is_forward, begin_ns, end_ns) on one GPU, `samples` the counter updates
    (t_ns, total_mj) in time order, both covering the same period at one clock. None when the
    data cannot determine the unknowns (too few updates, or only one kind of instruction)."""
    if len(samples) < 5 or not instructions:
        return None
    t = np.array([s[0] for s in samples], dtype=np.float64)
    energy_j = np.array([s[1] for s in samples], dtype=np.float64) / 1000.0
    starts, stops = t[:-1], t[1:]
    delta_j = np.diff(energy_j)
    begin = np.array([i[1] for i in instructions], dtype=np.float64)
    end = np.array([i[2] for i in instructions], dtype=np.float64)
    forward = np.array([i[0] for i in instructions], dtype=bool)
    duration = np.maximum(end - begin, 1.0)
    overlap = np.clip(
        np.minimum(end[None, :], stops[:, None]) - np.maximum(begin[None, :], starts[:, None]),
        0.0,
        None,
    )
    fraction = overlap / duration[None, :]
    idle_s = np.clip((stops - starts) - overlap.sum(axis=1), 0.0, None) * seconds_per_ns
    columns = [fraction[:, forward].sum(axis=1), fraction[:, ~forward].sum(axis=1), idle_s]
    if columns[0].sum() <= 0 or columns[1].sum() <= 0:
        return None
    has_idle = columns[2].sum() > 1e-3 * float((stops - starts).sum() * seconds_per_ns)
    design = np.column_stack(columns if has_idle else columns[:2])
    unknowns = design.shape[1]
    if len(delta_j) <= unknowns:
        return None
    solution, _, matrix_rank, _ = np.linalg.lstsq(design, delta_j, rcond=None)
    if matrix_rank < unknowns:
        return None
    residual = delta_j - design @ solution
    dof = len(delta_j) - unknowns
    variance = float(residual @ residual) / dof
    stderr = np.sqrt(np.clip(np.diag(np.linalg.inv(design.T @ design)) * variance, 0.0, None))
    return EnergyEstimate(
        forward_j=float(solution[0]),
        forward_stderr_j=float(stderr[0]),
        backward_j=float(solution[1]),
        backward_stderr_j=float(stderr[1]),
        idle_w=float(solution[2]) if has_idle else None,
        idle_stderr_w=float(stderr[2]) if has_idle else None,
        windows=len(delta_j),
    )
