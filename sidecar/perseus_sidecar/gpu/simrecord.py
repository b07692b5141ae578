"""Files that several processes share and that outlive them: a small record mapped into memory
under a sequence lock (`SharedRecord`), an exclusive `flock` on a path, an atomic text replace.
The simulated GPUs keep their "driver" state in them (see `simnode`)."""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

from perseus_sidecar.gpu.base import GpuError

__all__ = ["SharedRecord", "flocked", "write_atomic"]


@contextlib.contextmanager
def flocked(path: Path) -> Iterator[None]:
    """Exclusive access to what `path` guards, across processes."""
    with path.open("a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


class SharedRecord:
    """A small file mapped into memory by every process that uses it, holding one payload under a
    sequence lock: the writer (serialised by `flock`) makes the sequence odd, writes, makes it
    even; readers retry until they read the same even sequence before and after. Updates cost
    microseconds (no file creation or rename per write), and the mapping writes through to the
    file, so the state outlives any process."""

    HEADER = struct.Struct("<4sIQII")  # magic, kind, sequence, payload length, padding
    MAGIC = b"PSIM"

    def __init__(self, path: Path, kind: int, capacity: int) -> None:
        self.path = path
        self.kind = kind
        self.capacity = capacity
        self._size = self.HEADER.size + capacity
        self._map: mmap.mmap | None = None
        self._fd = -1
        self._thread_lock = threading.Lock()

    def _mapped(self) -> mmap.mmap:
        if self._map is not None:
            return self._map
        with self._thread_lock:
            if self._map is None:
                try:
                    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                    fcntl.flock(fd, fcntl.LOCK_EX)
                    try:
                        header = os.pread(fd, self.HEADER.size, 0)
                        if os.fstat(fd).st_size != self._size or header[:4] != self.MAGIC:
                            os.ftruncate(fd, 0)
                            os.ftruncate(fd, self._size)
                            os.pwrite(fd, self.HEADER.pack(self.MAGIC, self.kind, 0, 0, 0), 0)
                    finally:
                        fcntl.flock(fd, fcntl.LOCK_UN)
                    self._map = mmap.mmap(fd, self._size)
                    self._fd = fd
                except OSError as exc:
                    raise GpuError(f"simulated GPU state {self.path} is unusable: {exc}") from None
        return self._map

    def read(self) -> bytes:
        m = self._mapped()
        for _ in range(200):
            seq = struct.unpack_from("<Q", m, 8)[0]
            if seq & 1:
                continue
            length = min(struct.unpack_from("<I", m, 16)[0], self.capacity)
            data = m[self.HEADER.size : self.HEADER.size + length]
            if struct.unpack_from("<Q", m, 8)[0] == seq:
                return data
        # A writer is slow or died mid-write: wait for the writers' locks (the thread lock too,
        # as flock does not exclude threads sharing this descriptor), then take what is there.
        with self.locked():
            length = min(struct.unpack_from("<I", m, 16)[0], self.capacity)
            return m[self.HEADER.size : self.HEADER.size + length]

    def close(self) -> None:
        with self._thread_lock:
            if self._map is not None:
                self._map.close()
                os.close(self._fd)
                self._map, self._fd = None, -1

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive writer access, across threads and processes."""
        self._mapped()
        with self._thread_lock:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def write(self, data: bytes) -> None:
        """Replace the payload; call inside :meth:`locked`."""
        if len(data) > self.capacity:
            raise ValueError(f"{len(data)} bytes exceed the record's {self.capacity}")
        m = self._mapped()
        seq = struct.unpack_from("<Q", m, 8)[0]
        struct.pack_into("<Q", m, 8, seq + 1 if seq % 2 == 0 else seq)
        m[self.HEADER.size : self.HEADER.size + len(data)] = data
        struct.pack_into("<I", m, 16, len(data))
        struct.pack_into("<Q", m, 8, (seq | 1) + 1)
