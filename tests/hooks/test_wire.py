"""The hooks' wire protocol on its own: what the hooks write, the sidecar's parser reads back, and
every line that breaks a rule is refused with the rule's words."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from perseus_hooks import wire

CODES = st.sampled_from(sorted(wire.EVENT_CODES))


@st.composite
def events(draw: st.DrawFn) -> wire.Event:
    code = draw(CODES)
    if code == wire.ITERATION_END_CODE:
        return code, -1, draw(st.integers(0, wire.MAX_T_NS)), 0
    microbatch = draw(st.integers(0, wire.MAX_MICROBATCH))
    return code, microbatch, draw(st.integers(0, wire.MAX_T_NS)), draw(st.integers(0, 63))


@given(st.lists(events(), min_size=1, max_size=20))
def test_encoded_events_parse_back_to_the_same_events(batch: list[wire.Event]) -> None:
    data = wire.encode_events(batch)
    lines = data.split(b"\n")
    assert lines.pop() == b""
    assert [wire.parse_event(line) for line in lines] == [
        (wire.EVENT_CODES[k], m, t, c) for k, m, t, c in batch
    ]
    assert all(len(line) < wire.MAX_LINE_BYTES for line in lines)


def test_chunk_zero_keeps_the_three_field_line() -> None:
    assert wire.encode_events([("FB", 3, 10, 0), ("BE", 3, 11, 2)]) == b"FB 3 10\nBE 3 11 2\n"


@pytest.mark.parametrize(
    ("line", "rule"),
    [
        (b"", "expected '<FB|FE|BB|BE|IE>"),
        (b"XX 0 1", "expected '<FB|FE|BB|BE|IE>"),
        (b"FB 0", "expected '<FB|FE|BB|BE|IE>"),
        (b"FB 0 1 2 3", "expected '<FB|FE|BB|BE|IE>"),
        (b"FB zero 1", "must be integers"),
        (b"FB 0 1 c", "must be integers"),
        (b"FB 0 -1", "out of range"),
        (b"FB 1000001 1", "out of range"),
        (b"FB 0 9223372036854775808", "out of range"),
        (b"IE 0 1", "-1 exactly for IE"),
        (b"FB -1 1", "-1 exactly for IE"),
        (b"IE -2 1", "-1 exactly for IE"),
        (b"FB 0 1 64", "chunk must be 0-63"),
        (b"FB 0 1 -1", "chunk must be 0-63"),
        (b"IE -1 1 1", "0 for IE"),
    ],
)
def test_event_lines_that_break_a_rule_are_refused(line: bytes, rule: str) -> None:
    with pytest.raises(wire.WireError, match=rule.replace("|", r"\|")):
        wire.parse_event(line)


def test_handshake_round_trip_and_refusals() -> None:
    line = wire.hello("r3-trainer-0", "tok-en")
    assert line == b"PERSEUS1 r3-trainer-0 tok-en\n"
    assert wire.parse_hello(line.rstrip(b"\n")) == ("r3-trainer-0", "tok-en")
    for bad in (b"HELLO", b"PERSEUS1 r0", b"PERSEUS2 r0 t", b"PERSEUS1 r0 t extra"):
        with pytest.raises(wire.WireError, match="expected 'PERSEUS1"):
            wire.parse_hello(bad)
    with pytest.raises(wire.WireError, match="must be text"):
        wire.parse_hello(b"PERSEUS1 r\xff0 t")
    assert wire.parse_hello_reply(wire.hello_reply(True).decode().strip()) is True
    assert wire.parse_hello_reply(wire.hello_reply(False).decode().strip()) is False
    with pytest.raises(wire.WireError, match="event stream refused: ERR unknown rank"):
        wire.parse_hello_reply("ERR unknown rank")


def test_notices_and_error_lines() -> None:
    assert wire.notice(True).decode().strip() == wire.SCHEDULE_ON
    assert wire.notice(False).decode().strip() == wire.SCHEDULE_OFF
    line = wire.error_line("two\nlines")
    assert line == b"ERR two lines\n" and line.decode().startswith(wire.ERROR_PREFIX)


def test_registration_reply_is_checked() -> None:
    good = {"rank_id": "r0-p", "event_port": 8081, "schedule_active": True}
    assert wire.parse_registered(json.dumps(good).encode()) == ("r0-p", 8081, True)
    for payload, rule in (
        (b"not json", "not the expected JSON"),
        (b"[]", "not the expected JSON"),
        (json.dumps({"rank_id": "r0"}).encode(), "not the expected JSON"),
        (json.dumps({**good, "rank_id": "r 0"}).encode(), "bad rank_id"),
        (json.dumps({**good, "rank_id": ""}).encode(), "bad rank_id"),
        (json.dumps({**good, "event_port": 70000}).encode(), "bad event_port"),
        (json.dumps({**good, "event_port": True}).encode(), "bad event_port"),
        (json.dumps({**good, "schedule_active": 1}).encode(), "bad schedule_active"),
    ):
        with pytest.raises(wire.WireError, match=rule):
            wire.parse_registered(payload)


def test_registration_body_names_every_field() -> None:
    body = wire.registration_body(
        namespace="ns",
        pod="p",
        rank=1,
        pipeline_rank=2,
        data_rank=3,
        tensor_rank=4,
        gpu_uuid="GPU-x",
    )
    assert json.loads(body) == {
        "namespace": "ns",
        "pod": "p",
        "rank": 1,
        "pipeline_rank": 2,
        "data_rank": 3,
        "tensor_rank": 4,
        "gpu_uuid": "GPU-x",
    }
