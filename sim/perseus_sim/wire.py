"""The messages of the multi-process simulated trainer: one JSON object per line, at most
`MAX_LINE` bytes, each type with a fixed set of typed, bounded fields. Every message received is
checked against its type's fields before anything reads it, so a malformed or hostile peer gets
a `WireError` (one line) rather than a crash.

Rank -> coordinator: hello, ready, reading, arrive, ping. Coordinator -> rank: welcome, reject,
setup, start, finish, abort, fail, ping. Rank -> rank (on the link from stage s to s+1; the
connecting side speaks first): peer, then act (downstream) and grad (upstream).
"""

from __future__ import annotations

import ipaddress
import json
import math
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["MAX_LINE", "LineReader", "Message", "WireError", "decode", "encode", "send"]

MAX_LINE = 16384
"""Longest message line accepted (bytes, newline included)."""
MAX_RANKS = 65536


class WireError(ValueError):
    """A message that is not what the protocol allows; one readable line."""


@dataclass(frozen=True)
class _Int:
    lo: int
    hi: int
    nullable: bool = False


@dataclass(frozen=True)
class _Num:
    lo: float
    hi: float = math.inf
    nullable: bool = False


@dataclass(frozen=True)
class _Text:
    max_len: int
    nullable: bool = False


@dataclass(frozen=True)
class _Ip:
    nullable: bool = False


@dataclass(frozen=True)
class _Nums:
    count: int
    lo: float


_Field = _Int | _Num | _Text | _Ip | _Nums
_GEN = _Int(0, 2**62)
_ITER = _Int(0, 10**9)
_RANK = _Int(0, MAX_RANKS - 1)
_TIME = _Num(-1e15, 1e15)

SPECS: dict[str, dict[str, _Field]] = {
    # rank -> coordinator
    "hello": {
        "rank": _RANK,
        "stages": _Int(1, 4096),
        "time_scale": _Num(1e-9, 1e9),
        "gpu_uuid": _Text(128),
        "pod": _Text(253),
        "ip": _Ip(nullable=True),
        "port": _Int(1, 65535),
        "max_clock_s": _Nums(2, 0.0),
    },
    "ready": {"generation": _GEN},
    "reading": {"iteration": _ITER, "energy_j": _Num(0.0, 1e18)},
    "arrive": {
        "generation": _GEN,
        "iteration": _ITER,
        "end_s": _TIME,
        "late": _Int(0, 10**9),
    },
    "ping": {},
    # coordinator -> rank
    "welcome": {
        "stages": _Int(1, 4096),
        "pipelines": _Int(1, MAX_RANKS),
        "microbatches": _Int(1, 10**6),
        "iterations": _Int(1, 10**9),
    },
    "reject": {"reason": _Text(1000)},
    "setup": {
        "generation": _GEN,
        "next_ip": _Ip(nullable=True),
        "next_port": _Int(1, 65535, nullable=True),
        "next_rank": _Int(0, MAX_RANKS - 1, nullable=True),
        "prev_rank": _Int(0, MAX_RANKS - 1, nullable=True),
    },
    "start": {
        "generation": _GEN,
        "iteration": _ITER,
        "start_s": _TIME,
        "epoch_ns": _Int(0, 2**63 - 1),
        "factor": _Num(1e-6, 1e6),
        "read_at_s": _TIME,
    },
    "finish": {
        "generation": _GEN,
        "iteration": _ITER,
        "epoch_ns": _Int(0, 2**63 - 1),
        "read_at_s": _TIME,
    },
    "abort": {"generation": _GEN, "reason": _Text(1000)},
    "fail": {"reason": _Text(1000)},
    # rank -> rank
    "peer": {"generation": _GEN, "rank": _RANK},
    "act": {"microbatch": _Int(0, 10**6), "end_s": _TIME},
    "grad": {"microbatch": _Int(0, 10**6), "end_s": _TIME},
}


class Message:
    """A validated message: its type and fields, read through typed accessors."""

    def __init__(self, kind: str, fields: Mapping[str, object]) -> None:
        self.kind = kind
        self._fields = fields

    def get_int(self, name: str) -> int:
        value = self._fields[name]
        assert isinstance(value, int)
        return value

    def opt_int(self, name: str) -> int | None:
        value = self._fields[name]
        return None if value is None else self.get_int(name)

    def get_float(self, name: str) -> float:
        value = self._fields[name]
        assert isinstance(value, int | float)
        return float(value)

    def get_str(self, name: str) -> str:
        value = self._fields[name]
        assert isinstance(value, str)
        return value

    def opt_str(self, name: str) -> str | None:
        value = self._fields[name]
        return None if value is None else self.get_str(name)

    def get_floats(self, name: str) -> list[float]:
        value = self._fields[name]
        assert isinstance(value, list)
        return [float(v) for v in value]


def encode(kind: str, **fields: object) -> bytes:
    """One message line; checked like a received one, so a bug cannot put garbage on the wire."""
    if kind not in SPECS:
        raise WireError(f"unknown message type {kind!r}")
    data = (json.dumps({"type": kind, **fields}, allow_nan=False) + "\n").encode()
    decode(data, (kind,))
    return data


def _reject_constant(name: str) -> object:
    raise WireError(f"{name} is not a number this protocol accepts")


def _check(kind: str, name: str, spec: _Field, value: object) -> None:
    where = f"{kind}.{name}"
    if value is None:
        if isinstance(spec, _Int | _Num | _Text | _Ip) and spec.nullable:
            return
        raise WireError(f"{where} is missing")
    if isinstance(spec, _Int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise WireError(f"{where} must be an integer")
        if not spec.lo <= value <= spec.hi:
            raise WireError(f"{where} must be within {spec.lo}..{spec.hi}, got {value}")
    elif isinstance(spec, _Num):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise WireError(f"{where} must be a number")
        if not (math.isfinite(value) and spec.lo <= value <= spec.hi):
            raise WireError(f"{where} must be a finite number within {spec.lo}..{spec.hi}")
    elif isinstance(spec, _Text):
        if not isinstance(value, str) or len(value) > spec.max_len:
            raise WireError(f"{where} must be a string of at most {spec.max_len} characters")
    elif isinstance(spec, _Ip):
        try:
            ipaddress.ip_address(value if isinstance(value, str) else "")
        except ValueError:
            raise WireError(f"{where} must be an IP address") from None
    else:
        if not isinstance(value, list) or len(value) != spec.count:
            raise WireError(f"{where} must be a list of {spec.count} numbers")
        for item in value:
            _check(kind, name + "[]", _Num(spec.lo), item)


def decode(line: bytes, allowed: tuple[str, ...]) -> Message:
    """Parse and validate one message line whose type must be one of `allowed`."""
    if len(line) > MAX_LINE:
        raise WireError(f"message longer than {MAX_LINE} bytes")
    try:
        raw = json.loads(line.decode("utf-8"), parse_constant=_reject_constant)
    except WireError:
        raise
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise WireError("message is not a JSON object") from None
    if not isinstance(raw, dict):
        raise WireError("message is not a JSON object")
    kind = raw.pop("type", None)
    if not isinstance(kind, str) or kind not in allowed:
        shown = kind[:40] if isinstance(kind, str) else kind
        raise WireError(f"unexpected message type {shown!r} (expected {', '.join(allowed)})")
    spec = SPECS[kind]
    extra = set(raw) - set(spec)
    if extra:
        raise WireError(f"{kind} has unknown fields: {', '.join(sorted(extra)[:5])[:200]}")
    for name, field_spec in spec.items():
        _check(kind, name, field_spec, raw.get(name))
    return Message(kind, raw)


def send(sock: socket.socket, lock: threading.Lock, data: bytes) -> None:
    """Write one message line; `lock` keeps lines of different threads whole."""
    with lock:
        sock.sendall(data)


class LineReader:
    """Message lines from a blocking socket, each bounded by `MAX_LINE`."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = bytearray()

    def line(self) -> bytes | None:
        """The next line (with its newline), or None at the end of the stream. Socket
        timeouts propagate (the caller's liveness bound)."""
        while True:
            cut = self._buffer.find(b"\n")
            if cut >= 0:
                line = bytes(self._buffer[: cut + 1])
                del self._buffer[: cut + 1]
                return line
            if len(self._buffer) >= MAX_LINE:
                raise WireError(f"message longer than {MAX_LINE} bytes")
            chunk = self._sock.recv(65536)
            if not chunk:
                return None
            self._buffer += chunk
