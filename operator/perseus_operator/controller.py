"""One policy's reconcile loop: gather an observation, call the pure `decide`, act, write status.

The kopf handlers (`handlers.py`) run :meth:`Controller.run_policy` as a daemon per EnergyPolicy
and wake it on spec changes. Everything slow or remote happens here: sidecar calls (through
`SidecarGateway`), planning (in a worker thread), the profile store and the status patch.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from perseus_operator import reconcile as rc
from perseus_operator.model import CLUSTER_SCOPE, EnergyPolicySpec, SpecError, parse_spec
from perseus_operator.plan_process import Planner, PlanningError, plan_in_subprocess
from perseus_operator.planner import (
    Frontier,
    PacePlanner,
    PipelineShape,
    Plan,
    plan_for_no_straggler,
    plan_for_straggler,
)
from perseus_operator.profiling import ProfileSession
from perseus_operator.sidecars import (
    NodeSnapshot,
    SidecarGateway,
    SidecarRejectedError,
    SidecarUnreachableError,
)
from perseus_operator.state import (
    EventSink,
    PlanFailureRecord,
    PodRecord,
    PolicyRecord,
    PolicyRuntime,
    Regime,
    Store,
)
from perseus_operator.status_views import (
    ImplausibleProfileError,
    check_plausible,
    check_profile,
    effective_blocking_w,
    enough_samples,
    frontier_view,
    mean_present,
    merge_patch,
    plan_view,
    regime_name,
    straggler_status,
)
from perseus_operator.straggler import Sample, StragglerState
from perseus_operator.straggler import update as straggler_update
from perseus_profiles import ProfileError, StageProfile, parse_profile_csv
from perseus_sidecar.api import RankTimings

__all__ = ["Controller", "cleanup_policy"]

log = logging.getLogger("perseus.operator")


class Controller:
    """Shared by every policy daemon: the API facade, the sidecar gateway and the indices."""

    def __init__(
        self,
        store: Store,
        gateway: SidecarGateway,
        *,
        profile_namespace: str,
        baseline_iterations: int = 5,
        measure_iterations: int = 5,
        max_window_s: float = 60.0,
        max_plan_instructions: int = 16384,
        plan: Planner | None = None,
        emit: EventSink | None = None,
    ) -> None:
        self.store = store
        self.gateway = gateway
        self.profile_namespace = profile_namespace
        self.baseline_iterations = baseline_iterations
        self.measure_iterations = measure_iterations
        self.max_window_s = max_window_s
        self.max_plan_instructions = max_plan_instructions
        self.plan: Planner = plan or (
            lambda profile, shape, blocking_w: plan_in_subprocess(
                profile, shape, blocking_w, memory_mib=1024, timeout_s=300.0
            )
        )
        self.emit: EventSink = emit or (lambda body, event: None)
        self.runtimes: dict[tuple[str, str], PolicyRuntime] = {}
        self._frontiers: dict[tuple[str, PipelineShape, float], Frontier] = {}

    def runtime(self, namespace: str, name: str) -> PolicyRuntime:
        key = (namespace, name)
        if key not in self.runtimes:
            self.runtimes[key] = PolicyRuntime(namespace, name)
        return self.runtimes[key]

    def wake(self, namespace: str, name: str) -> None:
        rt = self.runtimes.get((namespace, name))
        if rt is not None:
            rt.wake.set()

    async def run_policy(
        self,
        body: Mapping[str, Any],
        *,
        pods: Callable[[], Iterable[PodRecord]],
        sidecars: Callable[[], Mapping[str, str]],
        others: Callable[[], Iterable[PolicyRecord]],
        stopped: Callable[[], bool],
        tick_s: float,
    ) -> None:
        """The daemon body: reconcile every `tick_s` or as soon as woken, until stopped."""
        meta = body["metadata"]
        rt = self.runtime(meta["namespace"], meta["name"])
        while not stopped() and not body["metadata"].get("deletionTimestamp"):
            started = time.monotonic()
            try:
                await self.reconcile_once(body, rt, list(pods()), sidecars(), list(others()))
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("reconcile of %s/%s failed; retrying", rt.namespace, rt.name)
            # Start to start: a slow pass does not stretch the period a timing change waits.
            pause_s = max(0.05, tick_s - (time.monotonic() - started))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(rt.wake.wait(), timeout=pause_s)
            rt.wake.clear()

    # ---- one pass ----------------------------------------------------------------------------

    async def reconcile_once(
        self,
        body: Mapping[str, Any],
        rt: PolicyRuntime,
        pods: list[PodRecord],
        sidecars: Mapping[str, str],
        others: list[PolicyRecord],
    ) -> rc.Decision:
        meta = body["metadata"]
        generation = int(meta.get("generation") or 0)
        status = body.get("status") or {}
        if not rt.last_status and status:
            self._resume(rt, status, generation)
        try:
            spec: EnergyPolicySpec | None = parse_spec(body.get("spec") or {})
            spec_error = None
        except SpecError as exc:
            spec, spec_error = None, str(exc)
        selected = [p for p in pods if spec is not None and spec.selector.matches(dict(p.labels))]
        conflict = self._conflict(rt, meta, selected, others) if spec is not None else None
        running = [p for p in selected if p.view().running]
        rt.had_pods = rt.had_pods or bool(selected)
        nodes: dict[str, rc.NodeView] = {}
        snapshots: dict[str, NodeSnapshot] = {}
        if spec is not None and running and conflict is None:
            if rt.token is None:
                rt.token = await self.store.ensure_job_token(rt.namespace, rt.name, meta["uid"])
            nodes, snapshots = await self._observe_nodes(rt, running, sidecars)
        elif rt.last_status.get("phase") in ("Optimizing", "Degraded", "Planning", "Profiling"):
            # Stopping: reach every node the job used so its schedules can be removed.
            nodes, snapshots = await self._observe_nodes(rt, [], sidecars)
        obs = rc.Observed(
            generation=generation,
            spec=spec,
            spec_error=spec_error,
            conflict_with=conflict,
            pods=tuple(p.view() for p in selected),
            had_pods=rt.had_pods,
            nodes=nodes,
            was_optimizing=rt.was_optimizing,
        )
        if rt.plan_failure is not None and rt.plan_failure.generation != generation:
            rt.plan_failure = None  # the spec changed: planning may be tried again
        if spec is not None and conflict is None and running and not spec.suspend:
            obs = await self._plan_inputs(rt, spec, obs, snapshots)
        decision = rc.decide(obs)
        applied, rejected = await self._act(rt, decision, snapshots, spec)
        applying = any(isinstance(a, rc.ApplySchedule) for a in decision.actions)
        if applied or rejected:
            # Report what the sidecars now hold (or refused), not what they held a moment ago.
            nodes = {n: replace(v, entries=applied.get(n, v.entries)) for n, v in obs.nodes.items()}
            after = replace(obs, nodes=nodes, rejected="; ".join(rejected) or None)
            decision = replace(rc.decide(after), actions=decision.actions)
        if decision.optimizing and not applying and rt.regime.name != regime_name(rt):
            # The sidecars already run the plan (an operator restart): measure from now on.
            rt.regime = Regime(regime_name(rt), time.time())
        rt.was_optimizing = decision.optimizing
        await self._write_status(body, rt, decision, generation)
        return decision

    @staticmethod
    def _conflict(
        rt: PolicyRuntime,
        meta: Mapping[str, Any],
        selected: list[PodRecord],
        others: list[PolicyRecord],
    ) -> str | None:
        """The name of an older policy (creation time, then name) selecting any of these pods;
        cached until the policies or the pods change."""
        mine = (meta.get("creationTimestamp") or "", meta["name"])
        older = tuple(
            o for o in others if not o.deleting and (o.created, o.name) < mine and o.name != mine[1]
        )
        key = (older, tuple(p.name for p in selected))
        if rt.conflict_key == key:
            return rt.conflict
        rt.conflict_key = key
        rt.conflict = next(
            (o.name for o in older if any(o.selects(p.labels) for p in selected)), None
        )
        return rt.conflict

    def _resume(self, rt: PolicyRuntime, status: Mapping[str, Any], generation: int) -> None:
        """After an operator restart: the measured baseline, the phase and a planning failure of
        this very spec come from the status."""
        failed = status.get("planFailure") or {}
        if failed.get("generation") == generation and failed.get("message"):
            rt.plan_failure = PlanFailureRecord(
                generation, str(failed.get("reason") or "PlanningFailed"), str(failed["message"])
            )
        base = status.get("measuredBaseline") or {}
        if base.get("energyJoules") and base.get("iterationTimeSeconds"):
            rt.baseline_j = float(base["energyJoules"])
            rt.baseline_iteration_s = float(base["iterationTimeSeconds"])
            rt.baseline_gpus = int(base.get("gpus") or 0)
        saving = status.get("measuredSavingPercent")
        rt.measured_saving = float(saving) if saving is not None else None
        rt.was_optimizing = status.get("phase") in ("Optimizing", "Degraded")
        rt.had_pods = status.get("phase") in ("Optimizing", "Degraded", "Completed")
        rt.last_status = dict(status)

    async def _observe_nodes(
        self, rt: PolicyRuntime, running: list[PodRecord], sidecars: Mapping[str, str]
    ) -> tuple[dict[str, rc.NodeView], dict[str, NodeSnapshot]]:
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

    # ---- profile, frontier, plans, stragglers, energy ---------------------------------------

    async def _plan_inputs(
        self,
        rt: PolicyRuntime,
        spec: EnergyPolicySpec,
        obs: rc.Observed,
        snaps: Mapping[str, NodeSnapshot],
    ) -> rc.Observed:
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
        await self._ensure_profile(rt, spec, snaps)
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
        if spec.mode == "Optimize" and rt.baseline_j is None:
            self._measure_baseline(rt, spec, ranks)  # while the planner works, not after it
        await self._ensure_frontier(rt, spec, obs.generation)
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
        timings = [s.timings for s in snaps.values() if s.timings is not None]
        await self._track_stragglers(rt, spec, timings)
        obs = replace(
            obs,
            straggler=rt.straggler.straggler,
            straggler_plan=rt.straggler_plan,
            straggler_pace_s=rt.straggler.pace_s,
        )
        self._measure_saving(rt, spec, ranks)
        return replace(
            obs,
            baseline_ready=rt.baseline_j is not None,
            measured_saving_percent=rt.measured_saving,
        )

    async def _ensure_profile(
        self, rt: PolicyRuntime, spec: EnergyPolicySpec, snaps: Mapping[str, NodeSnapshot]
    ) -> None:
        model, clocks = next(iter(sorted(s.gpu_model for s in snaps.values())))
        source = spec.profile
        # A per-chunk profile (interleaved 1F1B) is stored apart from the model's 1F1B one.
        chunks = spec.pipeline.virtual_stages
        store_key = spec.profile_key if chunks == 1 else f"{spec.profile_key}@v{chunks}"
        sig = (
            model,
            spec.pipeline.stages,
            spec.pipeline.tensor_parallel,
            store_key,
            spec.profile_scope,
            source.import_.config_map if source.import_ else None,
            source.import_.key if source.import_ else None,
        )
        if rt.profile_sig == sig and (rt.profile is not None or rt.profile_error is not None):
            return
        if rt.profile_sig != sig:
            rt.profile, rt.profile_error, rt.profiling, rt.profile_sig = None, None, None, sig
            rt.profile_error_reason = "ProfileInvalid"
        all_clocks = frozenset.intersection(*(s.gpu_model[1] for s in snaps.values()))
        scope = CLUSTER_SCOPE if spec.profile_scope == "Cluster" else rt.namespace
        if source.import_ is not None:
            # The policy names its own profile: a stored one never replaces it.
            imp = source.import_
            text = await self.store.read_configmap_key(rt.namespace, imp.config_map, imp.key)
            if text is None:
                rt.profile_msg = f"waiting for ConfigMap {imp.config_map} with key {imp.key}"
                rt.profile_sig = None  # look again next time
                return
            try:
                profile = check_profile(parse_profile_csv(text), spec, all_clocks)
            except ProfileError as exc:
                self._profile_failed(rt, f"ConfigMap {imp.config_map} key {imp.key}: {exc}", exc)
                return
            source_note = f"imported from {rt.namespace}/{imp.config_map}"
        else:
            # Looked up before a sweep starts, not on every pass of it.
            if rt.profiling is None and await self._use_stored_profile(
                rt, spec, scope, model, all_clocks
            ):
                return
            assert source.measure is not None
            profile_or_none = await self._measure_profile(rt, spec, snaps, clocks)
            if profile_or_none is None:
                return
            try:
                profile = check_plausible(profile_or_none)
            except ProfileError as exc:
                self._profile_failed(rt, f"the measured profile: {exc}", exc)
                return
            source_note = "measured through the sidecars"
        name = await self.store.store_profile(
            self.profile_namespace,
            scope=scope,
            gpu_model=model,
            stages=spec.pipeline.stages,
            tensor_parallel=spec.pipeline.tensor_parallel,
            key=store_key,
            csv_text=profile.to_csv(),
            source=source_note,
            blocking_power_w=rt.blocking_w,
        )
        rt.profile, rt.profile_cm = profile, name
        rt.profile_msg = f"{source_note}; stored as {self.profile_namespace}/{name} ({model})"

    @staticmethod
    def _profile_failed(rt: PolicyRuntime, message: str, exc: ProfileError) -> None:
        rt.profile_error = message
        implausible = isinstance(exc, ImplausibleProfileError)
        rt.profile_error_reason = "ProfileImplausible" if implausible else "ProfileInvalid"

    async def _use_stored_profile(
        self,
        rt: PolicyRuntime,
        spec: EnergyPolicySpec,
        scope: str,
        model: str,
        clocks: frozenset[int],
    ) -> bool:
        """Take the profile stored for this scope and key, if one is there and fits: a measuring
        policy then skips its sweep."""
        stored = await self.store.load_profile(
            self.profile_namespace,
            scope=scope,
            gpu_model=model,
            stages=spec.pipeline.stages,
            tensor_parallel=spec.pipeline.tensor_parallel,
            key=spec.profile_key,
        )
        if stored is None:
            return False
        try:
            profile = check_profile(parse_profile_csv(stored[1]), spec, clocks)
        except ProfileError as exc:
            log.warning("stored profile %s unusable (%s); measuring again", stored[0], exc)
            return False
        rt.profile, rt.profile_cm, rt.blocking_w = profile, stored[0], stored[2]
        rt.profiling = None
        rt.profile_msg = f"stored profile {self.profile_namespace}/{stored[0]} ({model})"
        return True

    async def _measure_profile(
        self,
        rt: PolicyRuntime,
        spec: EnergyPolicySpec,
        snaps: Mapping[str, NodeSnapshot],
        clocks: frozenset[int],
    ) -> StageProfile | None:
        measure = spec.profile.measure
        assert measure is not None
        if rt.profiling is None:
            rt.profiling = ProfileSession.create(
                clocks,
                measure,
                stages=spec.pipeline.stages,
            )
        session = rt.profiling
        addresses = {n: s.address for n, s in snaps.items()}
        try:
            done = await session.step(self.gateway, addresses, rt.namespace, rt.name)
        except (SidecarUnreachableError, ProfileError) as exc:
            rt.profile_msg = f"profiling: {exc}"
            return None
        rt.profile_msg = session.progress()
        if not done:
            return None
        rt.profiling = None
        rt.blocking_w = session.blocking_power_w()
        if rt.blocking_w is None and spec.blocking_power_w is None:
            rt.profile_error = "profiling measured no blocking power: set spec.blockingPowerW"
            return None
        try:
            return session.result()
        except ProfileError as exc:
            rt.profile_error = f"profiling produced no usable profile: {exc}"
            return None

    async def _ensure_frontier(
        self, rt: PolicyRuntime, spec: EnergyPolicySpec, generation: int
    ) -> None:
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
            while len(self._frontiers) > 64:
                self._frontiers.pop(next(iter(self._frontiers)))
        rt.frontier, rt.frontier_sig, rt.plan_failure = frontier, sig, None
        rt.plan = plan_view(profile, frontier, plan_for_no_straggler(frontier, spec.max_slowdown))
        rt.straggler, rt.straggler_plan, rt.last_spans = StragglerState(), None, {}
        rt.pace_planner = None

    async def _track_stragglers(
        self, rt: PolicyRuntime, spec: EnergyPolicySpec, timings: list[Any]
    ) -> None:
        assert rt.plan is not None and rt.frontier is not None and rt.profile is not None
        if not spec.stragglers.enabled or spec.pipeline.data_parallel < 2:
            return
        if rt.regime.name in ("none", "baseline"):
            return
        samples = []
        for t in timings:
            for p in t.pipelines:
                span = p.stage0_span_last_s
                if span is None or rt.last_spans.get(p.data_rank) == span:
                    continue
                rt.last_spans[p.data_rank] = span
                plan = rt.plan
                if rt.straggler.straggler not in (None, p.data_rank) and rt.straggler_plan:
                    plan = rt.straggler_plan
                samples.append(Sample(p.data_rank, span, plan.stage0_span_s))
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
                chosen = await self._straggler_plan(rt, verdict.state.pace_s)
                rt.straggler_plan = plan_view(rt.profile, rt.frontier, chosen)

    async def _straggler_plan(self, rt: PolicyRuntime, pace_s: float) -> Plan:
        """The plan for a straggler's pace, solved at the pace (in a worker thread: up to a few
        tenths of a second) and never costlier than the frontier lookup, which stays the
        fallback if the solve fails."""
        assert rt.frontier is not None and rt.profile is not None
        try:
            if rt.pace_planner is None:
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

    def _measure_baseline(
        self, rt: PolicyRuntime, spec: EnergyPolicySpec, ranks: list[RankTimings]
    ) -> None:
        """All-max-clock energy per iteration of the whole job (its counted ranks only), over a
        window with no schedule."""
        if len(ranks) < spec.pipeline.ranks:
            return
        if rt.regime.name != "baseline":
            rt.regime = Regime("baseline", time.time())
            return
        if any(r.schedule_active for r in ranks) or not enough_samples(
            ranks, self.baseline_iterations
        ):
            return
        rt.baseline_j = sum(r.energy_per_iteration_mean_j or 0.0 for r in ranks)
        rt.baseline_iteration_s = mean_present([r.iteration_time_mean_s for r in ranks])
        rt.baseline_gpus = len(ranks)

    def _measure_saving(
        self, rt: PolicyRuntime, spec: EnergyPolicySpec, ranks: list[RankTimings]
    ) -> None:
        """Energy per iteration under the current plan against the baseline (fair under a
        straggler: the followers' baseline also pays blocking power for the wait)."""
        if len(ranks) < spec.pipeline.ranks or rt.baseline_j is None:
            return
        if not rt.regime.name.startswith("plan:"):
            return
        if not all(r.schedule_active for r in ranks) or not enough_samples(
            ranks, self.measure_iterations
        ):
            return
        straggler = rt.straggler.straggler if rt.straggler_plan is not None else None
        counted = [r for r in ranks if r.data_rank != straggler]
        if not counted or rt.baseline_iteration_s is None:
            return
        energy = sum(r.energy_per_iteration_mean_j or 0.0 for r in counted)
        iteration_s = mean_present([r.iteration_time_mean_s for r in counted])
        base = rt.baseline_j * len(counted) / max(rt.baseline_gpus, 1)
        wait_s = max(0.0, (iteration_s or 0.0) - rt.baseline_iteration_s)
        if straggler is not None:
            base += effective_blocking_w(rt, spec) * len(counted) * wait_s
        rt.measured_saving = rc.saving_percent(energy, base)

    # ---- acting and reporting -----------------------------------------------------------------

    async def _act(
        self,
        rt: PolicyRuntime,
        decision: rc.Decision,
        snaps: Mapping[str, NodeSnapshot],
        spec: EnergyPolicySpec | None,
    ) -> tuple[dict[str, frozenset[rc.Entry]], list[str]]:
        """Carry out the actions; returns the entries now applied by node, and what the
        sidecars refused."""
        token_hash = hashlib.sha256((rt.token or "").encode()).hexdigest()
        plan_regime = regime_name(rt)
        applied: dict[str, frozenset[rc.Entry]] = {}
        rejected: list[str] = []
        for action in decision.actions:
            snap = snaps.get(action.node)
            if snap is None:
                continue
            try:
                if isinstance(action, rc.Announce):
                    await self.gateway.announce(
                        snap.address,
                        rt.namespace,
                        rt.name,
                        token_hash,
                        action.pods,
                        # instructions of each kind per rank and iteration: one per microbatch
                        # and model chunk (interleaved 1F1B)
                        microbatches=(
                            spec.pipeline.microbatches * spec.pipeline.virtual_stages
                            if spec is not None
                            else None
                        ),
                    )
                elif isinstance(action, rc.ApplySchedule):
                    await self.gateway.apply(snap.address, rt.namespace, rt.name, action.entries)
                    applied[action.node] = frozenset(action.entries)
                    if rt.regime.name != plan_regime:
                        rt.regime = Regime(plan_regime, time.time())
                        rt.measured_saving = None
                else:
                    await self.gateway.remove(snap.address, rt.namespace, rt.name)
            except SidecarRejectedError as exc:
                rejected.append(f"node {action.node}: {exc}")
            except SidecarUnreachableError as exc:
                log.warning("%s/%s: %s on node %s", rt.namespace, rt.name, exc, action.node)
        if decision.phase in ("Completed", "Failed") or (spec is not None and spec.suspend):
            rt.regime = Regime("none", 0.0)
        return applied, rejected

    async def _write_status(
        self, body: Mapping[str, Any], rt: PolicyRuntime, decision: rc.Decision, generation: int
    ) -> None:
        old = rt.last_status or dict(body.get("status") or {})
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        conditions = rc.merge_conditions(
            old.get("conditions") or [], decision.conditions, generation, now
        )
        new: dict[str, Any] = {
            "phase": decision.phase,
            "observedGeneration": generation,
            "conditions": conditions,
            **decision.status,
            "straggler": straggler_status(rt, old),
            "profileConfigMap": rt.profile_cm,
            "blockingPowerW": round(rt.blocking_w, 2) if rt.blocking_w else None,
            "planFailure": {
                "generation": rt.plan_failure.generation,
                "reason": rt.plan_failure.reason,
                "message": rt.plan_failure.message[:1000],
            }
            if rt.plan_failure is not None
            else None,
        }
        if rt.baseline_j is not None and rt.baseline_iteration_s is not None:
            new["measuredBaseline"] = {
                "energyJoules": round(rt.baseline_j, 3),
                "iterationTimeSeconds": round(rt.baseline_iteration_s, 5),
                "gpus": rt.baseline_gpus,
            }
        if new == {k: old.get(k) for k in new} and all(
            old.get(k) is None for k in old if k not in new and k in _OWNED
        ):
            return
        patch = merge_patch({k: old.get(k) for k in _OWNED}, new)
        await self.store.patch_status(rt.namespace, rt.name, patch)
        for event in rc.events_between(
            old.get("phase"), old.get("conditions") or [], decision.phase, decision.conditions
        ):
            self.emit(body, event)
        rt.last_status = {k: v for k, v in new.items() if v is not None}


_OWNED = (
    "phase",
    "blockingPowerW",
    "observedGeneration",
    "conditions",
    "expectedRanks",
    "registeredRanks",
    "profileConfigMap",
    "frontier",
    "iterationTimeSeconds",
    "predictedSavingPercent",
    "measuredSavingPercent",
    "straggler",
    "measuredBaseline",
    "planFailure",
)


async def cleanup_policy(
    gateway: SidecarGateway,
    addresses: Iterable[str],
    namespace: str,
    name: str,
    *,
    attempts: int,
    delay_s: float = 0.5,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> list[str]:
    """Finalizer work: forget the job on every sidecar (which resets the clocks it locked), with
    bounded retries. Returns the addresses that could not be reached."""
    left = sorted(set(addresses))
    for attempt in range(attempts):
        failed = []
        for address in left:
            try:
                await gateway.forget(address, namespace, name)
            except SidecarUnreachableError:
                failed.append(address)
        left = failed
        if not left:
            break
        if attempt + 1 < attempts:
            await sleep(delay_s * (2**attempt))
    return left
