"""The NVML backend against pynvml mocked with autospec (signatures checked, no GPU needed)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from unittest import mock

import pynvml
import pytest

from perseus_sidecar.gpu import nvml as nvml_module
from perseus_sidecar.gpu.base import (
    GpuError,
    GpuLostError,
    GpuNotFoundError,
    GpuNotSupportedError,
    GpuPermissionError,
)
from perseus_sidecar.gpu.nvml import NvmlBackend, map_nvml_error

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
