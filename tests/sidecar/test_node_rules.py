"""The node's rules as plain functions, without a Node or an app: which GPU a pod may register
(`assignment`), how a schedule entry is checked and read (`schedules`), which tokens pass
(`tokens`). The API tests cover the same rules through HTTP."""

from __future__ import annotations

import pytest

from perseus_sidecar.api import PodAnnouncement, RankRegistration, ScheduleEntry
from perseus_sidecar.assignment import check_assignment, kubelet_uuids
from perseus_sidecar.errors import ConflictError, ForbiddenError, InvalidError
from perseus_sidecar.gpu.base import GpuInfo
from perseus_sidecar.job import sha256_hex
from perseus_sidecar.schedules import check_clocks, clock_tables
from perseus_sidecar.tokens import Tokens

GPUS = [GpuInfo(i, f"GPU-{i}", "test", (1410, 1200, 900)) for i in range(3)]


def _pod(name: str, gpus: list[str] | None) -> PodAnnouncement:
    return PodAnnouncement(namespace="ns", name=name, uid=name, ip="10.0.0.1", gpu_uuids=gpus)


def _registration(gpu: str) -> RankRegistration:
    return RankRegistration(
        namespace="ns",
        pod="a",
        rank=0,
        pipeline_rank=0,
        data_rank=0,
        tensor_rank=0,
        gpu_uuid=gpu,
    )


def test_kubelet_ids_become_uuids_for_replicas_and_indices() -> None:
    ids = frozenset({"GPU-0::3", "2", "GPU-9"})
    assert kubelet_uuids(GPUS, ids) == {"GPU-0", "GPU-2", "GPU-9"}


def test_the_kubelet_decides_when_it_answers() -> None:
    pod = _pod("a", ["GPU-1"])  # the announcement says GPU-1, the kubelet GPU-0 (by index)
    kubelet = {("ns", "a"): frozenset({"0"})}
    check_assignment(_registration("GPU-0"), pod, kubelet, GPUS, [pod])
    with pytest.raises(ForbiddenError, match=r"per the kubelet: GPU-0\)"):
        check_assignment(_registration("GPU-1"), pod, kubelet, GPUS, [pod])


def test_without_a_kubelet_the_announcement_decides() -> None:
    pod = _pod("a", ["GPU-1"])
    check_assignment(_registration("GPU-1"), pod, None, GPUS, [pod])
    with pytest.raises(ForbiddenError, match="per the operator's announcement"):
        check_assignment(_registration("GPU-0"), pod, None, GPUS, [pod])


def test_no_record_of_the_pods_gpus_is_refused() -> None:
    pod = _pod("a", None)
    with pytest.raises(ForbiddenError, match="no record of the GPUs pod ns/a was given"):
        check_assignment(_registration("GPU-0"), pod, None, GPUS, [pod])


def test_a_gpu_announced_for_another_pod_is_a_conflict() -> None:
    pod, other = _pod("a", None), _pod("b", ["GPU-0"])
    kubelet = {("ns", "a"): frozenset({"GPU-0"})}
    with pytest.raises(ConflictError, match="announced for pod ns/b"):
        check_assignment(_registration("GPU-0"), pod, kubelet, GPUS, [pod, other])


def test_clock_tables_index_by_microbatch_and_chunk() -> None:
    entry = ScheduleEntry(
        data_rank=0,
        pipeline_rank=1,
        order=["F0c0", "F0c1", "F1c0", "B0c1", "F1c1", "B0c0", "B1c1", "B1c0"],
        frequencies_mhz=[1410, 1200, 900, 1410, 1200, 900, 1410, 1200],
    )
    forward, backward = clock_tables(entry)
    assert forward == (1410, 1200, 900, 1200)  # F0c0 F0c1 F1c0 F1c1
    assert backward == (900, 1410, 1200, 1410)  # B0c0 B0c1 B1c0 B1c1


def test_unsupported_clocks_name_the_gpu_and_what_it_supports() -> None:
    entry = ScheduleEntry(
        data_rank=0, pipeline_rank=0, order=["F0", "B0"], frequencies_mhz=[1410, 1000]
    )
    check_clocks(entry, [])
    with pytest.raises(InvalidError, match=r"\[1000\] MHz not supported by GPU GPU-2"):
        check_clocks(entry, GPUS[2:])


def test_tokens_know_the_operator_and_announced_jobs_only() -> None:
    tokens = Tokens("op")
    assert tokens.is_operator("op") and tokens.is_known("op")
    assert not tokens.is_operator(None) and not tokens.is_known(None)
    assert not tokens.is_known("job")
    tokens.add_job(sha256_hex("job"), ("ns", "a"))
    tokens.add_job(sha256_hex("job"), ("ns", "b"))
    assert tokens.is_known("job") and not tokens.is_operator("job")
    tokens.remove_job(sha256_hex("job"), ("ns", "a"))
    assert tokens.is_known("job")  # still announced for ns/b
    tokens.remove_job(sha256_hex("job"), ("ns", "b"))
    assert not tokens.is_known("job")
    tokens.set_operator("rotated")
    assert not tokens.is_operator("op") and tokens.is_operator("rotated")
