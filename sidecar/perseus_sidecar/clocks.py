"""Clock control with the safety rules: lock only when the clock changes, record a GPU on disk
before its first lock, reset only GPUs this sidecar recorded, and never touch a GPU that someone
else (an administrator) had already locked when we first wanted it."""

from __future__ import annotations

import logging

from perseus_sidecar.gpu.base import GpuBackend
from perseus_sidecar.lockstate import LockState
from perseus_sidecar.metrics import Metrics

__all__ = ["ClockController"]

log = logging.getLogger(__name__)


class ClockController:
    def __init__(self, backend: GpuBackend, lock_state: LockState, metrics: Metrics) -> None:
        self.backend = backend
        self.lock_state = lock_state
        self.metrics = metrics
        self._applied: dict[str, int] = {}
        self._foreign: set[str] = set()

    def applied_mhz(self, uuid: str) -> int | None:
        return self._applied.get(uuid)

    def is_foreign(self, uuid: str) -> bool:
        return uuid in self._foreign

    def apply(self, uuid: str, clock_mhz: int) -> bool:
        """Lock `uuid` at `clock_mhz` unless it already is; True when a lock call was made.
        Raises GpuError (from the backend) or LockStateError."""
        if self._applied.get(uuid) == clock_mhz:
            return False
        if uuid not in self.lock_state:
            if uuid in self._foreign:
                return False
            existing = self.backend.locked_sm_clock_mhz(uuid)
            if existing is not None:
                self._foreign.add(uuid)
                log.warning(
                    "GPU was locked by someone else; leaving it alone",
                    extra={"gpu": uuid, "clock_mhz": existing},
                )
                return False
            self.lock_state.add(uuid)
        self.backend.set_locked_sm_clock(uuid, clock_mhz)
        self._applied[uuid] = clock_mhz
        self.metrics.clock_changes.inc()
        return True

    def reset(self, uuid: str, reason: str) -> bool:
        """Reset `uuid` if this sidecar locked it; True when it did."""
        if uuid not in self.lock_state:
            return False
        self.backend.reset_locked_clocks(uuid)
        self._applied.pop(uuid, None)
        self.lock_state.discard(uuid)
        self.metrics.clock_resets.labels(reason=reason).inc()
        log.info("reset GPU clocks", extra={"gpu": uuid, "reason": reason})
        return True

    def reset_all(self, reason: str) -> list[str]:
        """Reset every GPU recorded as locked by this sidecar (also those of a previous, killed
        process); a GPU that fails is logged and kept in the record for the next attempt."""
        done: list[str] = []
        for uuid in sorted(self.lock_state.locked):
            try:
                if self.reset(uuid, reason):
                    done.append(uuid)
            except Exception as exc:
                log.error("cannot reset GPU clocks", extra={"gpu": uuid, "error": str(exc)})
        return done

    def reset_any_locked(self, uuids: list[str], reason: str) -> list[str]:
        """Reset every GPU of `uuids` whose clock is locked, whoever locked it: the recovery when
        the lock-state record is lost. Where the backend cannot see every lock (NVML), every GPU
        is reset: a lock left behind is worse than an unlocked clock reset. A GPU that fails is
        logged and skipped."""
        done: list[str] = []
        for uuid in uuids:
            try:
                if self.backend.sees_every_lock and self.backend.locked_sm_clock_mhz(uuid) is None:
                    continue
                self.backend.reset_locked_clocks(uuid)
            except Exception as exc:
                log.error("cannot reset GPU clocks", extra={"gpu": uuid, "error": str(exc)})
                continue
            self._applied.pop(uuid, None)
            self.metrics.clock_resets.labels(reason=reason).inc()
            done.append(uuid)
        return done

    def forget_foreign(self) -> None:
        """Look again at GPUs skipped as administrator-locked (they may have been released)."""
        self._foreign.clear()
