"""The observation of one reconcile pass, which the pure `reconcile.decide` reads: each node of
the job through its sidecar, then the planner's inputs (profile, frontier, the plans with and
without a straggler) and the energy figures (baseline, measured saving).

The controller (`controller.py`) runs the pass; this module does the gathering, keeping in the
policy's runtime what later passes build on (profile, frontier, straggler state, regimes).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import replace

from perseus_operator import accounting
from perseus_operator import reconcile as rc
from perseus_operator.model import EnergyPolicySpec
from perseus_operator.plan_source import PlanSource
from perseus_operator.profile_source import ProfileSource
from perseus_operator.sidecars import NodeSnapshot, SidecarGateway, SidecarUnreachableError
from perseus_operator.state import PodRecord, PolicyRuntime, Regime
from perseus_operator.status_views import effective_blocking_w, frontier_view, plan_view
from perseus_operator.straggler import update as straggler_update
from perseus_sidecar.api import PipelineTimings, RankTimings

__all__ = ["Observer"]


class Observer:
    """Gathers what one pass of a policy needs to decide, through the sidecars, the profile
    source and the planner."""

    def __init__(
        self,
        gateway: SidecarGateway,
        profiles: ProfileSource,
        plans: PlanSource,
        *,
        baseline_iterations: int,
        measure_iterations: int,
        max_window_s: float,
        max_plan_instructions: int,
    ) -> None:
        self.gateway = gateway
        self.profiles = profiles
        self.plans = plans
        self.baseline_iterations = baseline_iterations
        self.measure_iterations = measure_iterations
        self.max_window_s = max_window_s
        self.max_plan_instructions = max_plan_instructions

    async def nodes(
        self, rt: PolicyRuntime, running: list[PodRecord], sidecars: Mapping[str, str]
    ) -> tuple[dict[str, rc.NodeView], dict[str, NodeSnapshot]]:
        """Each node of the running pods, and each the job used before, through its sidecar:
        the view `decide` reads and the snapshot acting needs (absent where unreachable)."""
        wanted = {p.node_name for p in running if p.node_name}
        wanted |= set(rt.gpu_models)  # nodes the job used before: schedules may remain there
        window_s = self._window_s(rt)

        async def one(node: str) -> tuple[str, rc.NodeView, NodeSnapshot | None]:
            address = sidecars.get(node)
            if address is None:
                return node, rc.NodeView(has_sidecar=False), None
            try:
                snap = await self.gateway.snapshot(address, rt.namespace, rt.name, window_s)
            except SidecarUnreachableError as exc:
                return node, rc.NodeView(True, False, unreachable_reason=str(exc)), None
            if node not in rt.gpu_models:
                rt.gpu_models[node] = snap.gpu_model
            view = rc.NodeView(
                has_sidecar=True,
                reachable=True,
                announced_pods=snap.announced_pods,
                ranks=tuple(
                    rc.RankView(r.data_rank, r.pipeline_rank, r.tensor_rank, r.pod)
                    for r in snap.timings.ranks
                )
                if snap.timings is not None
                else (),
                entries=snap.entries,
            )
            return node, view, snap

        results = await asyncio.gather(*(one(n) for n in sorted(wanted)))
        views = {n: v for n, v, _ in results}
        snaps = {n: s for n, _, s in results if s is not None}
        return views, snaps

    def _window_s(self, rt: PolicyRuntime) -> float:
        if rt.regime.since_wall_s <= 0:
            return self.max_window_s
        return max(0.001, min(self.max_window_s, time.time() - rt.regime.since_wall_s))

    async def plan_inputs(
        self,
        rt: PolicyRuntime,
        spec: EnergyPolicySpec,
        obs: rc.Observed,
        snaps: Mapping[str, NodeSnapshot],
    ) -> rc.Observed:
        """`obs` with the planner's inputs and the energy figures, each step taken once the one
        before it is there: size check, profile, baseline, frontier, stragglers, saving."""
        instructions = 2 * spec.pipeline.stages * spec.pipeline.microbatches
        if instructions > self.max_plan_instructions:
            msg = (
                f"{spec.pipeline.stages} stages x {spec.pipeline.microbatches} microbatches are"
                f" {instructions} instructions per pipeline; the operator plans at most"
                f" {self.max_plan_instructions} (PERSEUS_OPERATOR_MAX_PLAN_INSTRUCTIONS)"
            )
            return replace(obs, plan_error=msg, plan_error_reason="TooLarge")
        if rt.plan_failure is not None and rt.plan_failure.generation == obs.generation:
            # Recorded (also across a restart): no new attempt until the spec changes.
            failed = rt.plan_failure
            return replace(obs, plan_error=failed.message, plan_error_reason=failed.reason)
        registered = sum(len(v.ranks) for v in obs.nodes.values())
        everyone = registered >= spec.pipeline.ranks
        if not snaps or (not everyone and rt.profile is None and spec.profile.measure is not None):
            return obs  # a sweep needs every rank; an import does not: it overlaps the startup
        await self.profiles.ensure(rt, spec, snaps)
        if rt.profile_error is not None:
            view = rc.ProfileView("invalid", rt.profile_error, rt.profile_error_reason)
            return replace(obs, profile=view)
        if rt.profile is None:
            state = "measuring" if rt.profiling is not None else "missing"
            return replace(obs, profile=rc.ProfileView(state, rt.profile_msg))  # type: ignore[arg-type]
        obs = replace(obs, profile=rc.ProfileView("ready", rt.profile_msg))
        ranks = rc.job_ranks(
            ((n, s.timings.ranks) for n, s in snaps.items() if s.timings is not None),
            obs.pods,
            spec.pipeline,
        )
        if spec.mode == "Optimize" and rt.baseline is None:
            self._measure_baseline(rt, spec, ranks)  # while the planner works, not after it
        await self.plans.ensure_frontier(rt, spec, obs.generation)
        if rt.plan_failure is not None:
            failed = rt.plan_failure
            return replace(obs, plan_error=failed.message, plan_error_reason=failed.reason)
        if rt.frontier is None or rt.plan is None:
            return obs
        frontier = rt.frontier
        fview = frontier_view(frontier)
        obs = replace(
            obs, frontier=fview, plan=rt.plan, blocking_power_w=effective_blocking_w(rt, spec)
        )
        if spec.mode == "Observe":
            return obs
        pipelines = [
            p for s in snaps.values() if s.timings is not None for p in s.timings.pipelines
        ]
        await self._track_stragglers(rt, spec, pipelines)
        obs = replace(
            obs,
            straggler=rt.straggler.straggler,
            straggler_plan=rt.straggler_plan,
            straggler_pace_s=rt.straggler.pace_s,
        )
        self._measure_saving(rt, spec, ranks)
        return replace(
            obs,
            baseline_ready=rt.baseline is not None,
            measured_saving_percent=rt.measured_saving,
        )

    async def _track_stragglers(
        self, rt: PolicyRuntime, spec: EnergyPolicySpec, pipelines: list[PipelineTimings]
    ) -> None:
        assert rt.plan is not None and rt.frontier is not None and rt.profile is not None
        if not spec.stragglers.enabled or spec.pipeline.data_parallel < 2:
            return
        if rt.regime.name in ("none", "baseline"):
            return
        samples, rt.last_spans = accounting.straggler_samples(
            pipelines,
            rt.last_spans,
            plan_span_s=rt.plan.stage0_span_s,
            straggler=rt.straggler.straggler,
            follower_span_s=rt.straggler_plan.stage0_span_s if rt.straggler_plan else None,
        )
        if not samples:
            return
        verdict = straggler_update(
            rt.straggler,
            samples,
            threshold=spec.stragglers.threshold,
            iterations=spec.stragglers.iterations,
        )
        rt.straggler = verdict.state
        if verdict.changed:
            if verdict.state.straggler is None or verdict.state.pace_s is None:
                rt.straggler_plan = None
            else:
                chosen = await self.plans.straggler_plan(rt, verdict.state.pace_s)
                rt.straggler_plan = plan_view(rt.profile, rt.frontier, chosen)

    def _measure_baseline(
        self, rt: PolicyRuntime, spec: EnergyPolicySpec, ranks: list[RankTimings]
    ) -> None:
        """All-max-clock energy per iteration of the whole job (its counted ranks only), over a
        window with no schedule that starts once every rank is there."""
        if len(ranks) < spec.pipeline.ranks:
            return
        if rt.regime.name != "baseline":
            rt.regime = Regime("baseline", time.time())
            return
        rt.baseline = accounting.measure_baseline(
            ranks, expected_ranks=spec.pipeline.ranks, iterations=self.baseline_iterations
        )

    def _measure_saving(
        self, rt: PolicyRuntime, spec: EnergyPolicySpec, ranks: list[RankTimings]
    ) -> None:
        """The saving measured over the window of the plan now running (kept until a new one
        has enough iterations)."""
        if rt.baseline is None or not rt.regime.name.startswith("plan:"):
            return
        saving = accounting.measured_saving_percent(
            ranks,
            rt.baseline,
            expected_ranks=spec.pipeline.ranks,
            iterations=self.measure_iterations,
            straggler=rt.straggler.straggler if rt.straggler_plan is not None else None,
            blocking_w=effective_blocking_w(rt, spec),
        )
        if saving is not None:
            rt.measured_saving = saving
