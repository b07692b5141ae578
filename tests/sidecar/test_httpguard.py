"""Connection limits without a token (HTTP under the real uvicorn server) and for authenticated
event connections: short configured timeouts, asserting what happens, never how fast."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient

from perseus_sidecar.app import create_app
from perseus_sidecar.gpu.simulated import SimulatedBackend
from perseus_sidecar.httpguard import uvicorn_options

from .conftest import JOB_TOKEN, EventSocket, announce, make_settings, node_of, register

PARTIAL = b"GET /healthz HTTP/1.1\r\nHost: sidecar\r\nX-Slow: "


class Served:
    def __init__(self, server: uvicorn.Server, thread: threading.Thread) -> None:
        self.server = server
        self.thread = thread

    @property
    def port(self) -> int:
        port: int = self.server.servers[0].sockets[0].getsockname()[1]
        return port

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)

    def metrics(self) -> str:
        return httpx.get(f"http://127.0.0.1:{self.port}/metrics", timeout=10).text


@pytest.fixture
def serve(tmp_path: Path, sim_backend: SimulatedBackend) -> Iterator[Callable[..., Served]]:
    started: list[Served] = []

    def start(**overrides: Any) -> Served:
        settings = make_settings(tmp_path / "state", **overrides)
        app = create_app(settings, sim_backend)
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=0,
            log_config=None,
            lifespan="on",
            **uvicorn_options(settings, app.state.node.metrics),
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        served = Served(server, thread)
        started.append(served)
        for _ in range(1000):
            if server.started:
                return served
            thread.join(0.01)
        raise AssertionError("uvicorn did not start")

    yield start
    for served in started:
        served.server.should_exit = True
        served.thread.join(10)


def _closed_by_server(sock: socket.socket) -> bool:
    """True when the server closes the connection (within the socket's timeout). Bytes still
    in flight are read first: a response's body may arrive after its headers were read."""
    try:
        while sock.recv(1024):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_partial_header_connection_is_closed_after_the_timeout(
    serve: Callable[..., Served],
) -> None:
    served = serve(http_header_timeout_s=0.2)
    sock = served.connect()
    sock.sendall(PARTIAL)
    assert _closed_by_server(sock)
    sock.close()
    assert "perseus_sidecar_connections_timed_out_total 1.0" in served.metrics()


def test_slow_second_request_on_a_kept_alive_connection_is_closed(
    serve: Callable[..., Served],
) -> None:
    served = serve(http_header_timeout_s=0.2, http_keep_alive_s=60)
    sock = served.connect()
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: sidecar\r\n\r\n")
    assert b"200 OK" in sock.recv(4096)
    sock.sendall(PARTIAL)  # cancels uvicorn's keep-alive timer, not ours
    assert _closed_by_server(sock)
    sock.close()


def test_connections_beyond_the_caps_are_refused_and_probes_still_answer(
    serve: Callable[..., Served],
) -> None:
    served = serve(http_max_connections_per_ip=3, http_header_timeout_s=60)
    held = [served.connect() for _ in range(2)]
    for sock in held:
        sock.sendall(PARTIAL)
    third = httpx.get(f"http://127.0.0.1:{served.port}/healthz", timeout=10)
    assert third.status_code == 200  # the third slot is free for the probe
    held.append(served.connect())
    held[-1].sendall(PARTIAL)
    refused = served.connect()
    assert _closed_by_server(refused)
    for sock in [*held, refused]:
        sock.close()
    assert 'perseus_sidecar_connections_refused_total{transport="http"}' in served.metrics()


# ---- the event transport ------------------------------------------------------------------------


def _handshake(client: TestClient, rank_id: str) -> EventSocket:
    sock = EventSocket(node_of(client).event_port)
    sock.send(f"PERSEUS1 {rank_id} {JOB_TOKEN}")
    assert sock.readline().startswith("OK")
    return sock


def test_silent_authenticated_event_connection_is_closed(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(event_idle_timeout_s=0.1)
    announce(client)
    sock = _handshake(client, register(client))
    assert sock.readline() == "ERR no event for 0.1 s"
    sock.close()


def test_a_rank_keeps_a_bounded_number_of_event_connections(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(event_max_connections_per_rank=1)
    announce(client)
    rank_id = register(client)
    first = _handshake(client, rank_id)
    second = _handshake(client, rank_id)
    assert first.readline() == "ERR replaced by a newer connection"
    assert len(node_of(client).ranks[rank_id].listeners) == 1
    first.close()
    second.close()


def test_event_connections_beyond_the_cap_are_refused(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(event_max_connections=1)
    held = EventSocket(node_of(client).event_port)
    held.sock.sendall(b"PERSEUS1")  # a partial handshake holds the only slot (to its deadline)
    refused = EventSocket(node_of(client).event_port)
    assert refused.readline() == "ERR too many connections"
    held.close()
    refused.close()
