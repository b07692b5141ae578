"""A small in-test sidecar that speaks the hooks' side of the contract (registration over HTTP,
events as TCP lines, ``S 1``/``S 0`` notices), recording everything for assertions."""

from __future__ import annotations

import json
import socket
import socketserver
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Registration:
    body: dict[str, object]
    authorization: str
    client_ip: str


@dataclass
class FakeSidecar:
    """Start with :meth:`start`; `token` is the job token it accepts."""

    token: str = "job-token"
    schedule_active: bool = False
    refuse_registrations: int = 0
    """Answer this many registrations with 403 before accepting."""
    registrations: list[Registration] = field(default_factory=list)
    events: dict[str, list[tuple[str, int, int]]] = field(default_factory=dict)
    chunks: dict[str, list[int]] = field(default_factory=dict)
    """Each event's model chunk (the optional fourth field; 0 when absent)."""
    event_clients: dict[str, str] = field(default_factory=dict)
    known_ranks: set[str] = field(default_factory=set)
    read_events: bool = True
    http_port: int = 0
    event_port: int = 0
    _conns: dict[str, socket.socket] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _servers: list[socketserver.BaseServer] = field(default_factory=list)

    def start(self) -> FakeSidecar:
        sidecar = self

        class Http(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                return

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length))
                sidecar.registrations.append(
                    Registration(
                        body, self.headers.get("Authorization", ""), self.client_address[0]
                    )
                )
                if self.path != "/v1/ranks":
                    self._reply(404, {"detail": "not found"})
                elif self.headers.get("Authorization") != f"Bearer {sidecar.token}":
                    self._reply(401, {"detail": "bad job token"})
                elif sidecar.refuse_registrations > 0:
                    sidecar.refuse_registrations -= 1
                    self._reply(403, {"detail": "pod not announced"})
                else:
                    rank_id = f"r{body['rank']}-{body['pod']}"
                    sidecar.known_ranks.add(rank_id)
                    self._reply(
                        201,
                        {
                            "rank_id": rank_id,
                            "event_port": sidecar.event_port,
                            "schedule_active": sidecar.schedule_active,
                        },
                    )

            def _reply(self, status: int, payload: dict[str, object]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        class Events(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                hello = self.rfile.readline().decode().split()
                if (
                    len(hello) != 3
                    or hello[0] != "PERSEUS1"
                    or hello[2] != sidecar.token
                    or hello[1] not in sidecar.known_ranks
                ):
                    self.wfile.write(b"ERR unknown rank or bad token\n")
                    return
                rank_id = hello[1]
                with sidecar._lock:
                    sidecar._conns[rank_id] = self.connection
                    sidecar.event_clients[rank_id] = self.client_address[0]
                    sidecar.events.setdefault(rank_id, [])
                self.wfile.write(f"OK {int(sidecar.schedule_active)}\n".encode())
                while not sidecar.read_events:
                    time.sleep(0.01)
                for raw in self.rfile:
                    fields = raw.decode().split()
                    if len(fields) < 3:  # not an event (e.g. a keep-alive line): not recorded
                        continue
                    kind, mb, t_ns, *chunk = fields
                    with sidecar._lock:
                        sidecar.events[rank_id].append((kind, int(mb), int(t_ns)))
                        sidecar.chunks.setdefault(rank_id, []).append(int(chunk[0]) if chunk else 0)
                with sidecar._lock:
                    if sidecar._conns.get(rank_id) is self.connection:
                        del sidecar._conns[rank_id]

        http = ThreadingHTTPServer(("127.0.0.1", self.http_port), Http)
        http.daemon_threads = True
        socketserver.ThreadingTCPServer.allow_reuse_address = True
        events = socketserver.ThreadingTCPServer(("127.0.0.1", self.event_port), Events)
        events.daemon_threads = True
        self.http_port = http.server_address[1]
        self.event_port = events.server_address[1]
        self._servers = [http, events]
        for server in self._servers:
            threading.Thread(
                target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
            ).start()
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        with self._lock:
            for conn in self._conns.values():
                conn.shutdown(socket.SHUT_RDWR)
                conn.close()
            self._conns.clear()

    def notify(self, rank_id: str, line: bytes) -> None:
        """Send a raw line to a connected rank (``S 1``, ``ERR ...``)."""
        with self._lock:
            self._conns[rank_id].sendall(line)

    def drop_connection(self, rank_id: str) -> None:
        with self._lock:
            conn = self._conns.pop(rank_id)
        conn.shutdown(socket.SHUT_RDWR)
        conn.close()

    def events_of(self, rank_id: str) -> list[tuple[str, int, int]]:
        with self._lock:
            return list(self.events.get(rank_id, []))


def wait_until(condition: Callable[[], object], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.005)
