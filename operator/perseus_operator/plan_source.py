"""Plans for a policy: the frontier (planned in a child process, shared by the policies of
identical jobs) and the plan at a straggler's pace (solved in a worker thread, by a pace planner
prepared in the background as soon as the frontier lands, so the first straggler does not wait
for the LP from scratch)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from concurrent.futures import Future, ThreadPoolExecutor

from perseus_operator.model import EnergyPolicySpec
from perseus_operator.plan_process import Planner, PlanningError
from perseus_operator.planner import (
    Frontier,
    PacePlanner,
    PipelineShape,
    Plan,
    plan_for_no_straggler,
    plan_for_straggler,
)
from perseus_operator.state import PlanFailureRecord, PolicyRuntime
from perseus_operator.status_views import effective_blocking_w, plan_view
from perseus_operator.straggler import StragglerState
from perseus_profiles import StageProfile

__all__ = ["PlanSource"]

log = logging.getLogger("perseus.operator")


class PlanSource:
    """Runs the planner for every policy of the operator, with a small cache of frontiers."""

    def __init__(self, plan: Planner, *, cache_size: int = 64) -> None:
        self.plan = plan
        self.cache_size = cache_size
        self._frontiers: dict[tuple[str, PipelineShape, float], Frontier] = {}
        # One pace planner per frontier, prepared one at a time off the event loop.
        self._pace_planners: dict[tuple[str, PipelineShape, float], Future[PacePlanner | None]]
        self._pace_planners = {}
        self._preparer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="perseus-pace")

    async def ensure_frontier(
        self, rt: PolicyRuntime, spec: EnergyPolicySpec, generation: int
    ) -> None:
        """The frontier of the policy's profile, shape and blocking power in `rt.frontier`, and
        the plan with no straggler in `rt.plan`; a failure is recorded for this generation."""
        assert rt.profile is not None
        pipe = spec.pipeline
        shape = PipelineShape(pipe.stages, pipe.microbatches, pipe.schedule, pipe.virtual_stages)
        blocking_w = effective_blocking_w(rt, spec)
        sig = (rt.profile_cm, id(rt.profile), shape, blocking_w, spec.max_slowdown)
        if rt.frontier_sig == sig:
            return
        profile = rt.profile
        key = (hashlib.sha256(profile.to_csv().encode()).hexdigest(), shape, blocking_w)
        frontier = self._frontiers.get(key)
        if frontier is None:
            # Policies of identical jobs share one frontier: the planner's CPU runs once. It
            # runs in a child process, whose memory cannot take the operator down.
            try:
                frontier = await self.plan(profile, shape, blocking_w)
            except PlanningError as exc:
                log.warning("%s/%s: %s", rt.namespace, rt.name, exc.message)
                rt.plan_failure = PlanFailureRecord(generation, exc.reason, exc.message)
                return
            self._frontiers[key] = frontier
            while len(self._frontiers) > self.cache_size:
                evicted = next(iter(self._frontiers))
                self._frontiers.pop(evicted)
                self._pace_planners.pop(evicted, None)
        rt.frontier, rt.frontier_sig, rt.plan_failure = frontier, sig, None
        rt.plan = plan_view(profile, frontier, plan_for_no_straggler(frontier, spec.max_slowdown))
        rt.straggler, rt.straggler_plan, rt.last_spans = StragglerState(), None, {}
        rt.pace_planner = None
        if key not in self._pace_planners:
            self._pace_planners[key] = self._preparer.submit(_prepared, profile, frontier)
        rt.pace_planner_ready = self._pace_planners[key]

    async def straggler_plan(self, rt: PolicyRuntime, pace_s: float) -> Plan:
        """The plan for a straggler's pace, solved at the pace (in a worker thread: up to a few
        tenths of a second) and never costlier than the frontier lookup, which stays the
        fallback if the solve fails."""
        assert rt.frontier is not None and rt.profile is not None
        try:
            if rt.pace_planner is None and rt.pace_planner_ready is not None:
                rt.pace_planner = await asyncio.wrap_future(rt.pace_planner_ready)
            if rt.pace_planner is None:  # not prepared (or preparing it failed): build one
                rt.pace_planner = await asyncio.to_thread(PacePlanner, rt.profile, rt.frontier)
            return (await asyncio.to_thread(rt.pace_planner.plan, pace_s)).plan
        except Exception as exc:  # a failed solve must not leave the others without a plan
            log.warning(
                "%s/%s: solving the straggler's pace failed (%s); using the frontier lookup",
                rt.namespace,
                rt.name,
                exc,
            )
            return plan_for_straggler(rt.frontier, pace_s)


def _prepared(profile: StageProfile, frontier: Frontier) -> PacePlanner | None:
    """A pace planner for `frontier`, prepared (see `PacePlanner.prepare`); None if it cannot be
    built (the straggler path then builds one itself, and falls back to the lookup). A failed
    preparation leaves a working planner that starts its LP from scratch."""
    try:
        planner = PacePlanner(profile, frontier)
    except Exception:
        log.exception("building the straggler planner failed")
        return None
    try:
        planner.prepare()
    except Exception:
        log.exception("preparing the straggler planner failed; its solves start from scratch")
    return planner
