"""The protobuf wire format, as far as the kubelet's gRPC APIs need it: the sidecar reads the
pod-resources reply with it and the simulated device plugin (scripts/node) both reads and writes
its messages, neither with generated code."""

from __future__ import annotations

from collections.abc import Iterator

__all__ = ["ProtoError", "bytes_field", "fields", "int_field", "str_field", "varint"]


class ProtoError(ValueError):
    """Bytes that are not the expected protobuf message."""


def varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64  # int32/int64 negatives are ten-byte two's complement
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def bytes_field(number: int, value: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(value)) + value


def str_field(number: int, value: str) -> bytes:
    """proto3: an empty string is not sent."""
    return bytes_field(number, value.encode()) if value else b""


def int_field(number: int, value: int) -> bytes:
    """proto3: a zero is not sent."""
    return varint(number << 3) + varint(value) if value else b""


def fields(data: bytes) -> Iterator[tuple[int, bytes | int]]:
    """(field number, value) pairs of a message: bytes for length-delimited fields, int for
    varints; fixed-width fields are skipped. Raises ProtoError on malformed input."""
    i, n = 0, len(data)

    def read_varint() -> int:
        nonlocal i
        value = shift = 0
        while True:
            if i >= n or shift > 63:
                raise ProtoError("truncated varint")
            byte = data[i]
            i += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value

    while i < n:
        key = read_varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            yield number, read_varint()
        elif wire == 2:
            size = read_varint()
            if i + size > n:
                raise ProtoError("truncated length-delimited field")
            yield number, data[i : i + size]
            i += size
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4
            if i > n:
                raise ProtoError("truncated fixed-width field")
        else:
            raise ProtoError(f"unsupported wire type {wire}")
