"""The training hooks against a small in-test sidecar: registration, event stream, schedule
notices and sync, and training going on when the sidecar is down, slow or refusing."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import perseus_hooks as hooks
from tests.sidecar.fake_sidecar import FakeSidecar, wait_until


@pytest.fixture
def sidecar() -> Iterator[FakeSidecar]:
    fake = FakeSidecar().start()
    yield fake
    fake.stop()


def _register(fake: FakeSidecar, **kwargs: object) -> hooks.Hooks:
    args: dict[str, object] = {
        "rank": 3,
        "pipeline_rank": 1,
        "data_rank": 2,
        "tensor_rank": 0,
        "gpu_uuid": "GPU-sim-n-1",
        "host": "127.0.0.1",
        "port": fake.http_port,
        "namespace": "ml",
        "pod": "trainer-0",
        "job_token": fake.token,
        "sync": None,
        "make_default": False,
        "min_backoff_s": 0.02,
        "max_backoff_s": 0.1,
    }
    args.update(kwargs)
    return hooks.register(**args)  # type: ignore[arg-type]


def test_registers_and_streams_events_in_order(sidecar: FakeSidecar) -> None:
    with _register(sidecar) as h:
        assert h.wait_connected(5)
        before = time.time_ns()
        h.instruction_begin("forward", 0)
        h.instruction_end("forward", 0)
        with h.instruction("backward", 0):
            pass
        h.iteration_end()
        assert h.flush(5)
        rank_id = h.rank_id
        assert rank_id == "r3-trainer-0"
        wait_until(lambda: len(sidecar.events_of(rank_id)) == 5)
    reg = sidecar.registrations[0]
    assert reg.body == {
        "namespace": "ml",
        "pod": "trainer-0",
        "rank": 3,
        "pipeline_rank": 1,
        "data_rank": 2,
        "tensor_rank": 0,
        "gpu_uuid": "GPU-sim-n-1",
    }
    assert reg.authorization == "Bearer job-token"
    events = sidecar.events_of(rank_id)
    assert [(k, m) for k, m, _ in events] == [
        ("FB", 0),
        ("FE", 0),
        ("BB", 0),
        ("BE", 0),
        ("IE", -1),
    ]
    stamps = [t for _, _, t in events]
    assert stamps == sorted(stamps)
    assert before <= stamps[0] <= time.time_ns()


def test_settings_come_from_the_environment(
    sidecar: FakeSidecar, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(sidecar.token + "\n")
    monkeypatch.setenv("PERSEUS_SIDECAR_HOST", "127.0.0.1")
    monkeypatch.setenv("PERSEUS_SIDECAR_PORT", str(sidecar.http_port))
    monkeypatch.setenv("PERSEUS_POD_NAMESPACE", "team-a")
    monkeypatch.setenv("PERSEUS_POD_NAME", "pod-7")
    monkeypatch.setenv("PERSEUS_JOB_TOKEN_FILE", str(token_file))
    monkeypatch.setenv("PERSEUS_GPU_UUID", "GPU-abc")
    h = hooks.register(rank=0, pipeline_rank=0, data_rank=0, sync=None)
    try:
        assert hooks.default_hooks() is h
        assert h.wait_connected(5)
        hooks.instruction_begin("forward", 1)
        with hooks.instruction("backward", 1):
            pass
        hooks.instruction_end("forward", 1)
        hooks.iteration_end()
        assert h.flush(5)
        wait_until(lambda: len(sidecar.events_of("r0-pod-7")) == 5)
    finally:
        h.close()
    body = sidecar.registrations[0].body
    assert (body["namespace"], body["pod"], body["gpu_uuid"]) == ("team-a", "pod-7", "GPU-abc")


def test_bad_port_in_environment_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PERSEUS_SIDECAR_HOST", "127.0.0.1")
    monkeypatch.setenv("PERSEUS_SIDECAR_PORT", "http")
    with pytest.raises(ValueError, match="PERSEUS_SIDECAR_PORT must be an integer"):
        hooks.register(rank=0, pipeline_rank=0, data_rank=0, gpu_uuid="GPU-x", make_default=False)


def test_without_a_sidecar_host_the_hooks_are_a_noop(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("PERSEUS_SIDECAR_HOST", raising=False)
    with caplog.at_level(logging.WARNING, logger="perseus.hooks"):
        h = hooks.register(
            rank=0, pipeline_rank=0, data_rank=0, gpu_uuid="GPU-x", make_default=False
        )
    assert not h.enabled
    assert "PERSEUS_SIDECAR_HOST not set" in caplog.text
    h.instruction_begin("forward", 0)
    h.iteration_end()
    assert h.flush(0.1)
    h.close()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": -1}, "rank must be an integer >= 0"),
        ({"pipeline_rank": 1.5}, "pipeline_rank must be an integer"),
        ({"data_rank": True}, "data_rank must be an integer"),
        ({"port": 0}, "port must be 1-65535"),
        ({"buffer_events": 0}, "buffer_events"),
        ({"min_backoff_s": 0.0}, "backoff"),
        ({"sync_policy": "sometimes"}, "sync_policy"),
    ],
)
def test_bad_arguments_are_value_errors(
    sidecar: FakeSidecar, kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        _register(sidecar, **kwargs)


def test_bad_calls_are_value_errors(sidecar: FakeSidecar) -> None:
    with _register(sidecar) as h:
        with pytest.raises(ValueError, match="kind must be 'forward' or 'backward'"):
            h.instruction_begin("fwd", 0)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="kind must be"):
            h.instruction_end("bwd", 0)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="microbatch must be >= 0"):
            h.instruction_begin("forward", -1)
        with pytest.raises(ValueError, match="microbatch must be >= 0"):
            h.instruction_end("forward", -2)
        with pytest.raises(ValueError, match="<= 1000000, got 1000001"):
            h.instruction_begin("forward", 1_000_001)
        h.instruction_end("forward", 1_000_000)  # the largest the wire carries


def test_sync_runs_before_begin_only_while_a_schedule_is_active(sidecar: FakeSidecar) -> None:
    calls: list[int] = []
    with _register(sidecar, sync=lambda: calls.append(len(sidecar.events_of("r3-trainer-0")))) as h:
        assert h.wait_connected(5)
        assert not h.schedule_active
        h.instruction_begin("forward", 0)
        assert calls == []
        sidecar.notify("r3-trainer-0", b"S 1\n")
        wait_until(lambda: h.schedule_active)
        h.instruction_begin("backward", 0)
        h.instruction_end("backward", 0)
        h.iteration_end()
        assert len(calls) == 1
        sidecar.notify("r3-trainer-0", b"S 0\n")
        wait_until(lambda: not h.schedule_active)
        h.instruction_begin("forward", 1)
        assert len(calls) == 1


def test_schedule_active_at_handshake_turns_sync_on(sidecar: FakeSidecar) -> None:
    sidecar.schedule_active = True
    calls: list[str] = []
    with _register(sidecar, sync=lambda: calls.append("sync")) as h:
        assert h.wait_connected(5)
        wait_until(lambda: h.schedule_active)
        h.instruction_begin("forward", 0)
        h.instruction_end("forward", 0)
    assert calls == ["sync"]


@pytest.mark.parametrize(("policy", "expected"), [("always", 2), ("never", 0)])
def test_sync_policy(sidecar: FakeSidecar, policy: str, expected: int) -> None:
    sidecar.schedule_active = True
    calls: list[str] = []
    with _register(sidecar, sync=lambda: calls.append("s"), sync_policy=policy) as h:
        assert h.wait_connected(5)
        wait_until(lambda: h.schedule_active)
        h.instruction_begin("forward", 0)
        h.instruction_begin("backward", 0)
    assert len(calls) == expected


def test_training_goes_on_while_the_sidecar_is_down(caplog: pytest.LogCaptureFixture) -> None:
    """Nothing listens: calls stay fast, one warning, and once the sidecar appears on that port
    the buffered events arrive."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    late = FakeSidecar(http_port=port)
    with caplog.at_level(logging.WARNING, logger="perseus.hooks"):
        h = _register(late, port=port)
        start = time.perf_counter()
        for m in range(500):
            h.instruction_begin("forward", m)
            h.instruction_end("forward", m)
        elapsed_s = time.perf_counter() - start
        wait_until(lambda: "unavailable" in caplog.text)
        time.sleep(0.3)  # several retries happen meanwhile: still a single warning
    assert elapsed_s < 2.0  # about 1 ms unloaded; generous: a loaded CI machine preempts
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "training continues" in warnings[0].getMessage()
    late.start()
    try:
        assert h.wait_connected(5)
        assert h.flush(5)
        wait_until(lambda: len(late.events_of("r3-trainer-0")) == 1000)
        assert h.dropped_events == 0
    finally:
        h.close()
        late.stop()


def test_registration_refused_then_accepted(sidecar: FakeSidecar) -> None:
    sidecar.refuse_registrations = 2
    with _register(sidecar) as h:
        assert h.wait_connected(5)
    assert len(sidecar.registrations) == 3


def test_token_file_appearing_later_is_picked_up(sidecar: FakeSidecar, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    with _register(sidecar, job_token=None, job_token_file=str(token_file)) as h:
        assert not h.wait_connected(0.2)
        token_file.write_text(sidecar.token)
        assert h.wait_connected(5)


def test_wrong_token_is_retried_not_raised(sidecar: FakeSidecar) -> None:
    with _register(sidecar, job_token="wrong") as h:
        h.instruction_begin("forward", 0)
        assert not h.wait_connected(0.3)
    assert all(r.authorization == "Bearer wrong" for r in sidecar.registrations)
    assert len(sidecar.registrations) >= 2


def test_reconnects_after_the_stream_drops(sidecar: FakeSidecar) -> None:
    with _register(sidecar) as h:
        assert h.wait_connected(5)
        h.instruction_begin("forward", 0)
        assert h.flush(5)
        wait_until(lambda: len(sidecar.events_of("r3-trainer-0")) == 1)
        sidecar.drop_connection("r3-trainer-0")
        wait_until(lambda: not h.wait_connected(0))
        for m in range(1, 4):
            h.instruction_begin("forward", m)
        assert h.wait_connected(5)
        assert h.flush(5)
        wait_until(lambda: len(sidecar.events_of("r3-trainer-0")) >= 3)
    # The same rank id was kept: one registration.
    assert len(sidecar.registrations) == 1


def test_err_from_the_sidecar_makes_the_rank_register_again(sidecar: FakeSidecar) -> None:
    with _register(sidecar) as h:
        assert h.wait_connected(5)
        sidecar.known_ranks.clear()  # the sidecar "restarted" and forgot the rank
        sidecar.notify("r3-trainer-0", b"ERR unknown rank\n")
        wait_until(lambda: len(sidecar.registrations) == 2)
        assert h.wait_connected(5)


def test_slow_sidecar_never_blocks_training(sidecar: FakeSidecar) -> None:
    """The sidecar stops reading: socket buffers fill, the sender blocks, training does not,
    and the bounded buffer drops the oldest events. A call that waited for the sender would
    never return while the sidecar is not reading, so the loop finishing is the check (a
    wall-clock bound on each call failed under load; bench/hooks.py measures the call's time)."""
    sidecar.read_events = False
    with _register(sidecar, buffer_events=1000) as h:
        assert h.wait_connected(5)
        for m in range(200_000):
            h.instruction_begin("forward", m)
        assert not sidecar.read_events
        assert h.dropped_events > 0 or not h.flush(0.5)
        sidecar.read_events = True


def test_source_ip_binding(sidecar: FakeSidecar) -> None:
    with _register(sidecar, source_ip="127.0.0.7") as h:
        assert h.wait_connected(5)
    assert sidecar.registrations[0].client_ip == "127.0.0.7"
    assert sidecar.event_clients["r3-trainer-0"] == "127.0.0.7"


def test_importing_the_hooks_loads_only_the_standard_library() -> None:
    """Every module the hooks' package loads is the standard library's or its own (the
    distribution declares no dependency; scripts/hooks-wheel-check.sh installs it alone)."""
    code = (
        "import sys; before = set(sys.modules);"
        "import perseus_hooks, perseus_hooks.wire, perseus_hooks.sender, perseus_hooks.config;"
        "tops = {m.split('.')[0] for m in set(sys.modules) - before};"
        "print(sorted(t for t in tops if t not in sys.stdlib_module_names))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['perseus_hooks']"


def test_chunks_travel_with_events_and_plain_lines_stay_three_fields(
    sidecar: FakeSidecar,
) -> None:
    """An interleaved pipeline names each instruction's model chunk; chunk 0 (every plain 1F1B
    event) keeps the three-field line an older sidecar reads."""
    with _register(sidecar) as h:
        assert h.wait_connected(5)
        h.instruction_begin("forward", 4, chunk=1)
        h.instruction_end("forward", 4, chunk=1)
        with h.instruction("backward", 4, chunk=3):
            pass
        with h.instruction("forward", 5):
            pass
        h.iteration_end()
        assert h.flush(5)
        rank_id = h.rank_id
        assert rank_id is not None
        wait_until(lambda: len(sidecar.events_of(rank_id)) == 7)
        with pytest.raises(ValueError, match="chunk must be 0-63"):
            h.instruction_begin("forward", 0, chunk=64)
        with pytest.raises(ValueError, match="chunk must be 0-63"):
            h.instruction_end("forward", 0, chunk=-1)
    assert [k for k, _, _ in sidecar.events_of(rank_id)] == [
        "FB",
        "FE",
        "BB",
        "BE",
        "FB",
        "FE",
        "IE",
    ]
    assert sidecar.chunks[rank_id] == [1, 1, 3, 3, 0, 0, 0]
