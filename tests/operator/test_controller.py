"""The controller's reconcile pass with a fake API store and fake sidecars: import checks,
baseline then schedules, status patches and events, the finalizer's bounded retries."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import pytest

from perseus_operator import reconcile as rc
from perseus_operator.controller import Controller, cleanup_policy
from perseus_operator.sidecars import NodeSnapshot, SidecarRejectedError, SidecarUnreachableError
from perseus_operator.state import PodRecord, PolicyRecord, PolicyRuntime
from perseus_operator.status_views import merge_patch
from perseus_profiles import load_example
from perseus_sidecar.api import RankTimings, TimingsOut

PROFILE = load_example("gpt3-175b-a100").select_stages((0, 7))
CLOCKS = frozenset(PROFILE.frequencies_mhz)


class Store:
    def __init__(self, csv: str | None) -> None:
        self.csv = csv
        self.patches: list[dict[str, Any]] = []
        self.stored: dict[str, str] = {}

    async def patch_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        self.patches.append(dict(status))

    async def ensure_job_token(self, namespace: str, policy: str, policy_uid: str) -> str:
        return "job-token"

    async def read_configmap_key(self, namespace: str, name: str, key: str) -> str | None:
        return self.csv

    async def store_profile(self, namespace: str, **kw: Any) -> str:
        self.stored[kw["key"]] = kw["csv_text"]
        return "perseus-profile-x"

    async def load_profile(self, *args: Any) -> tuple[str, str] | None:
        return None


class Gateway:
    def __init__(self, clocks: frozenset[int] = CLOCKS, active: bool = False) -> None:
        self.clocks = clocks
        self.announced: set[str] = set()
        self.identities: set[str] = set()
        self.entries: frozenset[rc.Entry] = frozenset()
        self.calls: list[str] = []
        self.down = False

    async def snapshot(
        self, address: str, namespace: str, name: str, window_s: float
    ) -> NodeSnapshot:
        if self.down:
            raise SidecarUnreachableError(f"{address}: connection refused")
        ranks = [
            RankTimings(
                rank_id=f"r{r}",
                pod=f"p{r}",
                rank=r,
                pipeline_rank=r % 2,
                data_rank=r // 2,
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
            for r in range(4)
            if f"p{r}" in self.announced
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
    store: Store, gateway: Gateway, n: int, **spec: Any
) -> tuple[Controller, list[rc.Decision], list[rc.EventSpec]]:
    events: list[rc.EventSpec] = []
    controller = Controller(
        store,  # type: ignore[arg-type]
        gateway,  # type: ignore[arg-type]
        profile_namespace="perseus",
        baseline_iterations=3,
        measure_iterations=3,
        emit=lambda b, e: events.append(e),
    )
    rt = controller.runtime("ns", "p")
    decisions = [
        await controller.reconcile_once(body(**spec), rt, PODS, {"n0": "10.1.0.1:8080"}, [])
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
