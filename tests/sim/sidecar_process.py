"""Real `perseus-sidecar --gpu-backend simulated` processes for integration tests, plus small
HTTP helpers speaking the operator's side (announce, schedule, timings)."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

OPERATOR_TOKEN = "operator-token-0123456789abcdef"
JOB_TOKEN = "job-token-0123456789abcdef"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class SidecarProcess:
    host: str
    port: int
    event_port: int
    state_dir: Path
    process: subprocess.Popen[bytes]
    log_path: Path
    command: tuple[str, ...] = ()
    """How it was started (to start it again on the same ports and state)."""

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def node_arg(self) -> str:
        """The `perseus sim-train --node` value for this sidecar."""
        return f"{self.host}:{self.port}={self.state_dir}"

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
        return httpx.request(method, self.url + path, headers=headers, timeout=10, **kwargs)

    def announce(self, namespace: str, job: str, pods: Sequence[dict[str, object]]) -> None:
        digest = hashlib.sha256(JOB_TOKEN.encode()).hexdigest()
        response = self.request(
            "PUT", f"/v1/jobs/{namespace}/{job}", json={"token_sha256": digest, "pods": pods}
        )
        assert response.status_code in (200, 201), response.text

    def timings(self, namespace: str, job: str, window_s: float = 600) -> dict[str, Any]:
        response = self.request("GET", f"/v1/jobs/{namespace}/{job}/timings?window_s={window_s}")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def sidecar_process(
    tmp_path: Path,
    *,
    name: str = "n0",
    example: str | None = "gpt3-175b-a100",
    profile: Path | None = None,
    gpus: int = 8,
    time_scale: float = 0.1,
    extra: Sequence[str] = (),
) -> Iterator[SidecarProcess]:
    """Start a simulated sidecar on free loopback ports; SIGTERM it on exit."""
    token_file = tmp_path / "operator.token"
    token_file.write_text(OPERATOR_TOKEN)
    state_dir = tmp_path / f"state-{name}"
    port, event_port = free_port(), free_port()
    source = ["--example", example] if profile is None else ["--profile", str(profile)]
    assert example is not None or profile is not None
    log_path = tmp_path / f"sidecar-{name}.log"
    command = [
        sys.executable, "-m", "perseus_sidecar.main", "--gpu-backend", "simulated", *source,
        "--gpus", str(gpus), "--host", "127.0.0.1", "--port", str(port),
        "--event-port", str(event_port), "--token-file", str(token_file),
        "--state-dir", str(state_dir), "--node-name", name, "--time-scale", str(time_scale),
        *extra,
    ]  # fmt: skip
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    sidecar = SidecarProcess(
        "127.0.0.1", port, event_port, state_dir, process, log_path, tuple(command)
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise AssertionError(f"sidecar exited early:\n{sidecar.log()}")
            try:
                if httpx.get(sidecar.url + "/v1/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"sidecar not ready in time:\n{sidecar.log()}")
            time.sleep(0.1)
        yield sidecar
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait()
