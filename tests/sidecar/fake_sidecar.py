"""The one fake sidecar of the tests and the benchmarks, recording everything for assertions.

It speaks both sides of the sidecar's contract in small: the hooks' side (rank registration over
HTTP, events as TCP lines, ``S 1``/``S 0`` notices) and the operator's side (GPUs, job
announcements, schedules, and timings from a callable the caller supplies). Standard library
HTTP and TCP servers on threads, so it serves synchronous and asyncio callers alike.
`bench/hooks.py` and `bench/operator.py` import it from here.
"""

from __future__ import annotations

import json
import re
import socket
import socketserver
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from pydantic import BaseModel, ValidationError

from perseus_sidecar.api import (
    GpuOut,
    GpusOut,
    JobAnnouncement,
    JobOut,
    ScheduleIn,
    ScheduleOut,
    TimingsOut,
)

TimingsOf = Callable[[str, str, JobAnnouncement, bool], TimingsOut]
"""(namespace, name, the job's announcement, whether a schedule is set) -> its timings."""

_JOB_PATH = re.compile(r"^/v1/jobs/([^/]+)/([^/]+)(/schedule|/timings)?$")


@dataclass
class Registration:
    body: dict[str, object]
    authorization: str
    client_ip: str


@dataclass
class ControlRequest:
    """One call on the operator's side: method, path, bearer header, query parameters."""

    method: str
    path: str
    authorization: str
    query: dict[str, list[str]]


@dataclass
class FakeSidecar:
    """Start with :meth:`start`; `token` is the job token it accepts, `operator_token` the
    operator's (None: control calls are not checked)."""

    token: str = "job-token"
    operator_token: str | None = None
    host: str = "127.0.0.1"
    node_name: str = "fake-node"
    gpu_name: str = "Fake GPU"
    gpus: int = 8
    clocks_mhz: tuple[int, ...] = (1410, 1200, 1005)
    """Supported SM clocks of every GPU, highest first."""
    timings_of: TimingsOf | None = None
    """The job's timings; None: no rank has reported yet."""
    jobs: dict[tuple[str, str], JobAnnouncement] = field(default_factory=dict)
    schedules: dict[tuple[str, str], ScheduleIn] = field(default_factory=dict)
    control_requests: list[ControlRequest] = field(default_factory=list)
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
    record_events: bool = True
    """False: only count the lines received (`lines_received`), as cheaply as a real sink
    drains them (the hooks benchmark)."""
    lines_received: int = 0
    http_port: int = 0
    event_port: int = 0
    _conns: dict[str, socket.socket] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _servers: list[socketserver.BaseServer] = field(default_factory=list)

    def start(self) -> FakeSidecar:
        sidecar = self

        class Http(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive: the operator polls every half second

            def log_message(self, format: str, *args: object) -> None:
                return

            def do_GET(self) -> None:
                self._control()

            def do_PUT(self) -> None:
                self._control()

            def do_DELETE(self) -> None:
                self._control()

            def _control(self) -> None:
                url = urlsplit(self.path)
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                authorization = self.headers.get("Authorization", "")
                with sidecar._lock:
                    sidecar.control_requests.append(
                        ControlRequest(self.command, url.path, authorization, parse_qs(url.query))
                    )
                wanted = f"Bearer {sidecar.operator_token}"
                if sidecar.operator_token is not None and authorization != wanted:
                    self._reply(401, {"detail": "bad operator token"})
                    return
                try:
                    status, out = sidecar._control(self.command, url.path, body)
                except ValidationError as exc:
                    self._reply(422, {"detail": "invalid body", "message": str(exc)})
                    return
                if isinstance(out, BaseModel):
                    self._send(status, out.model_dump_json().encode())
                elif out is None:
                    self._send(status, b"")
                else:
                    self._reply(status, out)

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
                self._send(status, json.dumps(payload).encode())

            def _send(self, status: int, data: bytes) -> None:
                self.send_response(status)
                if data:
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
                if not sidecar.record_events:
                    for _ in self.rfile:
                        sidecar.lines_received += 1  # one reader per connection
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

        http = ThreadingHTTPServer((self.host, self.http_port), Http)
        http.daemon_threads = True
        socketserver.ThreadingTCPServer.allow_reuse_address = True
        events = socketserver.ThreadingTCPServer((self.host, self.event_port), Events)
        events.daemon_threads = True
        self.http_port = http.server_address[1]
        self.event_port = events.server_address[1]
        self._servers = [http, events]
        for server in self._servers:
            threading.Thread(
                target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
            ).start()
        return self

    def _control(
        self, method: str, path: str, body: bytes
    ) -> tuple[int, BaseModel | dict[str, object] | None]:
        """The operator's side: (HTTP status, reply) for one call."""
        if path == "/v1/gpus" and method == "GET":
            clocks = list(self.clocks_mhz)
            gpus = [
                GpuOut(
                    index=i,
                    uuid=f"GPU-fake-{self.node_name}-{i}",
                    name=self.gpu_name,
                    supported_sm_clocks_mhz=clocks,
                    max_sm_clock_mhz=clocks[0],
                    usable=True,
                )
                for i in range(self.gpus)
            ]
            return 200, GpusOut(node_name=self.node_name, gpus=gpus)
        match = _JOB_PATH.match(path)
        if match is None:
            return 404, {"detail": "not found"}
        key = (match.group(1), match.group(2))
        part = match.group(3) or ""
        with self._lock:
            if part == "" and method == "PUT":
                self.jobs[key] = JobAnnouncement.model_validate_json(body)
                return 200, self._job_out(key)
            job = self.jobs.get(key)
            if job is None:
                return 404, {"detail": "no such job"}
            if part == "" and method == "DELETE":
                del self.jobs[key]
                self.schedules.pop(key, None)
                return 204, None
            if part == "" and method == "GET":
                return 200, self._job_out(key)
            if part == "/schedule" and method == "PUT":
                self.schedules[key] = ScheduleIn.model_validate_json(body)
            elif part == "/schedule" and method == "DELETE":
                self.schedules.pop(key, None)
                return 204, None
            if part == "/schedule" and method in ("GET", "PUT"):
                schedule = self.schedules.get(key)
                if schedule is None:
                    return 404, {"detail": "no schedule"}
                return 200, ScheduleOut(
                    namespace=key[0], name=key[1], entries=schedule.entries, active_ranks=[]
                )
            active = key in self.schedules
        if part == "/timings" and method == "GET":
            if self.timings_of is None:
                return 200, TimingsOut(
                    namespace=key[0], name=key[1], window_s=60, ranks=[], stages=[], pipelines=[]
                )
            return 200, self.timings_of(key[0], key[1], job, active)
        return 405, {"detail": "method not allowed"}

    def _job_out(self, key: tuple[str, str]) -> JobOut:
        job = self.jobs[key]
        schedule = self.schedules.get(key)
        return JobOut(
            namespace=key[0],
            name=key[1],
            pods=job.pods,
            ranks=[p.name for p in job.pods],
            schedule_entries=len(schedule.entries) if schedule else 0,
            profiling=False,
        )

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
