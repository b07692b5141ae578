"""What the planner hands out: frequency plans with their real cost, the frontier of them, and
the rule that decides which plans belong on a frontier (`useful`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from perseus_operator.planner.pipeline import PipelineShape

__all__ = ["Frontier", "Plan", "useful"]

IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Plan:
    """One frequency plan and what it really costs under the profile (per pipeline: one GPU per
    stage). ``frequencies_mhz[s][i]`` is the clock for ``Frontier.order[s][i]``."""

    iteration_time_s: float
    energy_j: float
    frequencies_mhz: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class Frontier:
    pipeline: PipelineShape
    blocking_power_w: float
    order: tuple[tuple[str, ...], ...]
    plans: tuple[Plan, ...]
    t0_s: float
    """Iteration time with every GPU at its maximum clock."""
    baseline_energy_j: float
    """Energy with every GPU at its maximum clock."""

    @property
    def fastest(self) -> Plan:
        return self.plans[0]

    @property
    def t_star(self) -> Plan:
        """The least-energy plan (its time is T*)."""
        return min(self.plans, key=lambda p: p.energy_j)


def useful(
    candidates: list[tuple[float, float, IntArray]], idle_power_w: float
) -> list[tuple[float, float, IntArray]]:
    """Plans sorted by time whose `energy - idle_power*time` strictly decreases."""
    out: list[tuple[float, float, IntArray]] = []
    for t, e, idx in sorted(candidates, key=lambda c: (c[0], c[1])):
        if not out or e - idle_power_w * t < out[-1][1] - idle_power_w * out[-1][0]:
            out.append((t, e, idx))
    return out
