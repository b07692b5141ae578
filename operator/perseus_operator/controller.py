"""One policy's reconcile loop: gather an observation (`observe.py`), call the pure `decide`
once, act on the sidecars, write the status; and the finalizer's work.

The kopf handlers (`handlers.py`) run :meth:`Controller.run_policy` as a daemon per EnergyPolicy
and wake it on spec changes. Profiles come from `profile_source.py`, frontiers and straggler
plans from `plan_source.py`, the energy figures from the pure `accounting.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from perseus_operator import reconcile as rc
from perseus_operator.model import EnergyPolicySpec, SpecError, parse_spec
from perseus_operator.observe import Observer
from perseus_operator.plan_process import Planner, plan_in_subprocess
from perseus_operator.plan_source import PlanSource
from perseus_operator.profile_source import ProfileSource
from perseus_operator.sidecars import (
    NodeSnapshot,
    SidecarGateway,
    SidecarRejectedError,
    SidecarUnreachableError,
)
from perseus_operator.state import (
    EventSink,
    PodRecord,
    PolicyRecord,
    PolicyRuntime,
    Regime,
    Store,
)
from perseus_operator.status_views import (
    events_between,
    merge_conditions,
    merge_patch,
    regime_name,
    straggler_status,
)

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
        self.emit: EventSink = emit or (lambda body, event: None)
        self.plans = PlanSource(
            plan
            or (
                lambda profile, shape, blocking_w: plan_in_subprocess(
                    profile, shape, blocking_w, memory_mib=1024, timeout_s=300.0
                )
            )
        )
        self.observe = Observer(
            gateway,
            ProfileSource(store, gateway, profile_namespace=profile_namespace),
            self.plans,
            baseline_iterations=baseline_iterations,
            measure_iterations=measure_iterations,
            max_window_s=max_window_s,
            max_plan_instructions=max_plan_instructions,
        )
        self.runtimes: dict[tuple[str, str], PolicyRuntime] = {}

    def runtime(self, namespace: str, name: str) -> PolicyRuntime:
        key = (namespace, name)
        if key not in self.runtimes:
            self.runtimes[key] = PolicyRuntime(namespace, name)
        return self.runtimes[key]

    def wake(self, namespace: str, name: str) -> None:
        rt = self.runtimes.get((namespace, name))
        if rt is not None:
            rt.wake.set()

    async def forget_policy(
        self, namespace: str, name: str, sidecars: Mapping[str, str], *, attempts: int
    ) -> list[str]:
        """Finalizer work: the sidecars of the nodes the policy's job used forget it (every
        sidecar when that is unknown, after an operator restart). Returns the addresses that
        could not be reached."""
        rt = self.runtimes.pop((namespace, name), None)
        if rt is not None and rt.gpu_models:
            targets = [sidecars[n] for n in rt.gpu_models if n in sidecars]
        else:
            targets = list(sidecars.values())
        return await cleanup_policy(self.gateway, targets, namespace, name, attempts=attempts)

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
            rt.resume(status, generation)
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
            nodes, snapshots = await self.observe.nodes(rt, running, sidecars)
        elif rt.last_status.get("phase") in ("Optimizing", "Degraded", "Planning", "Profiling"):
            # Stopping: reach every node the job used so its schedules can be removed.
            nodes, snapshots = await self.observe.nodes(rt, [], sidecars)
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
            obs = await self.observe.plan_inputs(rt, spec, obs, snapshots)
        decision = rc.decide(obs)
        applied, rejected = await self._act(rt, decision, snapshots, spec)
        applying = any(isinstance(a, rc.ApplySchedule) for a in decision.actions)
        # Report what the sidecars now hold (or refused), not what they held a moment ago.
        decision = rc.settle(decision, applied, "; ".join(rejected) or None)
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
        conditions = merge_conditions(
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
        base = rt.baseline
        if base is not None and base.iteration_s is not None:
            new["measuredBaseline"] = {
                "energyJoules": round(base.energy_j, 3),
                "iterationTimeSeconds": round(base.iteration_s, 5),
                "gpus": base.gpus,
            }
        if new == {k: old.get(k) for k in new} and all(
            old.get(k) is None for k in old if k not in new and k in _OWNED
        ):
            return
        patch = merge_patch({k: old.get(k) for k in _OWNED}, new)
        await self.store.patch_status(rt.namespace, rt.name, patch)
        for event in events_between(
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
