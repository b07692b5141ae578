"""A TCP tap between the hooks and the sidecar's event port: forwards every byte both ways and
records what each client sent, so a test sees exactly the lines the sidecar received."""

from __future__ import annotations

import contextlib
import socket
import threading
from types import TracebackType


class EventTap:
    def __init__(self, upstream_port: int, host: str = "127.0.0.1") -> None:
        self.upstream = (host, upstream_port)
        self.server = socket.create_server((host, 0))
        self.port: int = self.server.getsockname()[1]
        self.sent: list[bytearray] = []
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.upstream)
            record = bytearray()
            with self._lock:
                self.sent.append(record)
                self._sockets += [client, upstream]
            threading.Thread(
                target=self._pipe, args=(client, upstream, record), daemon=True
            ).start()
            threading.Thread(target=self._pipe, args=(upstream, client, None), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket, record: bytearray | None) -> None:
        try:
            while chunk := src.recv(65536):
                if record is not None:
                    record += chunk
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def lines_by_rank(self) -> dict[str, list[str]]:
        """rank_id -> the event lines of its connections, in order (handshakes removed)."""
        out: dict[str, list[str]] = {}
        with self._lock:
            records = [bytes(r) for r in self.sent]
        for data in records:
            lines = data.decode().splitlines()
            if not lines or not lines[0].startswith("PERSEUS1 "):
                continue
            out.setdefault(lines[0].split()[1], []).extend(lines[1:])
        return out

    def __enter__(self) -> EventTap:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.server.close()
        with self._lock:
            for s in self._sockets:
                with contextlib.suppress(OSError):
                    s.close()
