"""The NVML backend against pynvml mocked with autospec (signatures checked, no GPU needed)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pynvml
import pytest

from perseus_sidecar.clocks import ClockController
from perseus_sidecar.gpu import nvml as nvml_module
from perseus_sidecar.gpu.base import (
    GpuError,
    GpuLostError,
    GpuNotFoundError,
    GpuNotSupportedError,
    GpuPermissionError,
)
from perseus_sidecar.gpu.nvml import NvmlBackend, map_nvml_error
from perseus_sidecar.lockstate import LockState
from perseus_sidecar.metrics import Metrics

UUIDS = ["GPU-aaaa", "GPU-bbbb", "GPU-cccc"]


def _err(code: int) -> pynvml.NVMLError:
    return pynvml.NVMLError(code)


@pytest.fixture
def nv() -> Iterator[Any]:
    """pynvml autospecced, with its real error class and constants, and three A100-like GPUs:
    0 plain, 1 MIG-enabled, 2 with MPS clients."""
    fake = mock.create_autospec(pynvml, spec_set=False)
    fake.NVMLError = pynvml.NVMLError
    for name in dir(pynvml):
        if name.startswith("NVML_") and isinstance(getattr(pynvml, name), int):
            setattr(fake, name, getattr(pynvml, name))
    handles = [object(), object(), object()]
    fake.nvmlDeviceGetCount.return_value = 3
    fake.nvmlDeviceGetHandleByIndex.side_effect = lambda i: handles[i]
    fake.nvmlDeviceGetHandleByUUID.side_effect = lambda u: handles[UUIDS.index(u)]
    fake.nvmlDeviceGetUUID.side_effect = lambda h: UUIDS[handles.index(h)]
    fake.nvmlDeviceGetName.return_value = "NVIDIA A100-SXM4-80GB"

    def mig_mode(h: object) -> tuple[int, int]:
        if handles.index(h) == 1:
            return (pynvml.NVML_DEVICE_MIG_ENABLE, pynvml.NVML_DEVICE_MIG_ENABLE)
        if handles.index(h) == 0:
            raise _err(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return (pynvml.NVML_DEVICE_MIG_DISABLE, pynvml.NVML_DEVICE_MIG_DISABLE)

    fake.nvmlDeviceGetMigMode.side_effect = mig_mode
    fake.nvmlDeviceGetMPSComputeRunningProcesses.side_effect = lambda h: (
        [object()] if handles.index(h) == 2 else []
    )
    fake.nvmlDeviceGetSupportedMemoryClocks.return_value = [1593, 1215]
    fake.nvmlDeviceGetSupportedGraphicsClocks.side_effect = lambda h, mem: (
        [1410, 1395, 1380, 1410, 210] if mem == 1593 else [900]
    )
    fake.nvmlDeviceGetTotalEnergyConsumption.return_value = 123_456_789
    fake.nvmlDeviceGetClockInfo.return_value = 1410
    fake.nvmlDeviceGetPowerUsage.return_value = 250_500
    # Nobody has set clocks: application clocks at their default, the GPU idle.
    fake.nvmlDeviceGetApplicationsClock.return_value = 1095
    fake.nvmlDeviceGetDefaultApplicationsClock.return_value = 1095
    fake.nvmlDeviceGetCurrentClocksEventReasons.return_value = pynvml.nvmlClocksEventReasonGpuIdle
    with mock.patch.object(nvml_module, "pynvml", fake):
        yield fake


def test_inventory_refuses_mig_and_mps_with_reasons(nv: Any) -> None:
    backend = NvmlBackend()
    nv.nvmlInit.assert_not_called()  # lazy
    gpus = backend.list_gpus()
    nv.nvmlInit.assert_called_once_with()
    assert [g.uuid for g in gpus] == UUIDS
    assert gpus[0].usable and gpus[0].supported_sm_clocks_mhz == (1410, 1395, 1380, 210)
    nv.nvmlDeviceGetSupportedGraphicsClocks.assert_any_call(mock.ANY, 1593)
    assert not gpus[1].usable and "MIG" in gpus[1].reason
    assert not gpus[2].usable and "MPS" in gpus[2].reason
    with pytest.raises(GpuNotSupportedError, match="shared"):
        backend.set_locked_sm_clock(UUIDS[1], 1410)
    nv.nvmlDeviceSetGpuLockedClocks.assert_not_called()


def test_time_sliced_nodes_are_never_locked(nv: Any) -> None:
    backend = NvmlBackend(time_sliced=True)
    gpus = backend.list_gpus()
    assert not any(g.usable for g in gpus)
    assert "time slicing" in gpus[0].reason


def test_zero_gpus(nv: Any) -> None:
    nv.nvmlDeviceGetCount.return_value = 0
    assert NvmlBackend().list_gpus() == []


def test_lock_only_when_the_clock_changes_and_reset_both_clocks(nv: Any) -> None:
    backend = NvmlBackend()
    backend.set_locked_sm_clock(UUIDS[0], 1395)
    backend.set_locked_sm_clock(UUIDS[0], 1395)
    nv.nvmlDeviceSetGpuLockedClocks.assert_called_once_with(mock.ANY, 1395, 1395)
    assert backend.locked_sm_clock_mhz(UUIDS[0]) == 1395
    backend.reset_locked_clocks(UUIDS[0])
    nv.nvmlDeviceResetGpuLockedClocks.assert_called_once()
    nv.nvmlDeviceResetMemoryLockedClocks.assert_called_once()
    assert backend.locked_sm_clock_mhz(UUIDS[0]) is None
    backend.set_locked_sm_clock(UUIDS[0], 1395)
    assert nv.nvmlDeviceSetGpuLockedClocks.call_count == 2


def test_memory_clock_reset_unsupported_is_fine(nv: Any) -> None:
    nv.nvmlDeviceResetMemoryLockedClocks.side_effect = _err(pynvml.NVML_ERROR_NOT_SUPPORTED)
    NvmlBackend().reset_locked_clocks(UUIDS[0])
    nv.nvmlDeviceResetGpuLockedClocks.assert_called_once()


def test_readings(nv: Any) -> None:
    backend = NvmlBackend()
    assert backend.total_energy_mj(UUIDS[0]) == 123_456_789
    assert backend.current_sm_clock_mhz(UUIDS[0]) == 1410
    nv.nvmlDeviceGetClockInfo.assert_called_with(mock.ANY, pynvml.NVML_CLOCK_SM)
    assert backend.power_w(UUIDS[0]) == pytest.approx(250.5)


@pytest.mark.parametrize(
    ("code", "error"),
    [
        (pynvml.NVML_ERROR_NO_PERMISSION, GpuPermissionError),
        (pynvml.NVML_ERROR_NOT_SUPPORTED, GpuNotSupportedError),
        (pynvml.NVML_ERROR_GPU_IS_LOST, GpuLostError),
        (pynvml.NVML_ERROR_NOT_FOUND, GpuNotFoundError),
        (pynvml.NVML_ERROR_UNKNOWN, GpuError),
    ],
)
def test_errors_map_to_the_typed_hierarchy(nv: Any, code: int, error: type[GpuError]) -> None:
    nv.nvmlDeviceSetGpuLockedClocks.side_effect = _err(code)
    backend = NvmlBackend()
    with pytest.raises(error) as info:
        backend.set_locked_sm_clock(UUIDS[0], 1410)
    assert UUIDS[0] in str(info.value)
    assert type(map_nvml_error(_err(code), "x")) is error


def test_no_driver_is_a_clear_error(nv: Any) -> None:
    nv.nvmlInit.side_effect = _err(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
    with pytest.raises(GpuError, match="NVML is unavailable"):
        NvmlBackend().list_gpus()


def test_unknown_uuid(nv: Any) -> None:
    nv.nvmlDeviceGetHandleByUUID.side_effect = _err(pynvml.NVML_ERROR_NOT_FOUND)
    with pytest.raises(GpuNotFoundError):
        NvmlBackend().total_energy_mj("GPU-nope")


def test_close_shuts_down_once(nv: Any) -> None:
    backend = NvmlBackend()
    backend.close()
    nv.nvmlShutdown.assert_not_called()
    backend.list_gpus()
    backend.close()
    backend.close()
    nv.nvmlShutdown.assert_called_once_with()


# ---- locks set by someone else: NVML has no getter for locked clocks --------------------------


def _locked_by_admin(nv: Any) -> None:
    """What `nvidia-smi -lgc 1005,1005` shows on a busy GPU: the driver reports user-defined
    clocks holding the GPU back, and the GPU runs at the locked clock."""
    nv.nvmlDeviceGetCurrentClocksEventReasons.return_value = (
        pynvml.nvmlClocksEventReasonApplicationsClocksSetting
        | pynvml.nvmlClocksEventReasonSwPowerCap
    )
    nv.nvmlDeviceGetClockInfo.return_value = 1005


def test_a_lock_someone_else_set_is_seen_through_the_clock_event_reasons(nv: Any) -> None:
    _locked_by_admin(nv)
    assert NvmlBackend().locked_sm_clock_mhz(UUIDS[0]) == 1005
    nv.nvmlDeviceGetClockInfo.assert_called_with(mock.ANY, pynvml.NVML_CLOCK_SM)


def test_application_clocks_moved_off_their_default_count_as_set_by_someone_else(nv: Any) -> None:
    nv.nvmlDeviceGetApplicationsClock.return_value = 1200
    assert NvmlBackend().locked_sm_clock_mhz(UUIDS[0]) == 1200
    nv.nvmlDeviceGetApplicationsClock.assert_called_with(mock.ANY, pynvml.NVML_CLOCK_SM)
    nv.nvmlDeviceGetDefaultApplicationsClock.assert_called_with(mock.ANY, pynvml.NVML_CLOCK_SM)


@pytest.mark.parametrize(
    "reasons",
    [
        0,
        pynvml.nvmlClocksEventReasonGpuIdle,
        pynvml.nvmlClocksEventReasonSwPowerCap | pynvml.nvmlClocksEventReasonSyncBoost,
        pynvml.nvmlClocksEventReasonHwSlowdown | pynvml.nvmlClocksEventReasonSwThermalSlowdown,
    ],
)
def test_no_lock_seen_when_no_user_setting_holds_the_clock(nv: Any, reasons: int) -> None:
    nv.nvmlDeviceGetCurrentClocksEventReasons.return_value = reasons
    assert NvmlBackend().locked_sm_clock_mhz(UUIDS[0]) is None


def test_queries_the_gpu_lacks_tell_nothing(nv: Any) -> None:
    unsupported = _err(pynvml.NVML_ERROR_NOT_SUPPORTED)
    nv.nvmlDeviceGetApplicationsClock.side_effect = unsupported
    backend = NvmlBackend()
    assert backend.locked_sm_clock_mhz(UUIDS[0]) is None
    _locked_by_admin(nv)  # the reasons still show a lock when application clocks are unsupported
    assert backend.locked_sm_clock_mhz(UUIDS[0]) == 1005
    nv.nvmlDeviceGetCurrentClocksEventReasons.side_effect = unsupported
    assert backend.locked_sm_clock_mhz(UUIDS[0]) is None


def test_other_failures_of_the_lock_query_are_errors(nv: Any) -> None:
    nv.nvmlDeviceGetCurrentClocksEventReasons.side_effect = _err(pynvml.NVML_ERROR_GPU_IS_LOST)
    with pytest.raises(GpuLostError, match="clock reasons"):
        NvmlBackend().locked_sm_clock_mhz(UUIDS[0])


def test_our_own_lock_is_answered_from_our_record(nv: Any) -> None:
    backend = NvmlBackend()
    backend.set_locked_sm_clock(UUIDS[0], 1395)
    _locked_by_admin(nv)  # our own lock raises the same reason bit
    assert backend.locked_sm_clock_mhz(UUIDS[0]) == 1395


def _controller(backend: NvmlBackend, state_dir: Path) -> ClockController:
    return ClockController(backend, LockState(state_dir), Metrics())


def test_the_clock_rules_leave_an_administrators_lock_alone(nv: Any, tmp_path: Path) -> None:
    _locked_by_admin(nv)
    clocks = _controller(NvmlBackend(), tmp_path)
    assert clocks.apply(UUIDS[0], 1395) is False
    assert clocks.is_foreign(UUIDS[0])
    nv.nvmlDeviceSetGpuLockedClocks.assert_not_called()
    assert clocks.reset_all("shutdown") == []
    nv.nvmlDeviceResetGpuLockedClocks.assert_not_called()


def test_the_clock_rules_lock_a_gpu_nobody_holds(nv: Any, tmp_path: Path) -> None:
    clocks = _controller(NvmlBackend(), tmp_path)
    assert clocks.apply(UUIDS[0], 1395) is True
    nv.nvmlDeviceSetGpuLockedClocks.assert_called_once_with(mock.ANY, 1395, 1395)


def test_a_lost_record_resets_every_gpu_as_nvml_cannot_see_every_lock(
    nv: Any, tmp_path: Path
) -> None:
    """An idle GPU locked by a killed sidecar shows no reason bit: reset it all the same."""
    clocks = _controller(NvmlBackend(), tmp_path)
    assert clocks.reset_any_locked([UUIDS[0]], "startup-unknown-owner") == [UUIDS[0]]
    nv.nvmlDeviceResetGpuLockedClocks.assert_called_once()
