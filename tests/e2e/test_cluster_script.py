"""scripts/cluster.sh up when it cannot start: a busy port is one line naming the variable that
moves it, and a component that dies shows its log tail and leaves its logs where a caller that
deletes RUN_DIR does not reach them. Runs the real etcd on private ports (never the e2e cluster's).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("PERSEUS_K8S_CACHE", ROOT / ".cache" / "k8s"))

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not os.environ.get("KUBECONFIG"), reason="e2e: KUBECONFIG not set (scripts/cluster.sh)"
    ),
    pytest.mark.skipif(
        not (CACHE / "bin" / "etcd").is_file(), reason="scripts/cluster.sh build has not run"
    ),
]


@pytest.fixture
def ports() -> Iterator[dict[str, str]]:
    """Four distinct free loopback ports, one per variable cluster.sh reads."""
    socks = []
    for _ in range(4):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    names = ("ETCD_PORT", "ETCD_PEER", "API_PORT", "KCM_PORT")
    chosen = {name: str(s.getsockname()[1]) for name, s in zip(names, socks, strict=True)}
    for s in socks:
        s.close()
    yield chosen


def _up(run_dir: Path, ports: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **ports, "PERSEUS_K8S_CACHE": str(CACHE)}
    return subprocess.run(
        [str(ROOT / "scripts" / "cluster.sh"), "up", str(run_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_a_busy_port_is_one_line_naming_its_variable(tmp_path: Path, ports: dict[str, str]) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", int(ports["API_PORT"])))
        holder.listen()
        done = _up(tmp_path / "run", ports)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"cluster.sh: error: port {ports['API_PORT']} on 127.0.0.1 is in use (another control "
        "plane?); free it or set API_PORT to a free port"
    ]
    assert not list((tmp_path / "run").glob("*.pid"))  # nothing was started
    assert not list((tmp_path / "run").glob("*.log"))


def test_a_dying_etcd_shows_its_log_and_keeps_it(tmp_path: Path, ports: dict[str, str]) -> None:
    # The same port for clients and peers: each is free on its own, etcd's second bind fails.
    run_dir = tmp_path / "run"
    done = _up(run_dir, {**ports, "ETCD_PEER": ports["ETCD_PORT"]})
    assert done.returncode == 1
    assert "cluster.sh: error: etcd exited while starting" in done.stderr
    assert "address already in use" in done.stderr  # the tail of etcd.log
    kept = re.search(r"logs are kept in (\S+)", done.stderr)
    assert kept, done.stderr
    kept_dir = Path(kept.group(1))
    try:
        assert not list(run_dir.glob("*.pid"))  # stopped, and the API server never started
        assert not (run_dir / "apiserver.log").exists()
        shutil.rmtree(run_dir)  # as demo.sh and test.sh do on exit
        assert "address already in use" in (kept_dir / "etcd.log").read_text()
    finally:
        shutil.rmtree(kept_dir, ignore_errors=True)
