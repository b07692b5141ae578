"""The NVML backend: the only module that imports pynvml (the official `nvidia-ml-py` bindings).

NVML is initialised on first use and shut down by `close()`. Errors are mapped to the typed
hierarchy of `base.py`. MIG-enabled GPUs, GPUs serving MPS clients and (when the node is
configured so) time-sliced GPUs are listed as unusable with a reason and never locked: locking
a shared GPU's clock would slow other tenants' work."""

from __future__ import annotations

import contextlib
from typing import Any

import pynvml

from perseus_sidecar.gpu.base import (
    GpuBackend,
    GpuError,
    GpuInfo,
    GpuLostError,
    GpuNotFoundError,
    GpuNotSupportedError,
    GpuPermissionError,
)

__all__ = ["NvmlBackend", "map_nvml_error"]


def map_nvml_error(exc: Exception, what: str) -> GpuError:
    """The typed error for an NVML failure, with a one-line message saying what failed."""
    code = getattr(exc, "value", None)
    message = f"{what}: {exc}"
    if code == pynvml.NVML_ERROR_NO_PERMISSION:
        return GpuPermissionError(f"{message} (the sidecar needs SYS_ADMIN or root)")
    if code in (pynvml.NVML_ERROR_NOT_SUPPORTED, pynvml.NVML_ERROR_FUNCTION_NOT_FOUND):
        return GpuNotSupportedError(message)
    if code == pynvml.NVML_ERROR_GPU_IS_LOST:
        return GpuLostError(message)
    if code in (pynvml.NVML_ERROR_NOT_FOUND, pynvml.NVML_ERROR_INVALID_ARGUMENT):
        return GpuNotFoundError(message)
    return GpuError(message)


class NvmlBackend(GpuBackend):
    def __init__(self, *, time_sliced: bool = False) -> None:
        self._time_sliced = time_sliced
        self._initialised = False
        self._handles: dict[str, Any] = {}
        self._usable: dict[str, bool] = {}
        self._locked: dict[str, int] = {}

    # ---- plumbing ---------------------------------------------------------------------------

    def _init(self) -> None:
        if self._initialised:
            return
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            raise GpuError(f"NVML is unavailable (no driver or no GPU visible): {exc}") from None
        self._initialised = True

    def _handle(self, uuid: str) -> Any:
        self._init()
        handle = self._handles.get(uuid)
        if handle is None:
            try:
                handle = pynvml.nvmlDeviceGetHandleByUUID(uuid)
            except pynvml.NVMLError as exc:
                raise map_nvml_error(exc, f"GPU {uuid}") from None
            self._handles[uuid] = handle
        return handle

    def _call(self, uuid: str, what: str, fn: Any, *args: Any) -> Any:
        handle = self._handle(uuid)
        try:
            return fn(handle, *args)
        except pynvml.NVMLError as exc:
            raise map_nvml_error(exc, f"{what} on GPU {uuid}") from None

    # ---- inventory --------------------------------------------------------------------------

    def list_gpus(self) -> list[GpuInfo]:
        self._init()
        try:
            count = pynvml.nvmlDeviceGetCount()
        except pynvml.NVMLError as exc:
            raise map_nvml_error(exc, "counting GPUs") from None
        gpus = []
        for index in range(count):
            try:
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                uuid = _text(pynvml.nvmlDeviceGetUUID(handle))
                name = _text(pynvml.nvmlDeviceGetName(handle))
            except pynvml.NVMLError as exc:
                raise map_nvml_error(exc, f"reading GPU {index}") from None
            self._handles[uuid] = handle
            reason = self._unusable_reason(handle)
            clocks: tuple[int, ...] = ()
            if not reason:
                try:
                    clocks = _supported_clocks(handle)
                except pynvml.NVMLError as exc:
                    reason = f"cannot read supported clocks: {exc}"
            if not clocks and not reason:
                reason = "the driver reports no supported graphics clocks"
            self._usable[uuid] = not reason
            gpus.append(
                GpuInfo(
                    index=index,
                    uuid=uuid,
                    name=name,
                    supported_sm_clocks_mhz=clocks or (0,),
                    usable=not reason,
                    reason=reason,
                )
            )
        return gpus

    def _unusable_reason(self, handle: Any) -> str:
        try:
            current, _pending = pynvml.nvmlDeviceGetMigMode(handle)
            if current == pynvml.NVML_DEVICE_MIG_ENABLE:
                return "MIG is enabled: its instances share the GPU's clock"
        except pynvml.NVMLError:
            pass  # not MIG-capable
        try:
            if pynvml.nvmlDeviceGetMPSComputeRunningProcesses(handle):
                return "MPS clients run on it: the clock is shared"
        except pynvml.NVMLError:
            pass  # not reported by this driver
        if self._time_sliced:
            return "the node shares GPUs by time slicing: the clock is shared"
        return ""

    # ---- clocks -----------------------------------------------------------------------------

    def _require_usable(self, uuid: str) -> None:
        if uuid not in self._usable:
            self.list_gpus()
        usable = self._usable.get(uuid)
        if usable is None:
            raise GpuNotFoundError(f"no GPU {uuid} on this node")
        if not usable:
            raise GpuNotSupportedError(f"GPU {uuid} is shared (MIG/MPS/time-sliced): not locked")

    def set_locked_sm_clock(self, uuid: str, clock_mhz: int) -> None:
        self._require_usable(uuid)
        if self._locked.get(uuid) == clock_mhz:
            return
        self._call(
            uuid, "locking clocks", pynvml.nvmlDeviceSetGpuLockedClocks, clock_mhz, clock_mhz
        )
        self._locked[uuid] = clock_mhz

    def reset_locked_clocks(self, uuid: str) -> None:
        self._call(uuid, "resetting clocks", pynvml.nvmlDeviceResetGpuLockedClocks)
        self._locked.pop(uuid, None)
        # Pre-Ampere GPUs and old drivers have no memory clock locks.
        with contextlib.suppress(GpuNotSupportedError):
            self._call(uuid, "resetting memory clocks", pynvml.nvmlDeviceResetMemoryLockedClocks)

    # NVML has setters for locked clocks but no getter, so a lock set by someone else (e.g.
    # `nvidia-smi -lgc`) is only seen through its effects; see docs/install.md, "Clocks someone
    # else set".
    sees_every_lock = False

    def locked_sm_clock_mhz(self, uuid: str) -> int | None:
        """Our own lock; else an SM clock someone else set, as far as NVML shows one: application
        clocks moved off their default (their target), or the driver reporting that user-defined
        clocks hold the GPU back now (the clock it runs at). None when neither shows."""
        own = self._locked.get(uuid)
        if own is not None:
            return own
        handle = self._handle(uuid)
        try:
            target = pynvml.nvmlDeviceGetApplicationsClock(handle, pynvml.NVML_CLOCK_SM)
            default = pynvml.nvmlDeviceGetDefaultApplicationsClock(handle, pynvml.NVML_CLOCK_SM)
            if int(target) != int(default):
                return int(target)
        except pynvml.NVMLError as exc:
            _raise_unless_unsupported(exc, f"reading application clocks on GPU {uuid}")
        try:
            mask = int(_clock_event_reasons(handle))
            if mask & _USER_DEFINED_CLOCKS:
                return int(pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM))
        except pynvml.NVMLError as exc:
            _raise_unless_unsupported(exc, f"reading clock reasons on GPU {uuid}")
        return None

    # ---- readings ---------------------------------------------------------------------------

    def total_energy_mj(self, uuid: str) -> int:
        return int(self._call(uuid, "reading energy", pynvml.nvmlDeviceGetTotalEnergyConsumption))

    def current_sm_clock_mhz(self, uuid: str) -> int:
        return int(
            self._call(uuid, "reading clock", pynvml.nvmlDeviceGetClockInfo, pynvml.NVML_CLOCK_SM)
        )

    def power_w(self, uuid: str) -> float:
        return float(self._call(uuid, "reading power", pynvml.nvmlDeviceGetPowerUsage)) / 1000.0

    # ---- diagnostics: read-only queries for `perseus-sidecar doctor` ------------------------

    def driver_version(self) -> str:
        self._init()
        try:
            return _text(pynvml.nvmlSystemGetDriverVersion())
        except pynvml.NVMLError as exc:
            raise map_nvml_error(exc, "reading the driver version") from None

    def supported_sm_clocks_mhz(self, uuid: str) -> tuple[int, ...]:
        """Read even for unusable GPUs, which `list_gpus` does not query."""
        return tuple(self._call(uuid, "reading supported clocks", _supported_clocks))

    def supported_memory_clocks_mhz(self, uuid: str) -> tuple[int, ...]:
        clocks = self._call(
            uuid, "reading memory clocks", pynvml.nvmlDeviceGetSupportedMemoryClocks
        )
        return tuple(sorted({int(c) for c in clocks}, reverse=True))

    def current_memory_clock_mhz(self, uuid: str) -> int:
        return int(
            self._call(uuid, "reading clock", pynvml.nvmlDeviceGetClockInfo, pynvml.NVML_CLOCK_MEM)
        )

    def max_rated_sm_clock_mhz(self, uuid: str) -> int:
        """The highest SM clock the GPU is rated for (boost), independent of any lock."""
        return int(
            self._call(
                uuid, "reading max clock", pynvml.nvmlDeviceGetMaxClockInfo, pynvml.NVML_CLOCK_SM
            )
        )

    def mig_enabled(self, uuid: str) -> bool:
        """Raises GpuNotSupportedError on GPUs without MIG."""
        current, _pending = self._call(uuid, "reading MIG mode", pynvml.nvmlDeviceGetMigMode)
        return bool(current == pynvml.NVML_DEVICE_MIG_ENABLE)

    def power_limit_w(self, uuid: str) -> float:
        limit_mw = self._call(uuid, "reading power limit", pynvml.nvmlDeviceGetEnforcedPowerLimit)
        return float(limit_mw) / 1000.0

    def clock_event_reasons(self, uuid: str) -> tuple[str, ...]:
        """Why the clocks are below their maximum now (idle, power cap, a user's lock...)."""
        mask = int(self._call(uuid, "reading clock reasons", _clock_event_reasons))
        return tuple(name for bit, name in _CLOCK_EVENT_REASONS if mask & bit)

    def close(self) -> None:
        if not self._initialised:
            return
        self._initialised = False
        self._handles.clear()
        with contextlib.suppress(pynvml.NVMLError):  # the driver may be gone already
            pynvml.nvmlShutdown()


# The "applications clocks setting" reason, which older headers call "user-defined clocks": set
# while a clock setting (application clocks or a lock) holds the GPU below what it would run at.
_USER_DEFINED_CLOCKS = 0x2

# NVML's clock event reason bits (stable ABI values; older bindings name them "throttle reasons").
_CLOCK_EVENT_REASONS = (
    (0x1, "idle"),
    (0x2, "user-defined clocks (locked or application clocks)"),
    (0x4, "software power cap"),
    (0x8, "hardware slowdown"),
    (0x10, "sync boost"),
    (0x20, "software thermal slowdown"),
    (0x40, "hardware thermal slowdown"),
    (0x80, "hardware power brake"),
    (0x100, "display clock setting"),
)


def _clock_event_reasons(handle: Any) -> Any:
    # Bindings older than the R535 rename only have the "throttle reasons" name.
    read = getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
    if read is None:
        read = pynvml.nvmlDeviceGetCurrentClocksThrottleReasons
    return read(handle)


def _raise_unless_unsupported(exc: Exception, what: str) -> None:
    """A query this GPU or driver lacks tells nothing; any other failure is an error."""
    error = map_nvml_error(exc, what)
    if not isinstance(error, GpuNotSupportedError):
        raise error from None


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _supported_clocks(handle: Any) -> tuple[int, ...]:
    """Graphics clocks supported at the highest memory clock, highest first."""
    memory_mhz = max(pynvml.nvmlDeviceGetSupportedMemoryClocks(handle))
    clocks = pynvml.nvmlDeviceGetSupportedGraphicsClocks(handle, memory_mhz)
    return tuple(sorted({int(c) for c in clocks}, reverse=True))
