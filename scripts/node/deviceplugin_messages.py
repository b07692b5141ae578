"""The messages of the kubelet's device plugin API v1beta1 that `sim_device_plugin.py` sends and
receives, encoded by hand (a few fields each, as `encode_*`/`decode_*` pairs; proto3, so default
values are not sent) so the node needs grpcio but no generated code. Unknown fields are ignored,
malformed bytes raise `ProtoError`."""

from __future__ import annotations

from dataclasses import dataclass, field

from perseus_sidecar.protowire import ProtoError, fields
from perseus_sidecar.protowire import bytes_field as _bytes_field
from perseus_sidecar.protowire import int_field as _int_field
from perseus_sidecar.protowire import str_field as _str_field

__all__ = [
    "HEALTHY",
    "Device",
    "DevicePluginOptions",
    "PreferenceRequest",
    "ProtoError",
    "RegisterRequest",
    "decode_allocate_request",
    "decode_allocate_response",
    "decode_device_ids",
    "decode_empty",
    "decode_list_and_watch_response",
    "decode_options",
    "decode_preferred_allocation_request",
    "decode_preferred_allocation_response",
    "decode_register_request",
    "encode_allocate_request",
    "encode_allocate_response",
    "encode_device_ids",
    "encode_empty",
    "encode_list_and_watch_response",
    "encode_options",
    "encode_preferred_allocation_request",
    "encode_preferred_allocation_response",
    "encode_register_request",
]

HEALTHY = "Healthy"
"""A device's health the kubelet schedules on."""


def _as_bytes(value: bytes | int) -> bytes:
    if not isinstance(value, bytes):
        raise ProtoError("a varint where a length-delimited field belongs")
    return value


def _as_str(value: bytes | int) -> str:
    try:
        return _as_bytes(value).decode()
    except UnicodeDecodeError:
        raise ProtoError("a string field is not UTF-8") from None


def _as_int(value: bytes | int) -> int:
    if not isinstance(value, int):
        raise ProtoError("a length-delimited field where a varint belongs")
    return value


def _strings(data: bytes, number: int) -> list[str]:
    """The repeated string field `number` of a message."""
    return [_as_str(v) for f, v in fields(data) if f == number]


def _messages(data: bytes, number: int) -> list[bytes]:
    return [_as_bytes(v) for f, v in fields(data) if f == number]


@dataclass(frozen=True)
class DevicePluginOptions:
    """pre_start_required = 1, get_preferred_allocation_available = 2."""

    pre_start_required: bool = False
    get_preferred_allocation_available: bool = False


def encode_options(options: DevicePluginOptions) -> bytes:
    return _int_field(1, int(options.pre_start_required)) + _int_field(
        2, int(options.get_preferred_allocation_available)
    )


def decode_options(data: bytes) -> DevicePluginOptions:
    values = {f: _as_int(v) for f, v in fields(data) if f in (1, 2)}
    return DevicePluginOptions(bool(values.get(1, 0)), bool(values.get(2, 0)))


@dataclass(frozen=True)
class RegisterRequest:
    """version = 1, endpoint = 2 (a file name in the device-plugins directory),
    resource_name = 3, options = 4."""

    version: str
    endpoint: str
    resource_name: str
    options: DevicePluginOptions = field(default_factory=DevicePluginOptions)


def encode_register_request(request: RegisterRequest) -> bytes:
    return (
        _str_field(1, request.version)
        + _str_field(2, request.endpoint)
        + _str_field(3, request.resource_name)
        + _bytes_field(4, encode_options(request.options))
    )


def decode_register_request(data: bytes) -> RegisterRequest:
    values = {f: v for f, v in fields(data) if f in (1, 2, 3, 4)}
    return RegisterRequest(
        version=_as_str(values.get(1, b"")),
        endpoint=_as_str(values.get(2, b"")),
        resource_name=_as_str(values.get(3, b"")),
        options=decode_options(_as_bytes(values.get(4, b""))),
    )


@dataclass(frozen=True)
class Device:
    """ID = 1, health = 2 (topology = 3 is left out: the simulated GPUs have no NUMA node)."""

    id: str
    health: str = HEALTHY


def encode_list_and_watch_response(devices: list[Device]) -> bytes:
    """ListAndWatchResponse: devices = 1."""
    return b"".join(_bytes_field(1, _str_field(1, d.id) + _str_field(2, d.health)) for d in devices)


def decode_list_and_watch_response(data: bytes) -> list[Device]:
    out = []
    for message in _messages(data, 1):
        values = {f: _as_str(v) for f, v in fields(message) if f in (1, 2)}
        out.append(Device(values.get(1, ""), values.get(2, "")))
    return out


def encode_device_ids(device_ids: list[str]) -> bytes:
    """ContainerAllocateRequest, and PreStartContainerRequest of the same shape: devicesIDs = 1."""
    return b"".join(_str_field(1, i) for i in device_ids)


def decode_device_ids(data: bytes) -> list[str]:
    return _strings(data, 1)


def encode_allocate_request(containers: list[list[str]]) -> bytes:
    """AllocateRequest: container_requests = 1, each a ContainerAllocateRequest."""
    return b"".join(_bytes_field(1, encode_device_ids(ids)) for ids in containers)


def decode_allocate_request(data: bytes) -> list[list[str]]:
    return [decode_device_ids(message) for message in _messages(data, 1)]


def encode_allocate_response(envs_per_container: list[dict[str, str]]) -> bytes:
    """AllocateResponse: container_responses = 1, each ContainerAllocateResponse envs = 1 (a
    map: repeated entries key = 1, value = 2); mounts, devices and annotations are empty."""
    return b"".join(
        _bytes_field(
            1,
            b"".join(_bytes_field(1, _str_field(1, k) + _str_field(2, v)) for k, v in envs.items()),
        )
        for envs in envs_per_container
    )


def decode_allocate_response(data: bytes) -> list[dict[str, str]]:
    out = []
    for container in _messages(data, 1):
        envs = {}
        for entry in _messages(container, 1):
            values = {f: _as_str(v) for f, v in fields(entry) if f in (1, 2)}
            envs[values.get(1, "")] = values.get(2, "")
        out.append(envs)
    return out


@dataclass(frozen=True)
class PreferenceRequest:
    """ContainerPreferredAllocationRequest: available_deviceIDs = 1, must_include_deviceIDs = 2,
    allocation_size = 3."""

    available: list[str]
    must_include: list[str]
    size: int


def encode_preferred_allocation_request(requests: list[PreferenceRequest]) -> bytes:
    """PreferredAllocationRequest: container_requests = 1."""
    return b"".join(
        _bytes_field(
            1,
            b"".join(_str_field(1, i) for i in r.available)
            + b"".join(_str_field(2, i) for i in r.must_include)
            + _int_field(3, r.size),
        )
        for r in requests
    )


def decode_preferred_allocation_request(data: bytes) -> list[PreferenceRequest]:
    out = []
    for message in _messages(data, 1):
        sizes = [_as_int(v) for f, v in fields(message) if f == 3]
        out.append(
            PreferenceRequest(_strings(message, 1), _strings(message, 2), sizes[-1] if sizes else 0)
        )
    return out


def encode_preferred_allocation_response(containers: list[list[str]]) -> bytes:
    """PreferredAllocationResponse: container_responses = 1, each deviceIDs = 1 (the same
    shape as AllocateRequest)."""
    return encode_allocate_request(containers)


decode_preferred_allocation_response = decode_allocate_request


def encode_empty(_: object = None) -> bytes:
    return b""


def decode_empty(data: bytes) -> None:
    for _ in fields(data):  # unknown fields are ignored, malformed bytes are not
        pass
