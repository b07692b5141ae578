"""A device plugin for the simulated GPUs: the kubelet of scripts/node.sh hands them to pods as
`nvidia.com/gpu`, the way the NVIDIA device plugin hands out real ones.

Node infrastructure like the kubelet (run on the host by scripts/node.sh, not shipped in the
image). It speaks the kubelet's device plugin API v1beta1 over gRPC: it serves
`v1beta1.DevicePlugin` on a unix socket in the kubelet's device-plugins directory and registers
that socket with `v1beta1.Registration/Register` on the kubelet's own socket there.

- Devices: `GPU-sim-<node>-<i>` for i < --gpus, the UUIDs of the sidecar's simulated backend,
  all Healthy, forever (nothing here can fail).
- Allocate: per container, `PERSEUS_GPU_UUID` is the allocated device of the lowest index (the
  training hooks read it: one rank, one GPU) and `NVIDIA_VISIBLE_DEVICES` all of them in index
  order, comma-separated, as the NVIDIA plugin sets it. A container given several GPUs gets
  them all; a rank that drives another one than the first passes its UUID to the hooks itself.
- GetPreferredAllocation prefers the lowest indices, so a lone pod gets GPU 0 and allocations
  are reproducible (the kubelet otherwise picks from an unordered set).
- The kubelet forgets its plugins when it restarts (it recreates its socket and empties the
  directory): the plugin then serves again and registers again. SIGTERM/SIGINT: stop serving,
  remove the socket, exit 0.

Messages are encoded by hand in `deviceplugin_messages.py` (next to this script, which is run as
a file: its directory is on the import path) so the node needs grpcio but no generated code."""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TypeVar

import grpc
from deviceplugin_messages import (
    Device,
    DevicePluginOptions,
    PreferenceRequest,
    ProtoError,
    RegisterRequest,
    decode_allocate_request,
    decode_device_ids,
    decode_empty,
    decode_preferred_allocation_request,
    encode_allocate_response,
    encode_empty,
    encode_list_and_watch_response,
    encode_options,
    encode_preferred_allocation_response,
    encode_register_request,
)

from perseus_sidecar.gpu.simnode import simulated_uuid

API_VERSION = "v1beta1"
RESOURCE_NAME = "nvidia.com/gpu"
DEFAULT_PLUGIN_DIR = Path("/var/lib/kubelet/device-plugins")
KUBELET_SOCKET = "kubelet.sock"
DEFAULT_ENDPOINT = "perseus-sim-gpu.sock"
REGISTER_TIMEOUT_S = 5.0
WATCH_INTERVAL_S = 1.0
_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
log = logging.getLogger("sim-device-plugin")


class AllocationError(ValueError):
    """The kubelet asked for devices this plugin does not have."""


@dataclass(frozen=True)
class SimulatedGpus:
    node_name: str
    count: int

    def __post_init__(self) -> None:
        if not _NODE_NAME.match(self.node_name):
            raise ValueError(f"--node-name {self.node_name!r} is not a valid node name")
        if not 1 <= self.count <= 1024:
            raise ValueError(f"--gpus must be between 1 and 1024, got {self.count}")

    @property
    def ids(self) -> list[str]:
        return [simulated_uuid(self.node_name, i) for i in range(self.count)]

    def allocate(self, device_ids: list[str]) -> dict[str, str]:
        """The container's environment for `device_ids`, in index order: the kubelet passes
        them in no particular order."""
        if not device_ids:
            raise AllocationError("no device requested")
        order = {uuid: i for i, uuid in enumerate(self.ids)}
        unknown = sorted(set(device_ids) - order.keys())
        if unknown:
            raise AllocationError(f"unknown devices: {', '.join(unknown)}")
        ids = sorted(set(device_ids), key=order.__getitem__)
        return {"PERSEUS_GPU_UUID": ids[0], "NVIDIA_VISIBLE_DEVICES": ",".join(ids)}

    def preferred(self, request: PreferenceRequest) -> list[str]:
        """The devices that must be included, then the lowest-index available ones."""
        order = {uuid: i for i, uuid in enumerate(self.ids)}
        chosen = list(dict.fromkeys(request.must_include))
        rest = sorted(
            (d for d in set(request.available) - set(chosen) if d in order), key=order.__getitem__
        )
        return (chosen + rest)[: max(request.size, len(chosen))]


Request = TypeVar("Request")


class DevicePluginServer:
    """`v1beta1.DevicePlugin` on `<plugin_dir>/<endpoint>`, through grpcio's generic handlers."""

    def __init__(self, gpus: SimulatedGpus, socket_path: Path, stop: threading.Event) -> None:
        self.gpus = gpus
        self.socket_path = socket_path
        self._stop = stop
        self._server: grpc.Server | None = None

    options = DevicePluginOptions(get_preferred_allocation_available=True)

    def _unary(
        self,
        handler: Callable[[Request], bytes],
        decode: Callable[[bytes], Request],
    ) -> grpc.RpcMethodHandler[bytes, bytes]:
        def call(request: bytes, context: grpc.ServicerContext) -> bytes:
            try:
                return handler(decode(request))
            except (ProtoError, AllocationError) as exc:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
                raise  # abort raises; this line only tells the type checker

        return grpc.unary_unary_rpc_method_handler(call)

    def _allocate(self, containers: list[list[str]]) -> bytes:
        envs = [self.gpus.allocate(ids) for ids in containers]
        for env in envs:
            log.info("allocated %s", env["NVIDIA_VISIBLE_DEVICES"])
        return encode_allocate_response(envs)

    def _preferred(self, requests: list[PreferenceRequest]) -> bytes:
        return encode_preferred_allocation_response([self.gpus.preferred(r) for r in requests])

    def _list_and_watch(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        """All devices once; the stream then stays open (their health never changes) until the
        kubelet goes away or the plugin stops."""
        decode_empty(request)
        yield encode_list_and_watch_response([Device(i) for i in self.gpus.ids])
        while context.is_active() and not self._stop.wait(WATCH_INTERVAL_S):
            pass

    def start(self) -> None:
        handler = grpc.method_handlers_generic_handler(
            f"{API_VERSION}.DevicePlugin",
            {
                "GetDevicePluginOptions": self._unary(
                    lambda _: encode_options(self.options), decode_empty
                ),
                "ListAndWatch": grpc.unary_stream_rpc_method_handler(self._list_and_watch),
                "Allocate": self._unary(self._allocate, decode_allocate_request),
                "GetPreferredAllocation": self._unary(
                    self._preferred, decode_preferred_allocation_request
                ),
                "PreStartContainer": self._unary(encode_empty, decode_device_ids),
            },
        )
        self.socket_path.unlink(missing_ok=True)
        # Each ListAndWatch stream holds a worker while it is open: the kubelet keeps one.
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        server.add_generic_rpc_handlers((handler,))
        if not server.add_insecure_port(f"unix:{self.socket_path}"):
            raise OSError(f"cannot listen on {self.socket_path}")
        server.start()
        self._server = server

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=1.0).wait()
            self._server = None
        self.socket_path.unlink(missing_ok=True)


def register(kubelet_socket: Path, endpoint: str, options: DevicePluginOptions) -> None:
    """`v1beta1.Registration/Register` with the kubelet; raises grpc.RpcError when refused."""
    request = RegisterRequest(API_VERSION, endpoint, RESOURCE_NAME, options)
    with grpc.insecure_channel(f"unix://{kubelet_socket}") as channel:
        call = channel.unary_unary(
            f"/{API_VERSION}.Registration/Register",
            request_serializer=encode_register_request,
            response_deserializer=bytes,  # grpcio takes a None result for a failure
        )
        decode_empty(call(request, timeout=REGISTER_TIMEOUT_S, wait_for_ready=True))


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_ctime_ns


def run(gpus: SimulatedGpus, plugin_dir: Path, endpoint: str, stop: threading.Event) -> None:
    """Serve and register until `stop`; serve and register again whenever the kubelet's
    socket is recreated or ours disappears (a kubelet restart)."""
    kubelet_socket = plugin_dir / KUBELET_SOCKET
    server = DevicePluginServer(gpus, plugin_dir / endpoint, stop)
    waiting = False
    while not stop.is_set():
        kubelet = _identity(kubelet_socket)
        if kubelet is None:
            # A kubelet that is starting creates the directory and the socket a moment later.
            if not waiting:
                log.info("waiting for the kubelet's socket %s", kubelet_socket)
            waiting = True
            stop.wait(WATCH_INTERVAL_S)
            continue
        waiting = False
        server.start()
        try:
            register(kubelet_socket, endpoint, server.options)
        except grpc.RpcError as exc:
            log.warning("registration with %s failed: %s; retrying", kubelet_socket, exc.details())
            server.stop()
            stop.wait(WATCH_INTERVAL_S)
            continue
        log.info(
            "registered %s (%d devices %s..%s) as %s with %s",
            RESOURCE_NAME,
            gpus.count,
            gpus.ids[0],
            gpus.ids[-1],
            endpoint,
            kubelet_socket,
        )
        while not stop.wait(WATCH_INTERVAL_S):
            if _identity(kubelet_socket) != kubelet or not server.socket_path.exists():
                log.info("the kubelet restarted: registering again")
                break
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Simulated GPUs as nvidia.com/gpu for the kubelet."
    )
    parser.add_argument("--node-name", required=True, help="the node's name in the UUIDs")
    parser.add_argument("--gpus", type=int, required=True, help="number of simulated GPUs")
    parser.add_argument("--plugin-dir", type=Path, default=DEFAULT_PLUGIN_DIR)
    parser.add_argument("--endpoint", default=DEFAULT_ENDPOINT, help="socket name in plugin-dir")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        gpus = SimulatedGpus(args.node_name, args.gpus)
    except ValueError as exc:
        print(f"sim_device_plugin: {exc}", file=sys.stderr)
        return 2
    if "/" in args.endpoint or args.endpoint in ("", KUBELET_SOCKET):
        print(f"sim_device_plugin: bad --endpoint {args.endpoint!r}", file=sys.stderr)
        return 2
    stop = threading.Event()

    def on_signal(signum: int, _: FrameType | None) -> None:
        log.info("%s: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    run(gpus, args.plugin_dir, args.endpoint, stop)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    sys.exit(main())
