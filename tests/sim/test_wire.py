"""The multi-process trainer's messages: every field typed and bounded, anything else refused
with one line."""

from __future__ import annotations

import socket

import pytest

from perseus_sim import wire

HELLO = (
    b'{"type": "hello", "rank": 3, "stages": 4, "time_scale": 0.1, "gpu_uuid": "GPU-1", '
    b'"pod": "job-3", "ip": "10.0.0.7", "port": 29401, "max_clock_s": [0.05, 0.1]}\n'
)


def test_a_valid_message_reads_back_typed() -> None:
    message = wire.decode(HELLO, ("hello",))
    assert message.kind == "hello"
    assert message.get_int("rank") == 3
    assert message.get_float("time_scale") == 0.1
    assert message.opt_str("ip") == "10.0.0.7"
    assert message.get_floats("max_clock_s") == [0.05, 0.1]
    line = wire.encode("act", microbatch=2, end_s=1.5)
    assert wire.decode(line, ("act",)).get_float("end_s") == 1.5


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b"not json\n", "not a JSON object"),
        (b"\xff\xfe\n", "not a JSON object"),
        (b"[1]\n", "not a JSON object"),
        (b'{"type": "arrive"}\n', "unexpected message type 'arrive' (expected hello)"),
        (b'{"rank": 1}\n', "unexpected message type None"),
        (HELLO.replace(b'"rank": 3', b'"rank": true'), "hello.rank must be an integer"),
        (HELLO.replace(b'"rank": 3', b'"rank": 70000'), "hello.rank must be within 0..65535"),
        (HELLO.replace(b'"time_scale": 0.1', b'"time_scale": NaN'), "not a number this"),
        (HELLO.replace(b'"time_scale": 0.1', b'"time_scale": 1e400'), "finite number"),
        (HELLO.replace(b'"ip": "10.0.0.7"', b'"ip": "ten"'), "hello.ip must be an IP address"),
        (HELLO.replace(b'"ip": "10.0.0.7"', b'"ip": null'), None),
        (HELLO.replace(b'"port": 29401', b'"port": null'), "hello.port is missing"),
        (HELLO.replace(b"[0.05, 0.1]", b"[0.05]"), "must be a list of 2 numbers"),
        (HELLO.replace(b"[0.05, 0.1]", b'[0.05, "x"]'), "max_clock_s[] must be a number"),
        (HELLO.replace(b'"pod": "job-3"', b'"pod": "' + b"p" * 300 + b'"'), "at most 253"),
        (HELLO.replace(b"}\n", b', "extra": 1}\n'), "hello has unknown fields: extra"),
        (b"[" * 100000 + b"\n", "longer than"),
        (b"[" * 5000 + b"]" * 5000 + b"\n", "not a JSON object"),
    ],
)
def test_malformed_messages_are_refused(line: bytes, message: str | None) -> None:
    if message is None:
        assert wire.decode(line, ("hello",)).opt_str("ip") is None
        return
    with pytest.raises(wire.WireError) as caught:
        wire.decode(line, ("hello",))
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_encode_refuses_what_decode_would() -> None:
    with pytest.raises(wire.WireError, match=r"act\.microbatch must be within"):
        wire.encode("act", microbatch=-1, end_s=0.0)
    with pytest.raises(wire.WireError, match="unknown message type"):
        wire.encode("nonsense")
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        wire.encode("act", microbatch=1, end_s=float("nan"))


def test_line_reader_bounds_lines_and_keeps_what_follows() -> None:
    left, right = socket.socketpair()
    with left, right:
        left.sendall(b'{"type": "ping"}\n{"type": "pi')
        left.sendall(b'ng"}\n')
        reader = wire.LineReader(right)
        assert wire.decode(reader.line() or b"", ("ping",)).kind == "ping"
        assert wire.decode(reader.line() or b"", ("ping",)).kind == "ping"
        left.sendall(b"x" * (wire.MAX_LINE + 1))
        with pytest.raises(wire.WireError, match="longer than"):
            reader.line()
    a, b = socket.socketpair()
    with a, b:
        a.close()
        assert wire.LineReader(b).line() is None
