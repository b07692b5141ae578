"""Per-instruction energy from a coarse energy counter.

NVML's total-energy counter moves only every 20-100 ms while one instruction lasts 45-350 ms, so
no instruction can be read off the counter directly. Every interval between two counter updates
is one equation: the energy the counter gained equals, for each instruction overlapping the
interval, its energy times the fraction of it that falls inside (power taken as constant within
an instruction), plus idle power times the idle time inside. Over a few hundred intervals the
least-squares solution gives the forward energy, the backward energy and the idle (blocking)
power, and the residuals give their standard errors.

The design matrix is built without a windows x instructions matrix: how much of the instructions
lies before time t is a piecewise-linear function of t, evaluated at every counter update from
cumulative sums over the sorted begins and ends, so memory and time grow with windows +
instructions (times log instructions), not with their product.
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
    origin = samples[0][0]  # times relative to the first update keep the sums exact
    t = np.array([s[0] - origin for s in samples], dtype=np.float64)
    energy_j = np.array([s[1] for s in samples], dtype=np.float64) / 1000.0
    starts, stops = t[:-1], t[1:]
    delta_j = np.diff(energy_j)
    begin = np.array([i[1] - origin for i in instructions], dtype=np.float64)
    end = np.array([i[2] - origin for i in instructions], dtype=np.float64)
    forward = np.array([i[0] for i in instructions], dtype=bool)
    duration = np.maximum(end - begin, 1.0)
    done_f = _done_before(t, begin[forward], end[forward], 1.0 / duration[forward])
    done_b = _done_before(t, begin[~forward], end[~forward], 1.0 / duration[~forward])
    busy_ns = _done_before(t, begin, end, np.ones_like(begin))
    idle_s = np.clip((stops - starts) - np.diff(busy_ns), 0.0, None) * seconds_per_ns
    columns = [np.diff(done_f), np.diff(done_b), idle_s]
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


def _done_before(
    t: np.ndarray, begin: np.ndarray, end: np.ndarray, weight: np.ndarray
) -> np.ndarray:
    """At each time of `t`: the sum over instructions of weight x (time of it that lies before
    t), i.e. sum of w (t - b) over begins <= t minus sum of w (t - e) over ends <= t."""
    out = np.zeros_like(t)
    for edge, sign in ((begin, 1.0), (end, -1.0)):
        if not len(edge):
            continue
        order = np.argsort(edge, kind="stable")
        edges, w = edge[order], weight[order]
        cum_w = np.concatenate(([0.0], np.cumsum(w)))
        cum_we = np.concatenate(([0.0], np.cumsum(w * edges)))
        k = np.searchsorted(edges, t, side="right")
        out += sign * (t * cum_w[k] - cum_we[k])
    return out
