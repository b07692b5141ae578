"""The sidecar's HTTP models agree with the hooks' wire protocol (`perseus_hooks.wire`, which the
TCP transport parses with): the same event kinds, chunk and range limits, and a registration body
the sidecar accepts."""

from __future__ import annotations

from typing import get_args

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from perseus_hooks import wire
from perseus_hooks.pipeline import MAX_CHUNKS
from perseus_sidecar.api import EventIn, EventKind, RankRegistration


def test_event_kinds_and_chunks_are_the_wire_ones() -> None:
    assert set(get_args(EventKind)) == set(wire.EVENT_CODES)
    assert MAX_CHUNKS == wire.MAX_CHUNKS


@given(
    st.sampled_from(sorted(wire.EVENT_CODES)),
    st.integers(-3, wire.MAX_MICROBATCH + 2),
    st.sampled_from([-1, 0, 1, wire.MAX_T_NS, wire.MAX_T_NS + 1]),
    st.integers(-1, wire.MAX_CHUNKS + 1),
)
def test_http_and_tcp_accept_the_same_events(
    kind: str, microbatch: int, t_ns: int, chunk: int
) -> None:
    """An event is valid over HTTP (pydantic) exactly when it is valid as a TCP line."""
    try:
        EventIn.model_validate(
            {"kind": kind, "microbatch": microbatch, "t_ns": t_ns, "chunk": chunk}
        )
        http_ok = True
    except ValidationError:
        http_ok = False
    try:
        wire.parse_event(f"{kind} {microbatch} {t_ns} {chunk}".encode())
        tcp_ok = True
    except wire.WireError:
        tcp_ok = False
    assert http_ok == tcp_ok


def test_the_hooks_registration_body_is_a_valid_registration() -> None:
    body = wire.registration_body(
        namespace="train",
        pod="trainer-0",
        rank=3,
        pipeline_rank=1,
        data_rank=0,
        tensor_rank=0,
        gpu_uuid="GPU-sim-n0-0",
    )
    registration = RankRegistration.model_validate_json(body)
    assert registration.pod == "trainer-0" and registration.rank == 3
    with pytest.raises(ValidationError):
        RankRegistration.model_validate_json(body.replace(b'"rank": 3', b'"rank": -1'))
