"""The iteration-time vs. energy frontier of per-instruction frequency plans.

API (stable; the operator and the CLI use it):

- ``compute_frontier(profile, pipeline, blocking_power_w, progress=None, *, config) -> Frontier``
  (`config`: the search's knobs, `config.SearchConfig`; its defaults unless given)
- ``Frontier`` (in `plans`, with ``Plan``): ``order`` (each stage's ``F<m>``/``B<m>``
  sequence), ``plans`` (sorted by iteration time; ``energy_j - blocking_power_w * stages *
  iteration_time_s`` strictly decreases, so every plan is the best choice at some pace),
  ``t0_s``/``baseline_energy_j`` (all GPUs at maximum clock), ``fastest``, ``t_star``
  (least-energy plan).

How the search works is told in `search`, which does it.
"""

from __future__ import annotations

import numpy as np

from perseus_operator.planner.config import DEFAULT_SEARCH, SearchConfig
from perseus_operator.planner.model import build_options
from perseus_operator.planner.pipeline import PipelineShape, build_dag
from perseus_operator.planner.plans import Frontier, useful
from perseus_operator.planner.relaxed import short_copy
from perseus_operator.planner.search import ProgressCallback, Search
from perseus_profiles import StageProfile

__all__ = ["ProgressCallback", "compute_frontier"]


def compute_frontier(
    profile: StageProfile,
    pipeline: PipelineShape,
    blocking_power_w: float,
    progress: ProgressCallback | None = None,
    *,
    config: SearchConfig = DEFAULT_SEARCH,
) -> Frontier:
    """The frontier of frequency plans for `pipeline` under `profile` (see the module doc),
    searched as `config` says."""
    if not np.isfinite(blocking_power_w) or blocking_power_w < 0:
        raise ValueError(f"blocking power must be a finite number >= 0 W, got {blocking_power_w}")
    dag = build_dag(pipeline)
    table = build_options(profile, dag, blocking_power_w)
    search = Search(dag, table, short_copy(profile, pipeline, blocking_power_w, config), config)
    candidates = search.run(progress)
    plans = useful(candidates, pipeline.stages * blocking_power_w)
    t0, e0 = search.baseline()
    return Frontier(
        pipeline=pipeline,
        blocking_power_w=float(blocking_power_w),
        order=dag.order,
        plans=tuple(search.to_plan(idx, t, e) for t, e, idx in plans),
        t0_s=t0,
        baseline_energy_j=e0,
    )
