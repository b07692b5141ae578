"""The index functions and selector lookups the kopf handlers use (called directly)."""

from __future__ import annotations

from typing import Any

from perseus_operator import handlers as typed_handlers
from perseus_operator.state import PodRecord

handlers: Any = typed_handlers  # kopf types the decorated functions as its callback protocols


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
    entries = handlers.job_pods(**pod())
    assert set(entries) == {("ns", "job", "gpt"), ("ns", "team", "a")}
    record = entries[("ns", "job", "gpt")]
    assert (record.phase, record.pod_ip, record.node_name) == ("Running", "10.0.0.1", "n0")
    terminating = handlers.job_pods(**pod(meta={"deletionTimestamp": "now"}))
    assert terminating[("ns", "job", "gpt")].phase == "Terminating"


def test_sidecar_address_by_node() -> None:
    assert handlers.sidecars(**pod()) == {"n0": "10.1.0.1:8080"}
    annotated = pod(meta={"annotations": {"perseus.dev/port": "9000"}})
    assert handlers.sidecars(**annotated) == {"n0": "10.1.0.1:9000"}
    assert handlers.sidecars(**pod(status={"phase": "Pending"})) is None
    assert handlers.sidecars(**pod(meta={"deletionTimestamp": "now"})) is None


def test_selected_uses_the_smallest_bucket_and_checks_every_label() -> None:
    a = PodRecord("a", "1", {"job": "gpt", "team": "a"}, "Running", "x", "y", "n0", False)
    b = PodRecord("b", "2", {"job": "gpt", "team": "b"}, "Running", "x", "y", "n0", False)
    index = {("ns", "job", "gpt"): [a, b], ("ns", "team", "a"): [a], ("ns", "team", "b"): [b]}
    spec: dict[str, Any] = {"selector": {"matchLabels": {"job": "gpt", "team": "a"}}}
    spec |= {"pipeline": {"stages": 1, "microbatches": 1}, "blockingPowerW": 80}
    spec |= {"profile": {"import": {"configMap": "p"}}}
    assert handlers._selected(index, "ns", spec) == [a]
    assert handlers._selected(index, "other", spec) == []
    assert handlers._selected(index, "ns", {"bad": 1}) == []


def test_policy_record() -> None:
    record = handlers.policies(
        namespace="ns",
        name="p",
        meta={"creationTimestamp": "t"},
        spec={"selector": {"matchLabels": {"job": "gpt"}}},
    )["ns"]
    assert record.selects({"job": "gpt", "x": "y"}) and not record.selects({"job": "b"})
