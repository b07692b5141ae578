"""Choosing a plan from a frontier at run time.

- No straggler: the least-energy plan no slower than ``T0 * (1 + max_slowdown)``.
- A straggler sets the pace at T': every other pipeline waits for it anyway, so the right plan
  minimises its own energy plus blocking power while it waits, ``E(t) + P_b*S*(T' - t)`` over
  plans with ``t <= T'``. Unlike the least ``E(t)`` (which stops at T*), this keeps slowing down
  past T* for as long as computing slower costs less than idling.
"""

from __future__ import annotations

import math

from perseus_operator.planner.plans import Frontier, Plan

__all__ = ["plan_for_no_straggler", "plan_for_straggler"]


def plan_for_no_straggler(frontier: Frontier, max_slowdown: float) -> Plan:
    """Least energy with ``t <= T0 * (1 + max_slowdown)``; the fastest plan if none is that fast
    (the frontier always has one no slower than T0, so that only happens for broken inputs)."""
    if not math.isfinite(max_slowdown) or max_slowdown < 0:
        raise ValueError(f"max_slowdown must be a finite number >= 0, got {max_slowdown}")
    limit_s = frontier.t0_s * (1 + max_slowdown)
    fitting = [p for p in frontier.plans if p.iteration_time_s <= limit_s]
    if not fitting:
        return frontier.fastest
    return min(fitting, key=lambda p: p.energy_j)


def plan_for_straggler(frontier: Frontier, pace_s: float) -> Plan:
    """The plan with ``t <= pace_s`` minimising ``energy_j + P_b*S*(pace_s - t)``; the fastest
    plan when even it cannot keep up with `pace_s`."""
    if not math.isfinite(pace_s) or pace_s <= 0:
        raise ValueError(f"pace must be a finite positive number of seconds, got {pace_s}")
    idle_power_w = frontier.blocking_power_w * frontier.pipeline.stages
    fitting = [p for p in frontier.plans if p.iteration_time_s <= pace_s]
    if not fitting:
        return frontier.fastest
    return min(fitting, key=lambda p: p.energy_j + idle_power_w * (pace_s - p.iteration_time_s))
