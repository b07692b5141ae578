"""The index functions and selector lookups the kopf handlers use (called directly)."""

from __future__ import annotations

import logging
from typing import Any

import kopf
import pytest

from perseus_operator import handlers
from perseus_operator.handlers import OperatorMemo, build_registry
from perseus_operator.settings import Settings
from perseus_operator.sidecar_index import SidecarPod
from perseus_operator.state import PodRecord


def pod(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "namespace": "ns",
        "name": "train-0",
        "uid": "u0",
        "labels": {"job": "gpt", "team": "a"},
        "spec": {"nodeName": "n0"},
        "status": {"phase": "Running", "podIP": "10.0.0.1", "hostIP": "10.1.0.1"},
        "meta": {},
    }
    base.update(over)
    return base


def test_job_pods_are_indexed_under_each_label() -> None:
    memo = OperatorMemo(Settings())
    entries = handlers.job_pods(**pod(), memo=memo)
    assert set(entries) == {("ns", "job", "gpt"), ("ns", "team", "a")}
    record = entries[("ns", "job", "gpt")]
    assert (record.phase, record.pod_ip, record.node_name) == ("Running", "10.0.0.1", "n0")
    terminating = handlers.job_pods(**pod(meta={"deletionTimestamp": "now"}), memo=memo)
    assert terminating[("ns", "job", "gpt")].phase == "Terminating"


OWNED = {"ownerReferences": [{"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "ps-sidecar"}]}
READY = {"conditions": [{"type": "Ready", "status": "True"}]}


@pytest.fixture
def memo() -> OperatorMemo:
    return OperatorMemo(
        Settings(pod_namespace="perseus", sidecar_daemonset="ps-sidecar", sidecar_port=8080)
    )


def sidecar(name: str = "ps-sidecar-a", ready: bool = True, **over: Any) -> dict[str, Any]:
    status = {
        "phase": "Running",
        "podIP": "10.1.0.1",
        "hostIP": "10.1.0.1",
        **(READY if ready else {}),
    }
    return pod(namespace="perseus", name=name, meta=dict(OWNED), status=status) | over


def addresses(memo: OperatorMemo, *pods: dict[str, Any]) -> dict[str, str]:
    index: dict[str, list[SidecarPod]] = {}
    for p in pods:
        for node, found in (handlers.sidecars(**p, memo=memo) or {}).items():
            index.setdefault(node, []).append(found)
    return handlers._addresses(index, memo)  # type: ignore[arg-type]


def test_sidecar_address_by_node(memo: OperatorMemo) -> None:
    assert addresses(memo, sidecar()) == {"n0": "10.1.0.1:8080"}
    assert (
        handlers.sidecars(**sidecar(status={"phase": "Pending", "hostIP": "10.1.0.1"}), memo=memo)
        is None
    )
    assert (
        handlers.sidecars(**sidecar(meta={**OWNED, "deletionTimestamp": "now"}), memo=memo) is None
    )


def test_a_tenants_pod_with_sidecar_labels_never_gets_the_operator_token(
    memo: OperatorMemo,
) -> None:
    """A pod of another namespace with the sidecar labels and a port annotation pointing at its
    own listener: not even a candidate. The port is the configured one, never the pod's."""
    tenant = pod(
        namespace="tenant",
        meta={**OWNED, "annotations": {"perseus.dev/port": "9000"}},
        status={"phase": "Running", "podIP": "10.0.0.9", "hostIP": "10.0.0.9", **READY},
    )
    assert handlers.sidecars(**tenant, memo=memo) is None
    assert addresses(memo, tenant) == {}
    annotated = sidecar(meta={**OWNED, "annotations": {"perseus.dev/port": "9000"}})
    assert addresses(memo, annotated) == {"n0": "10.1.0.1:8080"}


def test_only_the_daemonsets_pods_are_sidecars(
    memo: OperatorMemo, caplog: pytest.LogCaptureFixture
) -> None:
    stray = sidecar("stray", meta={})
    other_owner = sidecar(
        "other",
        meta={"ownerReferences": [{"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "x"}]},
    )
    replica_set = sidecar(
        "rs",
        meta={
            "ownerReferences": [
                {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "ps-sidecar"}
            ]
        },
    )
    with caplog.at_level(logging.WARNING, logger="perseus.operator"):
        assert addresses(memo, stray, other_owner, replica_set) == {}
    assert caplog.text.count("not owned by DaemonSet ps-sidecar") == 3


def test_two_candidates_on_a_node_prefer_the_ready_owned_one_and_log_the_other(
    memo: OperatorMemo, caplog: pytest.LogCaptureFixture
) -> None:
    unready = sidecar(
        "ps-sidecar-a", ready=False, status={"phase": "Running", "hostIP": "10.1.0.7"}
    )
    ready = sidecar("ps-sidecar-b")
    stray = sidecar(
        "aaa-stray", meta={}, status={"phase": "Running", "hostIP": "10.1.0.8", **READY}
    )
    with caplog.at_level(logging.WARNING, logger="perseus.operator"):
        assert addresses(memo, unready, stray, ready) == {"n0": "10.1.0.1:8080"}
        assert addresses(memo, ready, unready, stray) == {"n0": "10.1.0.1:8080"}  # logged once
    assert caplog.text.count("ignoring sidecar candidate pod ps-sidecar-a") == 1
    assert "pod ps-sidecar-b is preferred; not Ready" in caplog.text
    assert caplog.text.count("ignoring sidecar candidate pod aaa-stray") == 1


def test_selected_uses_the_smallest_bucket_and_checks_every_label() -> None:
    a = PodRecord("a", "1", {"job": "gpt", "team": "a"}, "Running", "x", "y", "n0", False)
    b = PodRecord("b", "2", {"job": "gpt", "team": "b"}, "Running", "x", "y", "n0", False)
    index = {("ns", "job", "gpt"): [a, b], ("ns", "team", "a"): [a], ("ns", "team", "b"): [b]}
    spec: dict[str, Any] = {"selector": {"matchLabels": {"job": "gpt", "team": "a"}}}
    spec |= {"pipeline": {"stages": 1, "microbatches": 1}, "blockingPowerW": 80}
    spec |= {"profile": {"import": {"configMap": "p"}}}
    assert handlers._selected(index, "ns", spec) == [a]  # type: ignore[arg-type]
    assert handlers._selected(index, "other", spec) == []  # type: ignore[arg-type]
    assert handlers._selected(index, "ns", {"bad": 1}) == []  # type: ignore[arg-type]


def test_policy_record() -> None:
    record = handlers.policies(
        namespace="ns",
        name="p",
        meta={"creationTimestamp": "t"},
        spec={"selector": {"matchLabels": {"job": "gpt"}}},
    )["ns"]
    assert record.selects({"job": "gpt", "x": "y"}) and not record.selects({"job": "b"})


def test_handlers_are_on_their_own_registry_with_the_configured_sidecar_labels() -> None:
    """Registered on the registry `main` runs kopf with, not kopf's global default; the
    sidecar index filters by the labels of the settings it was built from."""
    registry = build_registry(Settings(sidecar_selector="app=ps,role=agent"))
    ids = {h.id for h in registry._indexing.get_all_handlers()}
    assert ids == {"job_pods", "sidecars", "policies"}
    sidecar_index = next(h for h in registry._indexing.get_all_handlers() if h.id == "sidecars")
    assert sidecar_index.labels == {"app": "ps", "role": "agent"}
    assert {h.id for h in registry._spawning.get_all_handlers()} == {"reconcile"}
    changing = {h.id for h in registry._changing.get_all_handlers()}
    assert changing == {"spec-changed/spec", "cleanup"}
    assert {h.id for h in registry._watching.get_all_handlers()} == {"wake-on-pod"}
    activities = {h.id: str(h.activity) for h in registry._activities.get_all_handlers()}
    # without a login handler kopf finds no credentials at start
    assert activities == {"login": "authentication", "configure": "startup", "close": "cleanup"}
    assert not kopf.get_default_registry()._indexing.get_all_handlers()
