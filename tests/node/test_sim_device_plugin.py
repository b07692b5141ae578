"""scripts/node/sim_device_plugin.py without a kubelet: the hand-written protobuf against bytes
computed by hand (and bytes the kubelet 1.20 itself wrote), and the plugin served through real
gRPC channels to a fake kubelet's Registration service on a temporary unix socket."""

from __future__ import annotations

import base64
import importlib.util
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import pytest

from perseus_sidecar.protowire import varint

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "node" / "sim_device_plugin.py"


def _load(name: str) -> ModuleType:
    """A module of scripts/node (run as files there, not installed)."""
    spec = importlib.util.spec_from_file_location(name, SCRIPT.with_name(f"{name}.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up; the script imports it
    spec.loader.exec_module(module)
    return module


dpm = _load("deviceplugin_messages")
dp = _load("sim_device_plugin")
UUIDS = [f"GPU-sim-n1-{i}" for i in range(4)]


def _str(number: int, text: str) -> bytes:
    """Key byte and one-byte length: field numbers < 16, strings < 128 bytes."""
    return bytes((number << 3 | 2, len(text))) + text.encode()


# --- protobuf ----------------------------------------------------------------------------------


def test_varints_match_the_protobuf_spec() -> None:
    assert varint(0) == b"\x00"
    assert varint(1) == b"\x01"
    assert varint(300) == b"\xac\x02"  # the spec's own example
    assert varint(-1) == b"\xff" * 9 + b"\x01"


def test_register_request_bytes() -> None:
    request = dpm.RegisterRequest(
        "v1beta1",
        "perseus-sim-gpu.sock",
        "nvidia.com/gpu",
        dpm.DevicePluginOptions(get_preferred_allocation_available=True),
    )
    expected = (
        b"\x0a\x07v1beta1"
        + b"\x12\x14perseus-sim-gpu.sock"
        + b"\x1a\x0envidia.com/gpu"
        + b"\x22\x02\x10\x01"  # options: field 2 (varint) = true; false fields are not sent
    )
    assert dpm.encode_register_request(request) == expected
    assert dpm.decode_register_request(expected) == request
    assert dpm.encode_options(dpm.DevicePluginOptions()) == b""


def test_list_and_watch_response_bytes() -> None:
    devices = [dpm.Device("GPU-sim-n1-0"), dpm.Device("GPU-sim-n1-1", "Unhealthy")]
    first = _str(1, "GPU-sim-n1-0") + _str(2, "Healthy")
    second = _str(1, "GPU-sim-n1-1") + _str(2, "Unhealthy")
    expected = bytes((0x0A, len(first))) + first + bytes((0x0A, len(second))) + second
    assert dpm.encode_list_and_watch_response(devices) == expected
    assert dpm.decode_list_and_watch_response(expected) == devices


def test_allocate_request_bytes() -> None:
    one = _str(1, "GPU-sim-n1-0")
    two = _str(1, "GPU-sim-n1-1") + _str(1, "GPU-sim-n1-2")
    expected = b"\x0a" + bytes((len(one),)) + one + b"\x0a" + bytes((len(two),)) + two
    containers = [["GPU-sim-n1-0"], ["GPU-sim-n1-1", "GPU-sim-n1-2"]]
    assert dpm.encode_allocate_request(containers) == expected
    assert dpm.decode_allocate_request(expected) == containers


def test_allocate_response_matches_the_kubelets_own_encoding() -> None:
    """The kubelet 1.20 keeps each container's response in its checkpoint, marshalled by its
    Go protobuf code (map entries sorted by key): this is the one it wrote for a pod given
    GPU 0 by this plugin on the real node."""
    kubelet = base64.b64decode(
        "CjAKFk5WSURJQV9WSVNJQkxFX0RFVklDRVMSFkdQVS1zaW0tcGVyc2V1cy1ub2RlLTAKKgoQUEVSU0VVU19HUF"
        "VfVVVJRBIWR1BVLXNpbS1wZXJzZXVzLW5vZGUtMA=="
    )
    envs = {
        "NVIDIA_VISIBLE_DEVICES": "GPU-sim-perseus-node-0",
        "PERSEUS_GPU_UUID": "GPU-sim-perseus-node-0",
    }
    response = dpm.encode_allocate_response([envs])
    assert response == b"\x0a" + bytes((len(kubelet),)) + kubelet
    assert dpm.decode_allocate_response(response) == [envs]


def test_preferred_allocation_round_trip() -> None:
    requests = [dpm.PreferenceRequest(["a", "b", "c"], ["c"], 2)]
    data = dpm.encode_preferred_allocation_request(requests)
    assert data == b"\x0a\x0e" + _str(1, "a") + _str(1, "b") + _str(1, "c") + _str(2, "c") + (
        b"\x18\x02"
    )
    assert dpm.decode_preferred_allocation_request(data) == requests
    assert dpm.decode_preferred_allocation_response(
        dpm.encode_preferred_allocation_response([["c", "a"]])
    ) == [["c", "a"]]


@pytest.mark.parametrize(
    "data",
    [b"\x0a\x05abc", b"\x0a", b"\x80", b"\x0b", b"\x08\x01"],
    ids=["short-field", "no-length", "short-varint", "wire-3", "varint-for-message"],
)
def test_malformed_messages_are_refused(data: bytes) -> None:
    with pytest.raises(dpm.ProtoError):
        dpm.decode_allocate_request(data)


def test_unknown_fields_are_skipped() -> None:
    device = _str(1, "GPU-sim-n1-0") + _str(2, "Healthy") + b"\x1a\x02\x0a\x00"  # topology
    data = b"\x0a" + bytes((len(device),)) + device + b"\x10\x07" + b"\x1d\x00\x00\x00\x00"
    assert dpm.decode_list_and_watch_response(data) == [dpm.Device("GPU-sim-n1-0")]


# --- the plugin's choices ----------------------------------------------------------------------


def test_simulated_gpus_use_the_sidecars_uuids() -> None:
    gpus = dp.SimulatedGpus("n1", 4)
    assert gpus.ids == UUIDS
    assert gpus.allocate([UUIDS[2], UUIDS[0]]) == {  # the kubelet's order is a set's
        "PERSEUS_GPU_UUID": UUIDS[0],
        "NVIDIA_VISIBLE_DEVICES": f"{UUIDS[0]},{UUIDS[2]}",
    }
    with pytest.raises(dp.AllocationError, match="unknown devices: GPU-sim-n2-0"):
        gpus.allocate(["GPU-sim-n2-0"])
    with pytest.raises(dp.AllocationError, match="no device"):
        gpus.allocate([])
    for name, count in (("", 1), ("bad/name", 1), ("n1", 0), ("n1", 1025)):
        with pytest.raises(ValueError):
            dp.SimulatedGpus(name, count)


def test_preferred_allocation_takes_required_then_lowest() -> None:
    gpus = dp.SimulatedGpus("n1", 4)
    request = dpm.PreferenceRequest([UUIDS[3], UUIDS[1], UUIDS[2], "GPU-other"], [UUIDS[3]], 2)
    assert gpus.preferred(request) == [UUIDS[3], UUIDS[1]]
    assert gpus.preferred(dpm.PreferenceRequest(UUIDS[::-1], [], 3)) == UUIDS[:3]


# --- through gRPC ------------------------------------------------------------------------------


class FakeKubelet:
    """`v1beta1.Registration` on `<dir>/kubelet.sock`; answers `refuse` registrations with
    INVALID_ARGUMENT first, as the kubelet does for a bad version or resource name."""

    def __init__(self, plugin_dir: Path, refuse: int = 0) -> None:
        self.requests: queue.Queue[Any] = queue.Queue()
        self.refuse = refuse
        self.server = grpc.server(dp.futures.ThreadPoolExecutor(max_workers=2))

        def register(request: bytes, context: grpc.ServicerContext) -> bytes:
            if self.refuse:
                self.refuse -= 1
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "not now")
            self.requests.put(dpm.decode_register_request(request))
            return b""

        self.server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "v1beta1.Registration",
                    {"Register": grpc.unary_unary_rpc_method_handler(register)},
                ),
            )
        )
        self.server.add_insecure_port(f"unix:{plugin_dir / 'kubelet.sock'}")
        self.server.start()

    def close(self) -> None:
        self.server.stop(None).wait()


@pytest.fixture
def plugin_dir(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture
def plugin(plugin_dir: Path) -> Iterator[tuple[FakeKubelet, threading.Event, threading.Thread]]:
    kubelet = FakeKubelet(plugin_dir, refuse=1)
    stop = threading.Event()
    thread = threading.Thread(
        target=dp.run, args=(dp.SimulatedGpus("n1", 4), plugin_dir, "sim.sock", stop)
    )
    thread.start()
    yield kubelet, stop, thread
    stop.set()
    thread.join(timeout=30)
    kubelet.close()


def _call(channel: grpc.Channel, method: str, request: bytes) -> bytes:
    call = channel.unary_unary(
        f"/v1beta1.DevicePlugin/{method}", request_serializer=bytes, response_deserializer=bytes
    )
    return bytes(call(request, timeout=10))


def test_plugin_registers_and_serves_the_kubelets_calls(
    plugin: tuple[FakeKubelet, threading.Event, threading.Thread], plugin_dir: Path
) -> None:
    kubelet, stop, thread = plugin
    registered = kubelet.requests.get(timeout=30)  # after one refused attempt
    assert kubelet.refuse == 0
    assert registered == dpm.RegisterRequest(
        "v1beta1",
        "sim.sock",
        "nvidia.com/gpu",
        dpm.DevicePluginOptions(get_preferred_allocation_available=True),
    )
    with grpc.insecure_channel(f"unix://{plugin_dir / 'sim.sock'}") as channel:
        options = dpm.decode_options(_call(channel, "GetDevicePluginOptions", b""))
        assert options == registered.options
        stream = channel.unary_stream(
            "/v1beta1.DevicePlugin/ListAndWatch",
            request_serializer=bytes,
            response_deserializer=bytes,
        )(b"")
        assert dpm.decode_list_and_watch_response(next(stream)) == [dpm.Device(u) for u in UUIDS]
        allocated = _call(
            channel, "Allocate", dpm.encode_allocate_request([[UUIDS[1]], [UUIDS[3], UUIDS[2]]])
        )
        assert dpm.decode_allocate_response(allocated) == [
            {"PERSEUS_GPU_UUID": UUIDS[1], "NVIDIA_VISIBLE_DEVICES": UUIDS[1]},
            {"PERSEUS_GPU_UUID": UUIDS[2], "NVIDIA_VISIBLE_DEVICES": f"{UUIDS[2]},{UUIDS[3]}"},
        ]
        with pytest.raises(grpc.RpcError) as refused:
            _call(channel, "Allocate", dpm.encode_allocate_request([["GPU-sim-n2-0"]]))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert refused.value.details() == "unknown devices: GPU-sim-n2-0"
        with pytest.raises(grpc.RpcError) as malformed:
            _call(channel, "Allocate", b"\x0a\x05abc")
        assert malformed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        preferred = _call(
            channel,
            "GetPreferredAllocation",
            dpm.encode_preferred_allocation_request([dpm.PreferenceRequest(UUIDS[::-1], [], 2)]),
        )
        assert dpm.decode_preferred_allocation_response(preferred) == [UUIDS[:2]]
        prestart = dpm.encode_device_ids([UUIDS[0], UUIDS[1]])
        assert prestart == _str(1, UUIDS[0]) + _str(1, UUIDS[1])
        assert dpm.decode_device_ids(prestart) == UUIDS[:2]
        assert _call(channel, "PreStartContainer", prestart) == b""

        stop.set()
        thread.join(timeout=30)
        assert not thread.is_alive()
        assert list(stream) == []  # the watch stream ends cleanly with the plugin
    assert not (plugin_dir / "sim.sock").exists()


def test_plugin_registers_again_when_the_kubelet_restarts(
    plugin: tuple[FakeKubelet, threading.Event, threading.Thread], plugin_dir: Path
) -> None:
    kubelet, _, _ = plugin
    first = kubelet.requests.get(timeout=30)
    # A restarting kubelet recreates its socket and removes every other one.
    kubelet.close()
    (plugin_dir / "kubelet.sock").unlink(missing_ok=True)
    (plugin_dir / "sim.sock").unlink()
    restarted = FakeKubelet(plugin_dir)
    try:
        assert restarted.requests.get(timeout=30) == first
        with grpc.insecure_channel(f"unix://{plugin_dir / 'sim.sock'}") as channel:
            allocated = _call(channel, "Allocate", dpm.encode_allocate_request([[UUIDS[0]]]))
        assert dpm.decode_allocate_response(allocated)[0]["PERSEUS_GPU_UUID"] == UUIDS[0]
    finally:
        restarted.close()


def test_plugin_waits_for_a_kubelet_that_starts_after_it(plugin_dir: Path) -> None:
    """scripts/node.sh starts the plugin with the kubelet, before the kubelet's socket exists."""
    stop = threading.Event()
    thread = threading.Thread(
        target=dp.run, args=(dp.SimulatedGpus("n1", 1), plugin_dir / "later", "sim.sock", stop)
    )
    thread.start()
    try:
        (plugin_dir / "later").mkdir()
        kubelet = FakeKubelet(plugin_dir / "later")
        try:
            assert kubelet.requests.get(timeout=30).endpoint == "sim.sock"
        finally:
            kubelet.close()
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not thread.is_alive()


def test_sigterm_stops_the_plugin_cleanly(plugin_dir: Path) -> None:
    kubelet = FakeKubelet(plugin_dir)
    try:
        args = ["--node-name", "n1", "--gpus", "2", "--plugin-dir", str(plugin_dir)]
        proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), *args], stderr=subprocess.PIPE, text=True
        )
        try:
            assert kubelet.requests.get(timeout=60).endpoint == "perseus-sim-gpu.sock"
            assert (plugin_dir / "perseus-sim-gpu.sock").exists()
            proc.send_signal(signal.SIGTERM)
            _, stderr = proc.communicate(timeout=30)
        finally:
            proc.kill()
        assert proc.returncode == 0, stderr
        assert "SIGTERM: stopping" in stderr
        assert not (plugin_dir / "perseus-sim-gpu.sock").exists()
    finally:
        kubelet.close()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gpus", "0"], "--gpus must be between 1 and 1024, got 0"),
        (["--gpus", "2", "--node-name", "a/b"], "--node-name 'a/b' is not a valid node name"),
        (["--gpus", "2", "--endpoint", "kubelet.sock"], "bad --endpoint 'kubelet.sock'"),
    ],
)
def test_bad_flags_exit_2_with_one_line(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    argv = ["--node-name", "n1", "--plugin-dir", str(tmp_path), *args]
    assert dp.main(argv) == 2
    assert capsys.readouterr().err == f"sim_device_plugin: {message}\n"
