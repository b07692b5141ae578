"""The controller's straggler plan: solved at the pace (cheaper than the frontier lookup here),
through a straggler seen in the sidecars' timings, and the lookup when the solve fails."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

import pytest

from perseus_operator.controller import Controller
from perseus_operator.planner import (
    Frontier,
    PacePlanner,
    PipelineShape,
    Plan,
    compute_frontier,
    plan_for_straggler,
)
from perseus_operator.sidecars import NodeSnapshot
from perseus_sidecar.api import PipelineTimings
from tests.operator.test_controller import PODS, PROFILE, Gateway, Store, body

BLOCKING_W = 83.64
SHAPE = PipelineShape(2, 8)
PACE_RATIO = 1.3  # gpt3-a100 stages 0 and 7, 2 x 8: the solve beats the lookup by 0.3%


def cost_j(plan: Plan, pace_s: float) -> float:
    return plan.energy_j + BLOCKING_W * SHAPE.stages * (pace_s - plan.iteration_time_s)


def prepared(frontier: Frontier) -> PacePlanner:
    """What the operator solves with: a pace planner prepared when the frontier landed."""
    planner = PacePlanner(PROFILE, frontier)
    planner.prepare()
    return planner


def controller() -> Controller:
    return Controller(
        Store(PROFILE.to_csv()),
        Gateway(),  # type: ignore[arg-type]
        profile_namespace="perseus",
        baseline_iterations=3,
        measure_iterations=3,
    )


async def test_solved_at_the_pace_or_else_looked_up(monkeypatch: pytest.MonkeyPatch) -> None:
    ctl = controller()
    rt = ctl.runtime("ns", "p")
    rt.profile = PROFILE
    rt.frontier = compute_frontier(PROFILE, SHAPE, BLOCKING_W)
    pace_s = PACE_RATIO * rt.frontier.t0_s
    chosen = await ctl.plans.straggler_plan(rt, pace_s)
    looked_up = plan_for_straggler(rt.frontier, pace_s)
    assert chosen == PacePlanner(PROFILE, rt.frontier).plan(pace_s).plan  # no frontier landed
    assert chosen.iteration_time_s <= pace_s
    assert cost_j(chosen, pace_s) < cost_j(looked_up, pace_s) * (1 - 0.002)
    planner = rt.pace_planner
    assert planner is not None
    await ctl.plans.straggler_plan(rt, 1.1 * rt.frontier.t0_s)
    assert rt.pace_planner is planner  # built once per frontier, its LP re-solved warm

    def broken(self: PacePlanner, pace_s: float) -> None:
        raise RuntimeError("HiGHS failed")

    monkeypatch.setattr(PacePlanner, "plan", broken)
    assert await ctl.plans.straggler_plan(rt, pace_s) == looked_up


async def test_the_pace_planner_is_prepared_when_the_frontier_lands() -> None:
    ctl = controller()
    rt = ctl.runtime("ns", "p")
    spec = {"pipeline": {"stages": 2, "microbatches": 8, "dataParallel": 2}}
    await ctl.reconcile_once(body(**spec), rt, PODS, {"n0": "10.1.0.1:8080"}, [])
    assert rt.frontier is not None and rt.pace_planner_ready is not None
    planner = rt.pace_planner_ready.result(timeout=60)  # prepared off the event loop
    assert planner is not None and planner.prepared_paces
    pace_s = PACE_RATIO * rt.frontier.t0_s
    chosen = await ctl.plans.straggler_plan(rt, pace_s)
    assert rt.pace_planner is planner
    assert chosen == prepared(rt.frontier).plan(pace_s).plan
    # A second policy of the same job shape shares the frontier and its prepared planner.
    other = ctl.runtime("ns", "q")
    second = body(**spec)
    second["metadata"] = {**second["metadata"], "name": "q", "uid": "u2"}
    await ctl.reconcile_once(second, other, PODS, {"n0": "10.1.0.1:8080"}, [])
    assert other.frontier is rt.frontier
    assert other.pace_planner_ready is rt.pace_planner_ready


async def test_a_planner_that_cannot_be_prepared_still_solves(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(self: PacePlanner) -> int:
        raise RuntimeError("HiGHS failed")

    monkeypatch.setattr(PacePlanner, "prepare", broken)
    ctl = controller()
    rt = ctl.runtime("ns", "p")
    spec = {"pipeline": {"stages": 2, "microbatches": 8, "dataParallel": 2}}
    await ctl.reconcile_once(body(**spec), rt, PODS, {"n0": "10.1.0.1:8080"}, [])
    assert rt.frontier is not None and rt.pace_planner_ready is not None
    pace_s = PACE_RATIO * rt.frontier.t0_s
    chosen = await ctl.plans.straggler_plan(rt, pace_s)
    assert chosen == PacePlanner(PROFILE, rt.frontier).plan(pace_s).plan


class SlowPipelineGateway(Gateway):
    """Pipeline 1's stage 0 runs `PACE_RATIO` times slower than the plan it was given
    predicts; a fresh span every snapshot."""

    def __init__(self) -> None:
        super().__init__()
        self.predicted_s: float | None = None
        self.snapshots = 0

    async def snapshot(
        self, address: str, namespace: str, name: str, window_s: float
    ) -> NodeSnapshot:
        snap = await super().snapshot(address, namespace, name, window_s)
        if snap.timings is None or self.predicted_s is None:
            return snap
        self.snapshots += 1
        jitter = 1e-6 * self.snapshots  # a new sample each time
        spans = (self.predicted_s + jitter, PACE_RATIO * self.predicted_s + jitter)
        pipelines: Iterable[PipelineTimings] = (
            PipelineTimings(
                data_rank=d,
                iterations=10,
                stage0_span_mean_s=span,
                stage0_span_std_s=0.0,
                stage0_span_last_s=span,
                iteration_time_mean_s=span,
            )
            for d, span in enumerate(spans)
        )
        timings = snap.timings.model_copy(update={"pipelines": list(pipelines)})
        return replace(snap, timings=timings)


async def test_a_straggler_in_the_timings_gets_the_plan_solved_at_its_pace() -> None:
    gateway = SlowPipelineGateway()
    ctl = Controller(
        Store(PROFILE.to_csv()),
        gateway,  # type: ignore[arg-type]
        profile_namespace="perseus",
        baseline_iterations=3,
        measure_iterations=3,
    )
    rt = ctl.runtime("ns", "p")
    spec = {"pipeline": {"stages": 2, "microbatches": 8, "dataParallel": 2}}
    for _ in range(12):
        await ctl.reconcile_once(body(**spec), rt, PODS, {"n0": "10.1.0.1:8080"}, [])
        if rt.plan is not None and gateway.predicted_s is None:
            gateway.predicted_s = rt.plan.stage0_span_s
        if rt.straggler_plan is not None:
            break
    assert rt.straggler.straggler == 1 and rt.straggler.pace_s is not None
    assert rt.straggler_plan is not None and rt.frontier is not None
    pace_s = rt.straggler.pace_s
    solved = prepared(rt.frontier).plan(pace_s).plan
    assert rt.straggler_plan.frequencies_mhz == solved.frequencies_mhz
    # ... which is not the frontier's choice (the operator's choice until now) at this pace.
    assert solved.frequencies_mhz != plan_for_straggler(rt.frontier, pace_s).frequencies_mhz
    assert rt.straggler_plan.iteration_time_s <= pace_s
