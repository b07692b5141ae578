"""Which GPUs each pod of this node was given, from the kubelet's pod-resources API (gRPC v1
`PodResourcesLister/List` on a unix socket, normally /var/lib/kubelet/pod-resources/kubelet.sock).

The kubelet is the only party that knows which device the device plugin handed to which
container; a GPU UUID a training process reports could be anyone's. This module speaks just
enough HTTP/2 (one stream, no header decoding, flow control opened wide up front) and protobuf
(the five fields it needs) to make that one call with the standard library: grpcio would add a
30 MB native dependency to the sidecar image for a single unary call made once per rank
registration.

A reply counts only when it is one complete gRPC message on a stream that ended normally;
anything else (refused connection, GOAWAY, RST_STREAM, a trailers-only error, a timeout, a
malformed message) raises :class:`PodResourcesError` with one line."""

from __future__ import annotations

import contextlib
import socket
import struct
from pathlib import Path

from perseus_sidecar.protowire import ProtoError, fields

__all__ = [
    "GPU_RESOURCE_PREFIX",
    "PodResourcesError",
    "list_pod_devices",
    "parse_list_response",
    "request_bytes",
]

GPU_RESOURCE_PREFIX = "nvidia.com/gpu"
"""`nvidia.com/gpu` and the device plugin's renamed shared resources (`nvidia.com/gpu.shared`)."""
MAX_REPLY_BYTES = 16 << 20
_PATH = b"/v1.PodResourcesLister/List"
_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_DATA, _HEADERS, _RST_STREAM, _SETTINGS, _PING, _GOAWAY = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7
_END_STREAM, _ACK, _END_HEADERS, _PADDED = 0x1, 0x1, 0x4, 0x8
_WINDOW = 2**31 - 1


class PodResourcesError(RuntimeError):
    """The kubelet's pod-resources API could not be read; the message is one line."""


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes((kind, flags))
        + struct.pack(">I", stream)
        + payload
    )


def _hpack_literal(index: int, value: bytes) -> bytes:
    """A header field "literal without indexing" whose name is static-table entry `index` (<15)
    and whose value is a plain (non-Huffman) string of under 127 bytes."""
    return bytes((index, len(value))) + value


def request_bytes() -> bytes:
    """Everything the client sends, at once: preface, SETTINGS (wide stream window), a
    connection WINDOW_UPDATE, and the request's HEADERS and DATA on stream 1."""
    settings = struct.pack(">HI", 0x4, _WINDOW) + struct.pack(">HI", 0x2, 0)  # window; no push
    window = struct.pack(">I", _WINDOW - 65_535)
    headers = (
        b"\x83"  # :method POST
        + b"\x86"  # :scheme http
        + _hpack_literal(4, _PATH)  # :path
        + _hpack_literal(1, b"localhost")  # :authority
        + b"\x00"
        + bytes((12,))
        + b"content-type"
        + bytes((16,))
        + b"application/grpc"
        + b"\x00\x02te\x08trailers"
    )
    grpc_message = b"\x00\x00\x00\x00\x00"  # uncompressed, empty ListPodResourcesRequest
    return (
        _PREFACE
        + _frame(_SETTINGS, 0, 0, settings)
        + _frame(0x8, 0, 0, window)
        + _frame(_HEADERS, _END_HEADERS, 1, headers)
        + _frame(_DATA, _END_STREAM, 1, grpc_message)
    )


def _read_exact(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        chunk = sock.recv(min(n, 1 << 16))
        if not chunk:
            raise PodResourcesError("the kubelet closed the connection mid-reply")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _call(path: Path, timeout_s: float) -> bytes:
    """The body of the reply's gRPC message."""
    body = bytearray()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        sock.connect(str(path))
        sock.sendall(request_bytes())
        while True:
            header = _read_exact(sock, 9)
            length = int.from_bytes(header[:3], "big")
            kind, flags = header[3], header[4]
            stream = int.from_bytes(header[5:9], "big") & 0x7FFF_FFFF
            if length > MAX_REPLY_BYTES:
                raise PodResourcesError(f"the kubelet sent a {length}-byte frame")
            payload = _read_exact(sock, length)
            if kind in (_SETTINGS, _PING) and not flags & _ACK:
                # Courtesy acknowledgements: a server that already sent all and left is fine.
                with contextlib.suppress(OSError):
                    sock.sendall(_frame(kind, _ACK, 0, payload if kind == _PING else b""))
            elif kind == _GOAWAY or (kind == _RST_STREAM and stream == 1):
                raise PodResourcesError("the kubelet refused the call (HTTP/2 reset)")
            elif stream == 1 and kind == _DATA:
                if flags & _PADDED:
                    payload = payload[1 : len(payload) - payload[0]]
                body += payload
                if len(body) > MAX_REPLY_BYTES:
                    raise PodResourcesError("the kubelet's reply is too large")
            if stream == 1 and kind in (_DATA, _HEADERS) and flags & _END_STREAM:
                break
    if len(body) < 5:
        raise PodResourcesError("the kubelet answered with an error and no data")
    size = int.from_bytes(body[1:5], "big")
    if body[0] != 0 or size != len(body) - 5:
        raise PodResourcesError("the kubelet's reply is not one uncompressed gRPC message")
    return bytes(body[5:])


def _text(value: bytes | int) -> str:
    if not isinstance(value, bytes):
        raise PodResourcesError("malformed protobuf in the kubelet's reply")
    return value.decode("utf-8", "replace")


def parse_list_response(data: bytes) -> dict[tuple[str, str], frozenset[str]]:
    """ListPodResourcesResponse -> {(namespace, pod): GPU device IDs of all its containers}.

    Fields read: response.pod_resources = 1; PodResources name = 1, namespace = 2,
    containers = 3; ContainerResources devices = 2; ContainerDevices resource_name = 1,
    device_ids = 2. Pods without GPUs are listed with an empty set."""
    try:
        return _parse_list_response(data)
    except ProtoError:
        raise PodResourcesError("malformed protobuf in the kubelet's reply") from None


def _parse_list_response(data: bytes) -> dict[tuple[str, str], frozenset[str]]:
    out: dict[tuple[str, str], frozenset[str]] = {}
    for number, pod in fields(data):
        if number != 1 or not isinstance(pod, bytes):
            continue
        name = namespace = ""
        devices: set[str] = set()
        for field, value in fields(pod):
            if field == 1:
                name = _text(value)
            elif field == 2:
                namespace = _text(value)
            elif field == 3 and isinstance(value, bytes):
                for cfield, cvalue in fields(value):
                    if cfield != 2 or not isinstance(cvalue, bytes):
                        continue
                    resource, ids = "", []
                    for dfield, dvalue in fields(cvalue):
                        if dfield == 1:
                            resource = _text(dvalue)
                        elif dfield == 2:
                            ids.append(_text(dvalue))
                    if resource == GPU_RESOURCE_PREFIX or resource.startswith(
                        GPU_RESOURCE_PREFIX + "."
                    ):
                        devices.update(ids)
        key = (namespace, name)
        out[key] = out.get(key, frozenset()) | devices
    return out


def list_pod_devices(path: Path, timeout_s: float = 2.0) -> dict[tuple[str, str], frozenset[str]]:
    """Ask the kubelet at `path` which GPU device IDs each pod of the node holds (blocking: call
    it from a worker thread)."""
    try:
        return parse_list_response(_call(path, timeout_s))
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise PodResourcesError(
            f"cannot read the kubelet's pod resources at {path}: {reason}"
        ) from None
