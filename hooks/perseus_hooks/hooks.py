"""One rank's hooks (:class:`Hooks`) and the module-level API over a default rank
(:func:`register`, :func:`instruction`, ...): the training thread's side. A call only timestamps
the event and queues it (about a microsecond); :mod:`perseus_hooks.sender` does the network.

While the sidecar applies a frequency schedule to this rank (it says so with ``S 1`` / ``S 0``),
every begin event is preceded by the `sync` callable (e.g. ``torch.cuda.synchronize``): without
it "begin" is when the CPU enqueues the work, not when the GPU runs it, and the clock would
change too early.
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Literal

from perseus_hooks.config import HooksConfig, config_from_environment
from perseus_hooks.sender import STOP, Sender
from perseus_hooks.wire import (
    BEGIN_CODES,
    END_CODES,
    ITERATION_END_CODE,
    MAX_CHUNKS,
    MAX_MICROBATCH,
    Event,
)

__all__ = [
    "Hooks",
    "InstructionKind",
    "default_hooks",
    "instruction",
    "instruction_begin",
    "instruction_end",
    "iteration_end",
    "register",
]

log = logging.getLogger("perseus.hooks")

InstructionKind = Literal["forward", "backward"]
SyncPolicy = Literal["schedule", "always", "never"]
SyncArg = Callable[[], object] | Literal["auto"] | None


class _Instruction:
    """``with hooks.instruction("forward", m):`` without a generator's overhead."""

    __slots__ = ("_chunk", "_hooks", "_kind", "_microbatch")

    def __init__(self, hooks: Hooks, kind: InstructionKind, microbatch: int, chunk: int) -> None:
        self._hooks = hooks
        self._kind = kind
        self._microbatch = microbatch
        self._chunk = chunk

    def __enter__(self) -> None:
        self._hooks.instruction_begin(self._kind, self._microbatch, chunk=self._chunk)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._hooks.instruction_end(self._kind, self._microbatch, chunk=self._chunk)


def _auto_sync() -> Callable[[], object] | None:
    """``torch.cuda.synchronize`` when the script already imported torch and has CUDA."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        if torch.cuda.is_available():
            sync: Callable[[], object] = torch.cuda.synchronize
            return sync
    except Exception:
        log.debug("torch.cuda unusable for sync", exc_info=True)
    return None


class Hooks:
    """One rank's hooks. Calls on the training thread never block on the network."""

    def __init__(
        self,
        config: HooksConfig | None,
        *,
        sync: SyncArg = "auto",
        sync_policy: SyncPolicy = "schedule",
    ) -> None:
        if sync_policy not in ("schedule", "always", "never"):
            raise ValueError(f"sync_policy must be schedule, always or never, got {sync_policy!r}")
        self.config = config
        self._sync = _auto_sync() if sync == "auto" else sync
        self._sync_policy = sync_policy
        self._schedule_active = False
        self._sync_now: Callable[[], object] | None = (
            self._sync if sync_policy == "always" else None
        )
        self._queue: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._enqueued = 0
        self._done = 0
        self._dropped = 0
        self._progress = threading.Condition()
        self._connected = threading.Event()
        self._closed = False
        self.rank_id: str | None = None
        self._thread: threading.Thread | None = None
        if config is not None:
            self._thread = threading.Thread(
                target=Sender(self, config).run,
                name=f"perseus-hooks-rank{config.rank}",
                daemon=True,
            )
            self._thread.start()

    # Training thread ---------------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        return self.config is not None

    @property
    def schedule_active(self) -> bool:
        """Whether the sidecar applies a frequency schedule to this rank now."""
        return self._schedule_active

    def instruction_begin(
        self, kind: InstructionKind, microbatch: int, t_ns: int | None = None, *, chunk: int = 0
    ) -> None:
        """The forward/backward of `microbatch` (on model chunk `chunk` of this stage, in an
        interleaved pipeline) begins (after `sync` while a schedule is on). `t_ns`
        (``time.time_ns()`` scale, default now) is for simulators and replays, whose timeline
        is not the calling thread's wake-up time."""
        code = _event_code(BEGIN_CODES, kind, microbatch, chunk)
        sync = self._sync_now
        if sync is not None:
            sync()
        if self.config is not None:
            self._enqueued += 1
            self._queue.put((code, microbatch, time.time_ns() if t_ns is None else t_ns, chunk))

    def instruction_end(
        self, kind: InstructionKind, microbatch: int, t_ns: int | None = None, *, chunk: int = 0
    ) -> None:
        """The forward/backward of `microbatch` (on `chunk`) ended (as enqueued: no sync here)."""
        code = _event_code(END_CODES, kind, microbatch, chunk)
        if self.config is not None:
            self._enqueued += 1
            self._queue.put((code, microbatch, time.time_ns() if t_ns is None else t_ns, chunk))

    def iteration_end(self, t_ns: int | None = None) -> None:
        """The iteration's pipeline work is over: the sidecar returns the GPU to maximum clock."""
        if self.config is not None:
            self._enqueued += 1
            self._queue.put((ITERATION_END_CODE, -1, time.time_ns() if t_ns is None else t_ns, 0))

    def instruction(self, kind: InstructionKind, microbatch: int, chunk: int = 0) -> _Instruction:
        """Context manager: begin on entry, end on exit."""
        return _Instruction(self, kind, microbatch, chunk)

    # Control ------------------------------------------------------------------------------------

    def wait_connected(self, timeout_s: float) -> bool:
        """Wait until the event stream to the sidecar is up (tests, simulations)."""
        return self._connected.wait(timeout_s)

    def flush(self, timeout_s: float = 2.0) -> bool:
        """Wait until every event enqueued so far was sent or dropped; False on timeout."""
        target = self._enqueued
        deadline = time.monotonic() + timeout_s
        with self._progress:
            while self._done < target:
                left = deadline - time.monotonic()
                if left <= 0 or self._thread is None or not self._thread.is_alive():
                    return False
                self._progress.wait(left)
        return True

    @property
    def dropped_events(self) -> int:
        """Events lost to a full buffer or a broken connection."""
        return self._dropped

    def close(self, timeout_s: float = 2.0) -> None:
        """Flush for up to `timeout_s` (when connected: a training job must not hang on exit
        for a sidecar that is down), then stop the sender. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            if self._connected.is_set():
                self.flush(timeout_s)
            self._queue.put(STOP)
            self._thread.join(timeout_s)

    def __enter__(self) -> Hooks:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # Sender thread's view -------------------------------------------------------------------------

    def _set_schedule_active(self, active: bool) -> None:
        self._schedule_active = active
        if self._sync_policy == "schedule":
            self._sync_now = self._sync if active else None

    def _account(self, sent: int, dropped: int) -> None:
        with self._progress:
            self._done += sent + dropped
            self._dropped += dropped
            self._progress.notify_all()


# Module-level API over one default rank ----------------------------------------------------

_default = Hooks(None, sync=None)


def default_hooks() -> Hooks:
    """The hooks :func:`register` set up last (a no-op instance before that)."""
    return _default


def register(
    *,
    rank: int,
    pipeline_rank: int,
    data_rank: int,
    gpu_uuid: str | None = None,
    tensor_rank: int = 0,
    host: str | None = None,
    port: int | None = None,
    namespace: str | None = None,
    pod: str | None = None,
    job_token: str | None = None,
    job_token_file: str | None = None,
    source_ip: str | None = None,
    event_port: int | None = None,
    sync: SyncArg = "auto",
    sync_policy: SyncPolicy = "schedule",
    make_default: bool = True,
    connect_timeout_s: float = 2.0,
    min_backoff_s: float = 0.1,
    max_backoff_s: float = 5.0,
    buffer_events: int = 8192,
) -> Hooks:
    """Register this rank with the node's sidecar in the background and return its hooks.

    Missing arguments come from the environment (see :mod:`perseus_hooks`); `gpu_uuid` falls back to
    ``PERSEUS_GPU_UUID``. Without a sidecar host or GPU UUID the hooks are a no-op and one
    warning says why. `source_ip` binds the client sockets to that local address (a pod's IP
    when several simulated pods share one host). The last four arguments tune the sender
    (see :class:`HooksConfig`).
    """
    global _default  # noqa: PLW0603 - the module-level API is for one rank per process
    config = config_from_environment(
        rank=rank,
        pipeline_rank=pipeline_rank,
        data_rank=data_rank,
        tensor_rank=tensor_rank,
        gpu_uuid=gpu_uuid,
        host=host,
        port=port,
        namespace=namespace,
        pod=pod,
        job_token=job_token,
        job_token_file=job_token_file,
        source_ip=source_ip,
        event_port=event_port,
        connect_timeout_s=connect_timeout_s,
        min_backoff_s=min_backoff_s,
        max_backoff_s=max_backoff_s,
        buffer_events=buffer_events,
    )
    hooks = Hooks(config, sync=sync, sync_policy=sync_policy)
    if make_default:
        _default = hooks
    return hooks


def instruction_begin(kind: InstructionKind, microbatch: int, chunk: int = 0) -> None:
    """:meth:`Hooks.instruction_begin` on the default hooks."""
    _default.instruction_begin(kind, microbatch, chunk=chunk)


def instruction_end(kind: InstructionKind, microbatch: int, chunk: int = 0) -> None:
    """:meth:`Hooks.instruction_end` on the default hooks."""
    _default.instruction_end(kind, microbatch, chunk=chunk)


def iteration_end() -> None:
    """:meth:`Hooks.iteration_end` on the default hooks."""
    _default.iteration_end()


def instruction(kind: InstructionKind, microbatch: int, chunk: int = 0) -> _Instruction:
    """:meth:`Hooks.instruction` on the default hooks."""
    return _default.instruction(kind, microbatch, chunk)


def _event_code(codes: dict[str, str], kind: str, microbatch: int, chunk: int) -> str:
    """The wire code of an instruction event, once its arguments are checked (a bad call fails
    in the training thread, where the mistake is, never in the sender)."""
    code = codes.get(kind)
    if code is None:
        raise ValueError(f"instruction kind must be 'forward' or 'backward', got {kind!r}")
    if not 0 <= microbatch <= MAX_MICROBATCH:
        # the sidecar closes a stream that names a larger one
        raise ValueError(f"microbatch must be >= 0 and <= {MAX_MICROBATCH}, got {microbatch}")
    if not 0 <= chunk < MAX_CHUNKS:
        raise ValueError(f"chunk must be 0-{MAX_CHUNKS - 1}, got {chunk}")
    return code
