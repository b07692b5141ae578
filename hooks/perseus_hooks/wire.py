"""The wire protocol between the training hooks and the node's sidecar, in one place: the hooks
build their messages with it and the sidecar's event transport parses them with it, so the two
ends cannot drift apart.

Registration, over HTTP: ``POST /v1/ranks`` with ``Authorization: Bearer <job token>`` and the
JSON body of :func:`registration_body`; the sidecar answers 201 with
``{"rank_id": ..., "event_port": ..., "schedule_active": ...}`` (:func:`parse_registered`).

The event stream, one TCP connection to the event port, in lines::

    client: PERSEUS1 <rank_id> <job_token>\\n    server: OK <0|1>\\n  or  ERR <message>\\n + close
    client: <FB|FE|BB|BE|IE> <microbatch> <t_ns> [<chunk>]\\n  (one per event)
    server: S 1\\n / S 0\\n when the rank's clock control starts / stops

``OK 1`` and ``S 1`` say the sidecar applies a frequency schedule to the rank now. IE (iteration
end) carries microbatch -1 and chunk 0; a chunk of 0 is not written, so a plain 1F1B event stays
the three-field line an older sidecar reads. Any line that breaks these rules gets ``ERR`` and the
connection closes.

Parsing an event is a byte split and two or three int() calls: it runs once per event on the
sidecar's event loop.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from perseus_hooks.pipeline import MAX_CHUNKS

__all__ = [
    "BACKWARD_BEGIN",
    "BACKWARD_END",
    "BEGIN_CODES",
    "END_CODES",
    "ERROR_PREFIX",
    "EVENT_CODES",
    "EVENT_CODES_BYTES",
    "FORWARD_BEGIN",
    "FORWARD_END",
    "ITERATION_END",
    "ITERATION_END_CODE",
    "MAX_CHUNKS",
    "MAX_LINE_BYTES",
    "MAX_MICROBATCH",
    "MAX_T_NS",
    "REGISTER_PATH",
    "SCHEDULE_OFF",
    "SCHEDULE_ON",
    "Event",
    "WireError",
    "encode_events",
    "error_line",
    "hello",
    "hello_reply",
    "notice",
    "parse_event",
    "parse_hello",
    "parse_hello_reply",
    "parse_registered",
    "registration_body",
]

REGISTER_PATH = "/v1/ranks"
HELLO = b"PERSEUS1"
"""The first word of the stream's first line; a new protocol version gets a new word."""

FORWARD_BEGIN, FORWARD_END, BACKWARD_BEGIN, BACKWARD_END, ITERATION_END = range(5)
EVENT_CODES = {
    "FB": FORWARD_BEGIN,
    "FE": FORWARD_END,
    "BB": BACKWARD_BEGIN,
    "BE": BACKWARD_END,
    "IE": ITERATION_END,
}
"""An event line's first field -> the event's number (what the sidecar's rank works with)."""
EVENT_CODES_BYTES = {k.encode(): v for k, v in EVENT_CODES.items()}
BEGIN_CODES = {"forward": "FB", "backward": "BB"}
END_CODES = {"forward": "FE", "backward": "BE"}
ITERATION_END_CODE = "IE"

MAX_MICROBATCH = 1_000_000
MAX_T_NS = 2**63 - 1
MAX_LINE_BYTES = 512
"""Longer lines close the connection (a handshake line with a long token is well under it)."""

SCHEDULE_ON = "S 1"
SCHEDULE_OFF = "S 0"
ERROR_PREFIX = "ERR"

Event = tuple[str, int, int, int]
"""(code, microbatch, t_ns, chunk) as the hooks queue it: code is FB, FE, BB, BE or IE."""


class WireError(ValueError):
    """A message that breaks the protocol; the text says which rule (the sidecar sends it back
    after ``ERR``)."""


# ---- registration (HTTP) ---------------------------------------------------------------------


def registration_body(
    *,
    namespace: str,
    pod: str,
    rank: int,
    pipeline_rank: int,
    data_rank: int,
    tensor_rank: int,
    gpu_uuid: str,
) -> bytes:
    """The JSON body of ``POST /v1/ranks`` (the sidecar validates it as `RankRegistration`)."""
    return json.dumps(
        {
            "namespace": namespace,
            "pod": pod,
            "rank": rank,
            "pipeline_rank": pipeline_rank,
            "data_rank": data_rank,
            "tensor_rank": tensor_rank,
            "gpu_uuid": gpu_uuid,
        }
    ).encode()


def parse_registered(payload: bytes) -> tuple[str, int, bool]:
    """(rank_id, event_port, schedule_active) from the sidecar's 201 reply."""
    try:
        data = json.loads(payload)
        rank_id, port, active = data["rank_id"], data["event_port"], data["schedule_active"]
    except (ValueError, TypeError, KeyError) as exc:
        raise WireError(f"registration reply is not the expected JSON: {exc}") from None
    if not isinstance(rank_id, str) or not rank_id or any(c.isspace() for c in rank_id):
        raise WireError(f"registration reply has a bad rank_id {rank_id!r}")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port < 65536:
        raise WireError(f"registration reply has a bad event_port {port!r}")
    if not isinstance(active, bool):
        raise WireError(f"registration reply has a bad schedule_active {active!r}")
    return rank_id, port, active


# ---- the event stream (TCP) ------------------------------------------------------------------


def hello(rank_id: str, token: str) -> bytes:
    """The stream's first line, from the hooks."""
    return b"%s %s %s\n" % (HELLO, rank_id.encode(), token.encode())


def parse_hello(line: bytes) -> tuple[str, str]:
    """(rank_id, job token) from the stream's first line (without its newline)."""
    parts = line.split()
    if len(parts) != 3 or parts[0] != HELLO:
        raise WireError("expected 'PERSEUS1 <rank_id> <job_token>'")
    try:
        return parts[1].decode("ascii"), parts[2].decode("utf-8")
    except UnicodeDecodeError:
        raise WireError("rank_id and token must be text") from None


def hello_reply(schedule_active: bool) -> bytes:
    """The sidecar's answer to an accepted handshake."""
    return b"OK 1\n" if schedule_active else b"OK 0\n"


def parse_hello_reply(line: str) -> bool:
    """Whether a schedule is active, from the handshake's answer; WireError when refused."""
    if line in ("OK 0", "OK 1"):
        return line == "OK 1"
    raise WireError(f"event stream refused: {line[:300]}")


def notice(schedule_active: bool) -> bytes:
    """The sidecar's line when the rank's clock control starts or stops."""
    return f"{SCHEDULE_ON if schedule_active else SCHEDULE_OFF}\n".encode()


def error_line(reason: str) -> bytes:
    """The sidecar's last line before it closes a stream."""
    return b"ERR " + reason.replace("\n", " ").encode("utf-8", "replace") + b"\n"


def encode_events(events: Iterable[Event]) -> bytes:
    """Event lines, one per event, for one write to the stream."""
    return "".join(
        f"{k} {m} {t} {c}\n" if c else f"{k} {m} {t}\n" for k, m, t, c in events
    ).encode()


def parse_event(line: bytes) -> tuple[int, int, int, int]:
    """(event number, microbatch, t_ns, chunk) from one event line (without its newline)."""
    parts = line.split()
    code = EVENT_CODES_BYTES.get(parts[0]) if 3 <= len(parts) <= 4 else None
    if code is None:
        raise WireError("expected '<FB|FE|BB|BE|IE> <microbatch> <t_ns> [<chunk>]'")
    try:
        microbatch = int(parts[1])
        t_ns = int(parts[2])
        chunk = int(parts[3]) if len(parts) == 4 else 0
    except ValueError:
        raise WireError("microbatch, t_ns and chunk must be integers") from None
    if not (0 <= t_ns <= MAX_T_NS) or microbatch > MAX_MICROBATCH:
        raise WireError("t_ns or microbatch out of range")
    if (code == ITERATION_END) != (microbatch == -1) or microbatch < -1:
        raise WireError("microbatch must be -1 exactly for IE and >= 0 otherwise")
    if not 0 <= chunk < MAX_CHUNKS or (chunk and code == ITERATION_END):
        raise WireError(f"chunk must be 0-{MAX_CHUNKS - 1}, and 0 for IE")
    return code, microbatch, t_ns, chunk
