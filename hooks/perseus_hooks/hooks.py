"""Training-side hooks: tell the node's Perseus sidecar when each forward/backward begins and ends.

Standard library only, so any training script can import it. A call on the training thread only
timestamps the event and hands it to a background thread (about a microsecond); that thread
registers the rank over HTTP, holds one TCP connection to the sidecar's event port and streams the
events as lines. If the sidecar is down, slow or refuses the rank, training goes on: one warning
is logged, events are buffered (bounded, oldest dropped) and the thread retries with backoff.

While the sidecar applies a frequency schedule to this rank (it says so with ``S 1`` / ``S 0``),
every begin event is preceded by the `sync` callable (e.g. ``torch.cuda.synchronize``): without
it "begin" is when the CPU enqueues the work, not when the GPU runs it, and the clock would
change too early.

Typical use::

    from perseus_sidecar import hooks

    perseus = hooks.register(rank=rank, pipeline_rank=stage, data_rank=dp, gpu_uuid=uuid)
    for step in range(steps):
        for kind, microbatch in schedule:
            with perseus.instruction(kind, microbatch):
                run(kind, microbatch)
        perseus.iteration_end()

An interleaved pipeline (Megatron-LM's virtual stages: the stage runs v model chunks) names the
chunk of every instruction: ``perseus.instruction(kind, microbatch, chunk=c)``.

The sidecar address, pod identity and job token come from the environment a Kubernetes pod is
given (``PERSEUS_SIDECAR_HOST`` from the downward API's ``status.hostIP``,
``PERSEUS_SIDECAR_PORT``, ``PERSEUS_POD_NAMESPACE``, ``PERSEUS_POD_NAME``,
``PERSEUS_JOB_TOKEN_FILE``, and ``PERSEUS_SIDECAR_EVENT_PORT`` where the event port reaches the
pod under another number than the sidecar announces, e.g. a remapped host port); arguments
override them. Without a sidecar host the hooks are a
no-op, so the same script runs anywhere.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import queue
import select
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Literal

__all__ = [
    "DEFAULT_JOB_TOKEN_FILE",
    "Hooks",
    "HooksConfig",
    "InstructionKind",
    "default_hooks",
    "instruction",
    "instruction_begin",
    "instruction_end",
    "iteration_end",
    "register",
]

log = logging.getLogger("perseus.hooks")

DEFAULT_JOB_TOKEN_FILE = "/var/run/perseus/job-token/token"
DEFAULT_PORT = 8080
InstructionKind = Literal["forward", "backward"]
SyncPolicy = Literal["schedule", "always", "never"]
SyncArg = Callable[[], object] | Literal["auto"] | None

_BEGIN = {"forward": "FB", "backward": "BB"}
_END = {"forward": "FE", "backward": "BE"}
_STOP = ("", 0, 0, 0)
MAX_CHUNKS = 64
_BATCH = 256
_POLL_S = 0.05
"""How often an idle sender checks the socket for schedule notices."""


class HooksConfig:
    """Everything the background sender needs; built by :func:`register` from arguments and the
    environment. The job token is re-read from its file at every registration attempt, because
    the Secret is mounted optionally and may appear only after the pod started."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        namespace: str,
        pod: str,
        rank: int,
        pipeline_rank: int,
        data_rank: int,
        tensor_rank: int,
        gpu_uuid: str,
        job_token: str | None = None,
        job_token_file: str = DEFAULT_JOB_TOKEN_FILE,
        source_ip: str | None = None,
        event_port: int | None = None,
        connect_timeout_s: float = 2.0,
        min_backoff_s: float = 0.1,
        max_backoff_s: float = 5.0,
        buffer_events: int = 8192,
    ) -> None:
        for label, value in (
            ("rank", rank),
            ("pipeline_rank", pipeline_rank),
            ("data_rank", data_rank),
            ("tensor_rank", tensor_rank),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{label} must be an integer >= 0, got {value!r}")
        if not 0 < port < 65536:
            raise ValueError(f"sidecar port must be 1-65535, got {port}")
        if event_port is not None and not 0 < event_port < 65536:
            raise ValueError(f"sidecar event port must be 1-65535, got {event_port}")
        if buffer_events < 1:
            raise ValueError(f"buffer_events must be >= 1, got {buffer_events}")
        if not 0 < min_backoff_s <= max_backoff_s:
            raise ValueError("backoff must satisfy 0 < min_backoff_s <= max_backoff_s")
        self.host = host
        self.port = port
        self.namespace = namespace
        self.pod = pod
        self.rank = rank
        self.pipeline_rank = pipeline_rank
        self.data_rank = data_rank
        self.tensor_rank = tensor_rank
        self.gpu_uuid = gpu_uuid
        self.job_token = job_token
        self.job_token_file = job_token_file
        self.source_ip = source_ip
        self.event_port = event_port
        self.connect_timeout_s = connect_timeout_s
        self.min_backoff_s = min_backoff_s
        self.max_backoff_s = max_backoff_s
        self.buffer_events = buffer_events

    def token(self) -> str:
        if self.job_token is not None:
            return self.job_token
        try:
            return Path(self.job_token_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise _RefusedError(f"job token file {self.job_token_file} unreadable: {exc}") from None

    def source_address(self) -> tuple[str, int] | None:
        return None if self.source_ip is None else (self.source_ip, 0)


class _RefusedError(Exception):
    """The sidecar (or the environment) refused this attempt; retry later. `forget_rank` when
    the rank must register again (e.g. the sidecar restarted and no longer knows it)."""

    def __init__(self, message: str, *, forget_rank: bool = False) -> None:
        super().__init__(message)
        self.forget_rank = forget_rank


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
        self._queue: queue.SimpleQueue[tuple[str, int, int, int]] = queue.SimpleQueue()
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
                target=_Sender(self, config).run,
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
        code = _BEGIN.get(kind)
        if code is None:
            raise ValueError(f"instruction kind must be 'forward' or 'backward', got {kind!r}")
        if microbatch < 0:
            raise ValueError(f"microbatch must be >= 0, got {microbatch}")
        if not 0 <= chunk < MAX_CHUNKS:
            raise ValueError(f"chunk must be 0-{MAX_CHUNKS - 1}, got {chunk}")
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
        code = _END.get(kind)
        if code is None:
            raise ValueError(f"instruction kind must be 'forward' or 'backward', got {kind!r}")
        if microbatch < 0:
            raise ValueError(f"microbatch must be >= 0, got {microbatch}")
        if not 0 <= chunk < MAX_CHUNKS:
            raise ValueError(f"chunk must be 0-{MAX_CHUNKS - 1}, got {chunk}")
        if self.config is not None:
            self._enqueued += 1
            self._queue.put((code, microbatch, time.time_ns() if t_ns is None else t_ns, chunk))

    def iteration_end(self, t_ns: int | None = None) -> None:
        """The iteration's pipeline work is over: the sidecar returns the GPU to maximum clock."""
        if self.config is not None:
            self._enqueued += 1
            self._queue.put(("IE", -1, time.time_ns() if t_ns is None else t_ns, 0))

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
            self._queue.put(_STOP)
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


class _Sender:
    """The background thread: register, connect, stream, reconnect with backoff."""

    def __init__(self, hooks: Hooks, config: HooksConfig) -> None:
        self.hooks = hooks
        self.config = config
        self.pending: deque[tuple[str, int, int, int]] = deque()
        self.sock: socket.socket | None = None
        self.inbox = b""
        self.backoff_s = config.min_backoff_s
        self.retry_at = 0.0
        self.warned = False
        self.stopping = False
        self.event_port = 0

    def run(self) -> None:
        try:
            while not (self.stopping and not self.pending):
                wait_s = _POLL_S
                if self.sock is None:
                    wait_s = min(max(self.retry_at - time.monotonic(), 0.0), _POLL_S)
                self._collect(wait_s)
                if self.sock is None and time.monotonic() >= self.retry_at:
                    self._try_connect()
                if self.sock is not None:
                    self._exchange()
                elif self.stopping:
                    self._drop(len(self.pending))
                    self.pending.clear()
        finally:
            self._disconnect()

    def _collect(self, wait_s: float) -> None:
        """Move queued events into the bounded buffer, waiting up to `wait_s` for the first."""
        q = self.hooks._queue
        try:
            item = q.get(timeout=wait_s) if not self.stopping else q.get_nowait()
        except queue.Empty:
            return
        while True:
            if item is _STOP:
                self.stopping = True
            else:
                self.pending.append(item)
            try:
                item = q.get_nowait()
            except queue.Empty:
                break
        overflow = len(self.pending) - self.config.buffer_events
        if overflow > 0:
            for _ in range(overflow):
                self.pending.popleft()
            self._drop(overflow)

    def _drop(self, count: int) -> None:
        if count:
            self.hooks._account(0, count)

    def _fail(self, reason: str) -> None:
        self._disconnect()
        if not self.warned:
            self.warned = True
            log.warning(
                "perseus hooks (rank %d): sidecar at %s:%d unavailable: %s; training continues, "
                "retrying with backoff",
                self.config.rank,
                self.config.host,
                self.config.port,
                reason,
            )
        else:
            log.debug("perseus hooks (rank %d): %s", self.config.rank, reason)
        self.retry_at = time.monotonic() + self.backoff_s
        self.backoff_s = min(self.backoff_s * 2, self.config.max_backoff_s)

    def _try_connect(self) -> None:
        try:
            token = self.config.token()
            if self.hooks.rank_id is None:
                self.hooks.rank_id, announced_port, active = self._register(token)
                self.event_port = self.config.event_port or announced_port
            self.sock, active = self._open_stream(self.hooks.rank_id, token)
        except (_RefusedError, OSError, ValueError, KeyError) as exc:
            if isinstance(exc, _RefusedError) and exc.forget_rank:
                self.hooks.rank_id = None
            self._fail(str(exc) or type(exc).__name__)
            return
        self.hooks._set_schedule_active(active)
        self.backoff_s = self.config.min_backoff_s
        if self.warned:
            log.info("perseus hooks (rank %d): connected to the sidecar again", self.config.rank)
            self.warned = False
        self.hooks._connected.set()

    def _register(self, token: str) -> tuple[str, int, bool]:
        c = self.config
        conn = http.client.HTTPConnection(
            c.host, c.port, timeout=c.connect_timeout_s, source_address=c.source_address()
        )
        body = json.dumps(
            {
                "namespace": c.namespace,
                "pod": c.pod,
                "rank": c.rank,
                "pipeline_rank": c.pipeline_rank,
                "data_rank": c.data_rank,
                "tensor_rank": c.tensor_rank,
                "gpu_uuid": c.gpu_uuid,
            }
        )
        try:
            conn.request(
                "POST",
                "/v1/ranks",
                body=body,
                headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            )
            response = conn.getresponse()
            payload = response.read(65536)
        finally:
            conn.close()
        if response.status != 201:
            detail = payload.decode("utf-8", "replace")[:300]
            raise _RefusedError(f"registration refused with HTTP {response.status}: {detail}")
        data = json.loads(payload)
        return str(data["rank_id"]), int(data["event_port"]), bool(data["schedule_active"])

    def _open_stream(self, rank_id: str, token: str) -> tuple[socket.socket, bool]:
        c = self.config
        sock = socket.create_connection(
            (c.host, self.event_port),
            timeout=c.connect_timeout_s,
            source_address=c.source_address(),
        )
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(f"PERSEUS1 {rank_id} {token}\n".encode())
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    raise _RefusedError("connection closed during the handshake", forget_rank=True)
                reply += chunk
                if len(reply) > 4096:
                    raise _RefusedError("handshake reply too long")
            line, _, rest = reply.partition(b"\n")
            text = line.decode("utf-8", "replace")
            if text in ("OK 0", "OK 1"):
                self.inbox = rest
                sock.settimeout(c.connect_timeout_s)
                return sock, text == "OK 1"
            raise _RefusedError(f"event stream refused: {text[:300]}", forget_rank=True)
        except BaseException:
            sock.close()
            raise

    def _exchange(self) -> None:
        """Send what is pending, then read any schedule notices."""
        sock = self.sock
        assert sock is not None
        while self.pending:
            # Bounded batches keep each stretch holding the GIL short for the training thread.
            batch = [self.pending.popleft() for _ in range(min(len(self.pending), _BATCH))]
            data = "".join(
                f"{k} {m} {t} {c}\n" if c else f"{k} {m} {t}\n" for k, m, t, c in batch
            ).encode()
            try:
                sock.sendall(data)
            except OSError as exc:
                self._drop(len(batch))
                self._fail(f"sending events failed: {exc}")
                return
            self.hooks._account(len(batch), 0)
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                chunk = sock.recv(4096)
                if not chunk:
                    self._fail("the sidecar closed the event stream")
                    return
                self.inbox += chunk
        except OSError as exc:
            self._fail(f"reading from the sidecar failed: {exc}")
            return
        self._handle_lines()

    def _handle_lines(self) -> None:
        while b"\n" in self.inbox:
            line, _, self.inbox = self.inbox.partition(b"\n")
            text = line.decode("utf-8", "replace").strip()
            if text == "S 1":
                self.hooks._set_schedule_active(True)
            elif text == "S 0":
                self.hooks._set_schedule_active(False)
            elif text.startswith("ERR"):
                self.hooks.rank_id = None
                self._fail(f"the sidecar ended the event stream: {text[:300]}")
                return
            else:
                log.debug("perseus hooks: ignoring unknown line %r", text[:100])

    def _disconnect(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
            self.sock = None
            self.inbox = b""
            self.hooks._connected.clear()
            self.hooks._set_schedule_active(False)


# Module-level API over one default rank ----------------------------------------------------

_default = Hooks(None, sync=None)


def default_hooks() -> Hooks:
    """The hooks :func:`register` set up last (a no-op instance before that)."""
    return _default


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


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

    Missing arguments come from the environment (see the module doc); `gpu_uuid` falls back to
    ``PERSEUS_GPU_UUID``. Without a sidecar host or GPU UUID the hooks are a no-op and one
    warning says why. `source_ip` binds the client sockets to that local address (a pod's IP
    when several simulated pods share one host). The last four arguments tune the sender
    (see :class:`HooksConfig`).
    """
    global _default  # noqa: PLW0603 - the module-level API is for one rank per process
    env = os.environ
    host = host or env.get("PERSEUS_SIDECAR_HOST") or None
    gpu_uuid = gpu_uuid or env.get("PERSEUS_GPU_UUID") or None
    config: HooksConfig | None = None
    if host is None or gpu_uuid is None:
        missing = "PERSEUS_SIDECAR_HOST" if host is None else "gpu_uuid (or PERSEUS_GPU_UUID)"
        log.warning("perseus hooks disabled: %s not set; training runs without Perseus", missing)
    else:
        config = HooksConfig(
            host=host,
            port=port if port is not None else _env_int("PERSEUS_SIDECAR_PORT", DEFAULT_PORT),
            namespace=namespace or env.get("PERSEUS_POD_NAMESPACE", "default"),
            pod=pod or env.get("PERSEUS_POD_NAME") or socket.gethostname(),
            rank=rank,
            pipeline_rank=pipeline_rank,
            data_rank=data_rank,
            tensor_rank=tensor_rank,
            gpu_uuid=gpu_uuid,
            job_token=job_token,
            job_token_file=job_token_file
            or env.get("PERSEUS_JOB_TOKEN_FILE", DEFAULT_JOB_TOKEN_FILE),
            source_ip=source_ip,
            event_port=event_port
            if event_port is not None
            else (_env_int("PERSEUS_SIDECAR_EVENT_PORT", 0) or None),
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
