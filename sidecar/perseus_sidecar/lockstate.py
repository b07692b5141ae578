"""The on-disk record of which GPUs this sidecar locked. Written before a first lock and after a
reset, atomically (write + fsync + rename), so that after a SIGKILL the next start resets exactly
those GPUs and leaves clocks an administrator locked by hand alone.

A file that cannot be read or parsed does not stop the sidecar: it is moved aside (`.corrupt`),
`unknown` says why, and the node then resets every locked GPU, as it cannot tell whose lock is
whose (a GPU left locked is worse than an administrator's lock undone)."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

__all__ = ["LockState", "LockStateError"]

FILENAME = "locked-gpus.json"


class LockStateError(RuntimeError):
    """The state file cannot be read or written; the message is one line."""


class LockState:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / FILENAME
        self._locked: set[str] = set()
        self.unknown: str | None = None
        """Why the previous run's record could not be read (None: it could, or there was none)."""
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LockStateError(f"cannot create state dir {state_dir}: {exc.strerror}") from None
        try:
            self._locked = self._read()
        except LockStateError as exc:
            self.unknown = str(exc)
            with contextlib.suppress(OSError):
                self.path.replace(self.path.with_name(FILENAME + ".corrupt"))

    @property
    def locked(self) -> frozenset[str]:
        return frozenset(self._locked)

    def __contains__(self, uuid: str) -> bool:
        return uuid in self._locked

    def add(self, uuid: str) -> None:
        if uuid not in self._locked:
            self._write(self._locked | {uuid})

    def discard(self, uuid: str) -> None:
        if uuid in self._locked:
            self._write(self._locked - {uuid})

    def _read(self) -> set[str]:
        try:
            raw = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return set()
        except OSError as exc:
            raise LockStateError(f"cannot read {self.path}: {exc.strerror}") from None
        try:
            data = json.loads(raw)
            gpus = data["locked_gpus"]
            if not isinstance(gpus, list) or not all(isinstance(g, str) for g in gpus):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise LockStateError(
                f"{self.path} is not a lock-state file; inspect and delete it"
            ) from None
        return set(gpus)

    def _write(self, locked: set[str]) -> None:
        tmp = self.path.with_suffix(".tmp")
        data = json.dumps({"locked_gpus": sorted(locked)})
        try:
            with tmp.open("w", encoding="utf-8") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            tmp.replace(self.path)
        except OSError as exc:
            raise LockStateError(f"cannot write {self.path}: {exc.strerror}") from None
        self._locked = locked
