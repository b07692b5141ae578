"""Pure planner core: pipeline DAGs, the energy model and the time/energy frontier.

numpy and the standard library, plus highspy (HiGHS, for the LP relaxation; imported only when
planning); frozen dataclasses in and out, no I/O. The API the operator and the
CLI rely on:

- ``PipelineShape(stages, microbatches, schedule="1f1b", virtual_stages=1)`` (or
  ``"interleaved-1f1b"`` with v >= 2 model chunks per stage) and ``instruction_order(shape)``;
- ``compute_frontier(profile, pipeline, blocking_power_w, progress=None, *, config) -> Frontier``,
  searched as ``config`` (a ``SearchConfig``, the search's tuning knobs) says, its defaults
  (``DEFAULT_SEARCH``) unless given;
- ``plan_for_no_straggler(frontier, max_slowdown)`` / ``plan_for_straggler(frontier, pace_s)``;
- ``PacePlanner(profile, frontier, config).plan(pace_s) -> PacePlan``, the straggler's plan
  solved at its pace (never costlier than ``plan_for_straggler``), with the LP bound at that pace;
- ``evaluate_plan(profile, pipeline, blocking_power_w, frequencies_mhz) -> (time_s, energy_j)``,
  the exact cost of any plan, and ``stage_spans(...)``, each stage's predicted compute span.
"""

from perseus_operator.planner.config import DEFAULT_SEARCH, SearchConfig
from perseus_operator.planner.evaluate import evaluate_plan, stage_spans
from perseus_operator.planner.frontier import ProgressCallback, compute_frontier
from perseus_operator.planner.lookup import plan_for_no_straggler, plan_for_straggler
from perseus_operator.planner.pace import PacePlan, PacePlanner
from perseus_operator.planner.pipeline import SCHEDULES, PipelineShape, instruction_order
from perseus_operator.planner.plans import Frontier, Plan

__all__ = [
    "DEFAULT_SEARCH",
    "SCHEDULES",
    "Frontier",
    "PacePlan",
    "PacePlanner",
    "PipelineShape",
    "Plan",
    "ProgressCallback",
    "SearchConfig",
    "compute_frontier",
    "evaluate_plan",
    "instruction_order",
    "plan_for_no_straggler",
    "plan_for_straggler",
    "stage_spans",
]
