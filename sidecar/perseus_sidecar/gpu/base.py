"""The GPU backend interface. Method names carry their units; errors form a small typed hierarchy
that the HTTP layer maps to clear responses. Implementations: `nvml.py` (the only module that
imports pynvml) and `simulated.py`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

__all__ = [
    "GpuBackend",
    "GpuError",
    "GpuInfo",
    "GpuLostError",
    "GpuNotFoundError",
    "GpuNotSupportedError",
    "GpuPermissionError",
]


class GpuError(Exception):
    """Base of every backend error; the message is one readable line."""


class GpuPermissionError(GpuError):
    """The process may not change clocks (missing SYS_ADMIN / root on the node)."""


class GpuNotSupportedError(GpuError):
    """The device or driver does not support the operation (e.g. MIG, old GPUs)."""


class GpuLostError(GpuError):
    """The GPU fell off the bus or the driver lost it."""


class GpuNotFoundError(GpuError):
    """No GPU with that UUID is managed by this backend."""


@dataclass(frozen=True)
class GpuInfo:
    """A GPU this backend can manage. `supported_sm_clocks_mhz` is sorted highest first and is
    taken at the highest memory clock; `usable` is False with a `reason` for MIG/MPS/time-sliced
    devices, which are listed but never locked."""

    index: int
    uuid: str
    name: str
    supported_sm_clocks_mhz: tuple[int, ...]
    usable: bool = True
    reason: str = ""

    @property
    def max_sm_clock_mhz(self) -> int:
        return self.supported_sm_clocks_mhz[0]


class GpuBackend(ABC):
    """Access to the node's GPUs. Calls are synchronous and fast (NVML calls take microseconds
    to a millisecond); callers on an event loop may call them directly on the hot path."""

    @abstractmethod
    def list_gpus(self) -> list[GpuInfo]:
        """All visible GPUs (an empty list when none is visible)."""

    @abstractmethod
    def set_locked_sm_clock(self, uuid: str, clock_mhz: int) -> None:
        """Lock the SM clock to exactly `clock_mhz` (min = max)."""

    @abstractmethod
    def reset_locked_clocks(self, uuid: str) -> None:
        """Undo any SM (and, where supported, memory) clock lock: back to driver control."""

    sees_every_lock: bool = True
    """False where a lock set outside this process can go unseen by `locked_sm_clock_mhz`."""

    @abstractmethod
    def locked_sm_clock_mhz(self, uuid: str) -> int | None:
        """The SM clock this GPU is locked at, by this backend or by someone else (an
        administrator), or None when no lock is seen."""

    @abstractmethod
    def total_energy_mj(self, uuid: str) -> int:
        """Total energy since driver load, in millijoules. Updates only every 20-100 ms."""

    @abstractmethod
    def current_sm_clock_mhz(self, uuid: str) -> int:
        """The SM clock the GPU runs at now."""

    @abstractmethod
    def power_w(self, uuid: str) -> float:
        """Current power draw in watts."""

    def close(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing
        """Release the backend (NVML shutdown). Idempotent."""
