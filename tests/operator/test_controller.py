"""The controller's reconcile pass with a fake API store and fake sidecars: import checks,
baseline then schedules, status patches and events, the finalizer's bounded retries."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import pytest

from perseus_operator import reconcile as rc
from perseus_operator.controller import Controller, cleanup_policy
from perseus_operator.plan_process import PlanningError, plan_in_subprocess
from perseus_operator.planner import Frontier, PipelineShape, compute_frontier
from perseus_operator.sidecars import NodeSnapshot, SidecarRejectedError, SidecarUnreachableError
from perseus_operator.state import PodRecord, PolicyRecord, PolicyRuntime
from perseus_operator.status_views import ImplausibleProfileError, check_plausible, merge_patch
from perseus_profiles import EXAMPLES, Measurement, StageProfile, load_example
from perseus_sidecar.api import RankTimings, TimingsOut

PROFILE = load_example("gpt3-175b-a100").select_stages((0, 7))
CLOCKS = frozenset(PROFILE.frequencies_mhz)


class Store:
    def __init__(self, csv: str | None) -> None:
        self.csv = csv
        self.patches: list[dict[str, Any]] = []
        self.stored: dict[str, str] = {}
        self.profiles: dict[tuple[Any, ...], str] = {}
        """Stored profiles by (scope, GPU model, stages, tensor parallel, key)."""

    async def patch_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        self.patches.append(dict(status))

    async def ensure_job_token(self, namespace: str, policy: str, policy_uid: str) -> str:
        return "job-token"

    async def read_configmap_key(self, namespace: str, name: str, key: str) -> str | None:
        return self.csv

    async def store_profile(self, namespace: str, **kw: Any) -> str:
        self.stored[kw["key"]] = kw["csv_text"]
        where = (kw["scope"], kw["gpu_model"], kw["stages"], kw["tensor_parallel"], kw["key"])
        self.profiles[where] = kw["csv_text"]
        return "perseus-profile-x"

    async def load_profile(self, namespace: str, **kw: Any) -> tuple[str, str, None] | None:
        where = (kw["scope"], kw["gpu_model"], kw["stages"], kw["tensor_parallel"], kw["key"])
        found = self.profiles.get(where)
        return None if found is None else ("perseus-profile-x", found, None)


class Gateway:
    def __init__(self, clocks: frozenset[int] = CLOCKS, active: bool = False) -> None:
        self.clocks = clocks
        self.announced: set[str] = set()
        self.identities: set[str] = set()
        self.entries: frozenset[rc.Entry] = frozenset()
        self.calls: list[str] = []
        self.down = False
        self.extra: list[tuple[str, int, int]] = []
        """(pod, data rank, pipeline rank) of ranks registered on top of the job's four."""
        self.announced_extra: set[str] = set()
        """Pods the sidecar reports ranks of although the operator did not announce them."""

    async def snapshot(
        self, address: str, namespace: str, name: str, window_s: float
    ) -> NodeSnapshot:
        if self.down:
            raise SidecarUnreachableError(f"{address}: connection refused")
        shapes = [(f"p{r}", r // 2, r % 2) for r in range(4)] + self.extra
        ranks = [
            RankTimings(
                rank_id=f"r{r}",
                pod=pod,
                rank=r,
                pipeline_rank=pipeline_rank,
                data_rank=data_rank,
                tensor_rank=0,
                gpu_uuid=f"GPU-{r}",
                iterations=10,
                instructions=[],
                iteration_time_mean_s=1.0,
                compute_span_mean_s=1.0,
                energy_per_iteration_mean_j=90.0 if self.entries else 100.0,
                seconds_since_last_event=0.1,
                schedule_active=bool(self.entries),
                stale=False,
            )
            for r, (pod, data_rank, pipeline_rank) in enumerate(shapes)
            if pod in self.announced or (self.announced and pod in self.announced_extra)
        ]
        timings = TimingsOut(
            namespace=namespace, name=name, window_s=window_s, ranks=ranks, stages=[], pipelines=[]
        )
        return NodeSnapshot(
            address, ("A100", self.clocks), frozenset(self.identities), self.entries, timings
        )

    async def announce(
        self,
        address: str,
        namespace: str,
        name: str,
        token_sha256: str,
        pods: Iterable[rc.PodView],
        *,
        microbatches: int | None = None,
    ) -> None:
        self.calls.append("announce")
        self.microbatches = microbatches
        pods = list(pods)
        self.announced = {p.name for p in pods}
        self.identities = {p.identity for p in pods}

    reject: str | None = None

    async def apply(
        self, address: str, namespace: str, name: str, entries: Iterable[rc.Entry]
    ) -> None:
        self.calls.append("apply")
        if self.reject is not None:
            raise SidecarRejectedError(self.reject)
        self.entries = frozenset(entries)

    async def remove(self, address: str, namespace: str, name: str) -> None:
        self.calls.append("remove")
        self.entries = frozenset()

    async def start_profiling(self, address: str, namespace: str, name: str, request: Any) -> None:
        self.calls.append("start_profiling")

    async def profiling(self, address: str, namespace: str, name: str) -> None:
        return None  # still sweeping

    async def forget(self, address: str, namespace: str, name: str) -> None:
        self.calls.append("forget")
        if self.down:
            raise SidecarUnreachableError(f"{address}: connection refused")


def body(**spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"namespace": "ns", "name": "p", "uid": "u1", "generation": 2},
        "spec": {
            "selector": {"matchLabels": {"job": "p"}},
            "pipeline": {"stages": 2, "microbatches": 4, "dataParallel": 2},
            "profile": {"import": {"configMap": "prof"}},
            "blockingPowerW": 83.64,
            **spec,
        },
    }


PODS = [
    PodRecord(f"p{r}", f"u{r}", {"job": "p"}, "Running", f"10.0.0.{r}", "10.1.0.1", "n0", False)
    for r in range(4)
]


async def passes(
    store: Store, gateway: Gateway, n: int, namespace: str = "ns", **spec: Any
) -> tuple[Controller, list[rc.Decision], list[rc.EventSpec]]:
    events: list[rc.EventSpec] = []
    controller = Controller(
        store,
        gateway,  # type: ignore[arg-type]
        profile_namespace="perseus",
        baseline_iterations=3,
        measure_iterations=3,
        emit=lambda b, e: events.append(e),
    )
    rt = controller.runtime(namespace, "p")
    raw = body(**spec)
    raw["metadata"]["namespace"] = namespace
    decisions = [
        await controller.reconcile_once(raw, rt, PODS, {"n0": "10.1.0.1:8080"}, [])
        for _ in range(n)
    ]
    return controller, decisions, events


async def test_import_baseline_then_schedules() -> None:
    store, gateway = Store(PROFILE.to_csv()), Gateway()
    _, decisions, events = await passes(store, gateway, 6)
    phases = [d.phase for d in decisions]
    assert phases[0] == "Pending"  # announced, ranks not registered yet
    assert "Planning" in phases and phases[-1] == "Optimizing"
    assert gateway.calls[0] == "announce" and "apply" in gateway.calls
    assert {e.reason for e in events} >= {"Pending", "Planning", "Optimizing", "Applied"}
    assert store.stored == {"default": PROFILE.to_csv()}
    last = store.patches[-1]
    assert last["phase"] == "Optimizing" and last["observedGeneration"] == 2
    assert last["measuredBaseline"]["gpus"] == 4
    assert last["measuredSavingPercent"] == pytest.approx(10.0)


@pytest.mark.parametrize(
    ("csv", "clocks", "message"),
    [
        ("stage,instruction\n0,forward\n", CLOCKS, "missing frequency"),
        (load_example("gpt3-175b-a100").to_csv(), CLOCKS, "profile has 8 stages but spec"),
        (PROFILE.to_csv(), frozenset({1410}), "are not supported by the nodes' GPUs"),
    ],
)
async def test_bad_imports_fail_with_a_message(
    csv: str, clocks: frozenset[int], message: str
) -> None:
    _, decisions, _ = await passes(Store(csv), Gateway(clocks), 3)
    last = decisions[-1]
    assert last.phase == "Failed"
    ready = next(c for c in last.conditions if c.type == "Ready")
    assert ready.reason == "ProfileInvalid" and message in ready.message
    assert "ConfigMap prof key profile.csv" in ready.message


async def test_missing_configmap_waits() -> None:
    _, decisions, _ = await passes(Store(None), Gateway(), 3)
    profiled = next(c for c in decisions[-1].conditions if c.type == "Profiled")
    assert decisions[-1].phase == "Profiling" and "waiting for ConfigMap prof" in profiled.message


async def test_unchanged_status_is_not_patched_again() -> None:
    store, gateway = Store(PROFILE.to_csv()), Gateway()
    controller, _, _ = await passes(store, gateway, 8)
    count = len(store.patches)
    rt = controller.runtime("ns", "p")
    for _ in range(3):
        await controller.reconcile_once(body(), rt, PODS, {"n0": "10.1.0.1:8080"}, [])
    assert len(store.patches) == count
    # a spec change (new generation) is written at once
    changed = body()
    changed["metadata"]["generation"] = 3
    await controller.reconcile_once(changed, rt, PODS, {"n0": "10.1.0.1:8080"}, [])
    assert len(store.patches) == count + 1 and store.patches[-1]["observedGeneration"] == 3


async def test_cleanup_retries_are_bounded() -> None:
    gateway = Gateway()
    gateway.down = True
    sleeps: list[float] = []

    async def sleep(s: float) -> None:
        sleeps.append(s)

    left = await cleanup_policy(gateway, ["a:1"], "ns", "p", attempts=3, sleep=sleep)  # type: ignore[arg-type]
    assert left == ["a:1"] and gateway.calls.count("forget") == 3 and sleeps == [0.5, 1.0]
    gateway.down = False
    assert await cleanup_policy(gateway, ["a:1"], "ns", "p", attempts=3, sleep=sleep) == []  # type: ignore[arg-type]


async def test_the_finalizer_asks_the_nodes_the_job_used_or_every_sidecar_after_a_restart() -> None:
    forgotten: list[str] = []

    class Recording(Gateway):
        async def forget(self, address: str, namespace: str, name: str) -> None:
            forgotten.append(address)

    sidecars = {"n0": "10.1.0.1:8080", "n1": "10.1.0.2:8080"}
    controller, _, _ = await passes(Store(PROFILE.to_csv()), Recording(), 2)
    assert await controller.forget_policy("ns", "p", sidecars, attempts=1) == []
    assert forgotten == ["10.1.0.1:8080"] and ("ns", "p") not in controller.runtimes
    forgotten.clear()  # the runtime went with the first call, as after an operator restart
    assert await controller.forget_policy("ns", "p", sidecars, attempts=1) == []
    assert forgotten == ["10.1.0.1:8080", "10.1.0.2:8080"]


def test_older_policy_selecting_the_pods_wins() -> None:
    rt = PolicyRuntime("ns", "p")
    meta = {"name": "p", "creationTimestamp": "2026-01-02T00:00:00Z"}
    older = PolicyRecord("a", "2026-01-01T00:00:00Z", False, (("job", "p"),))
    newer = PolicyRecord("z", "2026-01-03T00:00:00Z", False, (("job", "p"),))
    other_job = PolicyRecord("b", "2026-01-01T00:00:00Z", False, (("job", "q"),))
    gone = PolicyRecord("c", "2026-01-01T00:00:00Z", True, (("job", "p"),))
    assert Controller._conflict(rt, meta, PODS, [newer, other_job, gone]) is None
    assert Controller._conflict(rt, meta, PODS, [newer, older]) == "a"
    assert Controller._conflict(rt, meta, [], [older]) is None


def test_merge_patch_nulls_what_went_at_every_level() -> None:
    old = {"straggler": {"detected": True, "dataRank": 1}, "frontier": {"plans": 3}, "phase": "A"}
    new = {"straggler": {"detected": False}, "phase": "B"}
    assert merge_patch(old, new) == {
        "straggler": {"detected": False, "dataRank": None},
        "frontier": None,
        "phase": "B",
    }


async def test_a_refused_schedule_is_degraded_with_the_sidecars_message() -> None:
    store, gateway = Store(PROFILE.to_csv()), Gateway()
    gateway.reject = "h:1: HTTP 422: frequency 1410 MHz is not supported"
    _, decisions, events = await passes(store, gateway, 6)
    assert decisions[-1].phase == "Degraded"
    assert store.patches[-1]["conditions"][3]["reason"] == "SidecarRejected"
    assert "1410 MHz is not supported" in store.patches[-1]["conditions"][0]["message"]
    assert any(e.type == "Warning" and e.reason == "Degraded" for e in events)


async def test_extra_registered_ranks_count_neither_as_ranks_nor_in_the_baseline() -> None:
    """A pod registering ranks outside the job's shape, twice the same position, or for a pod
    the operator never announced: only the job's four GPUs make the baseline."""
    store, gateway = Store(PROFILE.to_csv()), Gateway()
    gateway.extra = [("p0", 5, 0), ("p1", 0, 0), ("p3", 1, 7), ("stranger", 1, 1)]
    gateway.announced_extra = {"stranger"}
    _, decisions, _ = await passes(store, gateway, 6)
    last = store.patches[-1]
    assert decisions[-1].phase == "Optimizing" and last["registeredRanks"] == 4
    assert last["measuredBaseline"] == {
        "energyJoules": 400.0,
        "iterationTimeSeconds": 1.0,
        "gpus": 4,
    }
    assert last["measuredSavingPercent"] == pytest.approx(10.0)


def slower_at_max(profile: StageProfile, stage: int, factor: float) -> StageProfile:
    """`profile` with stage `stage`'s backward taking `factor` times longer at the top clock only:
    every lower clock then looks faster than the maximum."""
    options = [list(per) for per in profile.options]
    backward = list(options[stage][1])
    top = backward[0]
    backward[0] = Measurement(top.frequency_mhz, top.time_s * factor, top.energy_j * factor)
    options[stage][1] = tuple(backward)
    return StageProfile(tuple((f, b) for f, b in options))


POISON = slower_at_max(PROFILE, 1, 1.05)  # plausible, but not the policy's own profile
MEASURE: dict[str, Any] = {"profile": {"measure": {}}, "blockingPowerW": 83.64}
STORED_KEY = ("A100", 2, 1, "default")


async def test_a_stored_profile_never_overrides_an_explicit_import() -> None:
    store, gateway = Store(PROFILE.to_csv()), Gateway()
    store.profiles[("ns", *STORED_KEY)] = POISON.to_csv()
    controller, decisions, _ = await passes(store, gateway, 6)
    assert controller.runtime("ns", "p").profile == PROFILE
    profiled = next(c for c in decisions[-1].conditions if c.type == "Profiled")
    assert profiled.message.startswith("imported from ns/prof")
    assert store.profiles[("ns", *STORED_KEY)] == PROFILE.to_csv()


async def test_stored_profiles_are_scoped_to_the_namespace() -> None:
    """A tenant's stored profile is not another namespace's: a measuring policy elsewhere sweeps
    its own clocks. Sharing is an opt-in of both sides (profileScope: Cluster)."""
    store = Store(POISON.to_csv())
    await passes(store, Gateway(), 3, namespace="tenant")  # imports and stores POISON
    assert set(store.profiles) == {("tenant", *STORED_KEY)}
    victim = Gateway()
    controller, decisions, _ = await passes(store, victim, 4, **MEASURE)
    assert controller.runtime("ns", "p").profile is None and "start_profiling" in victim.calls
    assert decisions[-1].phase == "Profiling"

    await passes(store, Gateway(), 3, namespace="tenant", profileScope="Cluster")
    shared = ("*cluster*", *STORED_KEY)
    assert store.profiles[shared] == POISON.to_csv()
    declined = Gateway()
    controller, _, _ = await passes(store, declined, 4, **MEASURE)
    assert controller.runtime("ns", "p").profile is None  # a Namespace policy never reads it
    joined = Gateway()
    controller, _, _ = await passes(store, joined, 4, profileScope="Cluster", **MEASURE)
    assert controller.runtime("ns", "p").profile == POISON
    assert "start_profiling" not in joined.calls


async def test_an_implausible_import_fails_with_its_own_reason() -> None:
    bad = slower_at_max(PROFILE, 1, 3.0)
    _, decisions, events = await passes(Store(bad.to_csv()), Gateway(), 3)
    last = decisions[-1]
    ready = next(c for c in last.conditions if c.type == "Ready")
    assert last.phase == "Failed" and ready.reason == "ProfileImplausible"
    assert "stage 1 backward takes" in ready.message
    assert "time must not fall as the clock falls" in ready.message
    assert any(e.reason == "ProfileImplausible" and e.type == "Warning" for e in events)


async def test_an_implausible_stored_profile_is_ignored() -> None:
    store, gateway = Store(None), Gateway()
    store.profiles[("ns", *STORED_KEY)] = slower_at_max(PROFILE, 0, 2.0).to_csv()
    controller, decisions, _ = await passes(store, gateway, 4, **MEASURE)
    assert controller.runtime("ns", "p").profile is None and "start_profiling" in gateway.calls
    assert decisions[-1].phase == "Profiling"


def test_plausibility_tolerates_measurement_noise_only() -> None:
    for name in EXAMPLES:  # real measurements: up to 9.5% faster at a lower clock (A40)
        check_plausible(load_example(name))
    check_plausible(slower_at_max(PROFILE, 1, 1.1))
    with pytest.raises(ImplausibleProfileError, match="stage 1 backward takes"):
        check_plausible(slower_at_max(PROFILE, 1, 1.25))


async def test_a_pipeline_too_large_to_plan_fails_at_once_without_planning() -> None:
    calls: list[PipelineShape] = []

    async def plan(profile: StageProfile, shape: PipelineShape, blocking_w: float) -> Frontier:
        calls.append(shape)
        raise AssertionError("must not plan")

    store, gateway = Store(PROFILE.to_csv()), Gateway()
    controller = Controller(store, gateway, profile_namespace="perseus", plan=plan)  # type: ignore[arg-type]
    big = body(pipeline={"stages": 64, "microbatches": 1024, "dataParallel": 2})
    rt = controller.runtime("ns", "p")
    decision = await controller.reconcile_once(big, rt, PODS, {"n0": "10.1.0.1:8080"}, [])
    assert decision.phase == "Failed" and calls == []
    planned = next(c for c in decision.conditions if c.type == "Planned")
    assert planned.reason == "TooLarge"
    assert planned.message.startswith("64 stages x 1024 microbatches are 131072 instructions")
    assert "at most 16384" in planned.message


async def test_the_planner_child_dies_of_its_memory_limit_not_the_operator() -> None:
    """The child caps its address space: a plan needing more fails with a message, while the
    same limit plans a small pipeline (so the limit, not a broken child, is what stopped it)."""
    profile = load_example("gpt3-175b-a100")
    small = await plan_in_subprocess(
        profile, PipelineShape(8, 12), 83.64, memory_mib=200, timeout_s=120
    )
    assert small == compute_frontier(profile, PipelineShape(8, 12), 83.64)
    with pytest.raises(PlanningError, match="ran out of memory planning 8 stages x 1024"):
        await plan_in_subprocess(
            profile, PipelineShape(8, 1024), 83.64, memory_mib=200, timeout_s=120
        )
    with pytest.raises(PlanningError, match=r"did not finish 8 stages x 1024 \S+ within 0\.5 s"):
        await plan_in_subprocess(
            profile, PipelineShape(8, 1024), 83.64, memory_mib=2048, timeout_s=0.5
        )
    with pytest.raises(PlanningError, match="the planner refused: blocking power must be"):
        await plan_in_subprocess(
            profile, PipelineShape(8, 12), float("nan"), memory_mib=512, timeout_s=120
        )


async def test_the_planner_child_plans_interleaved_pipelines_as_in_process() -> None:
    """The child gets the whole shape (schedule and model chunks), not only its size."""
    profile = load_example("gpt3-175b-a100").select_stages((0, 1, 2, 7)).split_chunks(2)
    shape = PipelineShape(4, 8, "interleaved-1f1b", 2)
    got = await plan_in_subprocess(profile, shape, 83.64, memory_mib=512, timeout_s=120)
    assert got == compute_frontier(profile, shape, 83.64)


async def test_a_failed_plan_is_recorded_and_not_retried_until_the_spec_changes() -> None:
    calls: list[int] = []

    async def failing(profile: StageProfile, shape: PipelineShape, blocking_w: float) -> Frontier:
        calls.append(1)
        raise PlanningError("PlanningFailed", "the planner ran out of memory (limit 1024 MiB)")

    def controller(store: Store) -> Controller:
        return Controller(store, Gateway(), profile_namespace="perseus", plan=failing)  # type: ignore[arg-type]

    store = Store(PROFILE.to_csv())
    first = controller(store)
    raw = body()
    for _ in range(5):
        decision = await first.reconcile_once(
            raw, first.runtime("ns", "p"), PODS, {"n0": "10.1.0.1:8080"}, []
        )
    assert decision.phase == "Failed" and len(calls) == 1
    status = first.runtime("ns", "p").last_status
    assert status["planFailure"] == {
        "generation": 2,
        "reason": "PlanningFailed",
        "message": "the planner ran out of memory (limit 1024 MiB)",
    }

    # An operator restart: the status says this spec failed, so no blind retry.
    raw["status"] = status
    again = controller(Store(PROFILE.to_csv()))
    for _ in range(3):
        decision = await again.reconcile_once(
            raw, again.runtime("ns", "p"), PODS, {"n0": "10.1.0.1:8080"}, []
        )
    ready = next(c for c in decision.conditions if c.type == "Ready")
    assert decision.phase == "Failed" and ready.reason == "PlanningFailed" and len(calls) == 1
    assert "ran out of memory" in ready.message

    # The spec changes: one new attempt.
    raw["metadata"]["generation"] = 3
    for _ in range(3):
        await again.reconcile_once(raw, again.runtime("ns", "p"), PODS, {"n0": "10.1.0.1:8080"}, [])
    assert len(calls) == 2
    assert again.runtime("ns", "p").last_status["planFailure"]["generation"] == 3
