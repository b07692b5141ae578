"""The simulated trainer as one process per rank (`perseus sim-train coordinator|rank`) on
loopback against a real simulated sidecar: each rank process has its own loopback IP, as a pod
has its own. Checked on the simulated timeline: the iterations follow the 1F1B all-max time,
energies follow the profile, a rank killed mid-iteration and started again (new process, new IP)
completes the job, a dead coordinator ends the ranks, and bad input is one line and exit 2."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from perseus_operator.cli import main as perseus
from perseus_profiles import INSTRUCTIONS, load_example
from perseus_sim import wire
from tests.sim.sidecar_process import JOB_TOKEN, SidecarProcess, free_port, sidecar_process
from tests.sim.test_trainer import _all_max

pytestmark = pytest.mark.slow

PROFILE = load_example("gpt3-175b-a100").select_stages((0, 1, 2, 7))


def _ip(rank: int, base: int = 40) -> str:
    return f"127.0.0.{base + rank}"


class Job:
    """A coordinator process and its rank processes against one simulated sidecar."""

    def __init__(self, tmp_path: Path, sidecar: SidecarProcess, pipelines: int) -> None:
        self.tmp_path = tmp_path
        self.sidecar = sidecar
        self.ranks = 4 * pipelines
        self.pipelines = pipelines
        self.port = free_port()
        self.token_file = tmp_path / "job.token"
        self.token_file.write_text(JOB_TOKEN)
        self.json = tmp_path / "results.json"
        self.coordinator: subprocess.Popen[bytes] | None = None
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.pods = {r: (f"job-{r}", _ip(r)) for r in range(self.ranks)}
        self.announce()

    def announce(self) -> None:
        """What the operator does: the job's pods (name, IP) to the node's sidecar."""
        self.sidecar.announce(
            "default",
            "dist",
            [
                # each rank plays GPU `rank` of the sidecar's node (n0): what its pod was given
                {
                    "namespace": "default",
                    "name": name,
                    "uid": name,
                    "ip": ip,
                    "gpu_uuids": [f"GPU-sim-n0-{rank}"],
                }
                for rank, (name, ip) in self.pods.items()
            ],
        )

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = (self.tmp_path / f"{name}.log").open("wb")
        command = [sys.executable, "-m", "perseus_operator.cli", "sim-train", *args]
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        self.processes[name] = process
        return process

    def log(self, name: str) -> str:
        return (self.tmp_path / f"{name}.log").read_text(errors="replace")

    def start_coordinator(self, *extra: str, iterations: int, microbatches: int) -> None:
        self.coordinator = self._spawn(
            "coordinator",
            [
                "coordinator", "--host", "127.0.0.1", "--port", str(self.port),
                "--stages", "4", "--pipelines", str(self.pipelines),
                "--microbatches", str(microbatches), "--iterations", str(iterations),
                "--time-scale-from-node", str(self.sidecar.state_dir),
                "--join-timeout-s", "60", "--json", str(self.json), *extra,
            ],
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while "listening on port" not in self.log("coordinator"):
            assert self.coordinator.poll() is None, self.log("coordinator")
            assert time.monotonic() < deadline, "the coordinator did not start"
            time.sleep(0.05)

    def start_rank(self, rank: int, name: str | None = None) -> subprocess.Popen[bytes]:
        pod, ip = self.pods[rank]
        return self._spawn(
            name or f"rank{rank}",
            [
                "rank", "--rank", str(rank), "--coordinator", f"127.0.0.1:{self.port}",
                "--node-state", str(self.sidecar.state_dir),
                "--sidecar", f"127.0.0.1:{self.sidecar.port}", "--listen-port", "0",
                "--advertise-ip", ip, "--job-token-file", str(self.token_file),
                "--namespace", "default", "--pod", pod, "--connect-timeout-s", "20",
                "--coordinator-timeout-s", "10",
            ],
        )  # fmt: skip

    def wait_for(self, name: str, text: str, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while text not in self.log(name):
            assert self.processes[name].poll() is None, self.log(name)
            assert time.monotonic() < deadline, f"{text!r} not in {name}'s log:\n{self.log(name)}"
            time.sleep(0.02)

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()


@pytest.fixture
def job_env(tmp_path: Path) -> Iterator[tuple[Path, SidecarProcess]]:
    profile = tmp_path / "four-stage.csv"
    profile.write_text(PROFILE.to_csv())
    with sidecar_process(tmp_path, profile=profile, gpus=8, time_scale=0.2) as sidecar:
        yield tmp_path, sidecar


def _blocking_w(sidecar: SidecarProcess) -> float:
    value: float = json.loads((sidecar.state_dir / "node.json").read_text())["blocking_power_w"]
    return value


def _hostile(port: int, payloads: list[bytes]) -> None:
    """Connections sending what no rank would; each must be dropped, nothing else."""
    for payload in payloads:
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(payload)
            s.settimeout(5)
            try:
                while s.recv(65536):
                    pass
            except OSError:
                pass


def test_ranks_run_1f1b_across_processes(job_env: tuple[Path, SidecarProcess]) -> None:
    """2 pipelines x 4 stages as 8 rank processes: the iterations take the 1F1B all-max time
    plus the all-reduce on the timeline, a straggling pipeline sets the pace, each iteration's
    energy is the profile's, the sidecar saw every rank's every instruction; hostile connections
    to the coordinator and to a rank change nothing."""
    tmp_path, sidecar = job_env
    job = Job(tmp_path, sidecar, pipelines=2)
    microbatches, iterations, allreduce_s = 6, 5, 0.1
    t0_s, pipeline_j = _all_max(PROFILE, microbatches, _blocking_w(sidecar))
    try:
        job.start_coordinator(
            "--allreduce-s", str(allreduce_s), "--straggler", "1:1.5:3",
            iterations=iterations, microbatches=microbatches,
        )  # fmt: skip
        _hostile(
            job.port,
            [
                b"GET / HTTP/1.1\r\n\r\n",
                b"x" * (wire.MAX_LINE + 10),
                b'{"type": "hello", "rank": "0"}\n',
                b'{"type": "hello", "rank": 0, "stages": 4, "time_scale": NaN}\n',
                b"[1, 2, 3]\n",
                b'{"type": "arrive", "generation": 1, "iteration": 0, "end_s": 0, "late": 0}\n',
            ],
        )
        ranks = [job.start_rank(r) for r in range(job.ranks)]
        assert job.coordinator is not None
        assert job.coordinator.wait(120) == 0, job.log("coordinator")
        assert [p.wait(30) for p in ranks] == [0] * job.ranks, [
            job.log(f"rank{r}") for r in range(job.ranks)
        ]
        timings = sidecar.timings("default", "dist")
    finally:
        job.stop()
    out = job.log("coordinator")
    assert "Traceback" not in out
    assert out.count("closing the connection of 127.0.0.1") >= 4
    results = json.loads(job.json.read_text())
    assert [r["iteration"] for r in results] == list(range(iterations))
    for r in results:
        factor = 1.5 if r["iteration"] >= 3 else 1.0
        assert r["expected_s"] == pytest.approx(t0_s * factor + allreduce_s)
        assert f"iteration {r['iteration']:4d}  time" in out
    # Host lag (eight processes on a shared machine) shows as late starts; judge the rest.
    clean = [r for r in results if r["late_starts"] == 0]
    assert len(clean) >= 3, [r["late_starts"] for r in results]
    for r in clean:
        assert r["timeline_s"] == pytest.approx(r["expected_s"], rel=0.01)
        if r["iteration"] < 3:
            blocking_j = _blocking_w(sidecar) * 4 * allreduce_s
            assert r["energy_j"] == pytest.approx(2 * (pipeline_j + blocking_j), rel=0.01)
    by_rank = {r["rank"]: r for r in timings["ranks"]}
    assert sorted(by_rank) == list(range(8))
    for rank, r in by_rank.items():
        assert r["pod"] == f"job-{rank}"
        assert r["iterations"] == iterations
        counts = {i["instruction"]: i["count"] for i in r["instructions"]}
        assert counts == dict.fromkeys(INSTRUCTIONS, iterations * microbatches)


def test_the_stop_file_ends_the_job_cleanly(job_env: tuple[Path, SidecarProcess]) -> None:
    """A job started for a million iterations ends after the iteration in progress once the
    stop file exists: every process exits 0 and the energy of the last iteration is reported."""
    tmp_path, sidecar = job_env
    job = Job(tmp_path, sidecar, pipelines=1)
    stop = tmp_path / "stop"
    try:
        job.start_coordinator("--stop-file", str(stop), iterations=1_000_000, microbatches=4)
        ranks = [job.start_rank(r) for r in range(job.ranks)]
        job.wait_for("coordinator", "iteration    1  time")
        stop.touch()
        assert job.coordinator is not None
        assert job.coordinator.wait(60) == 0, job.log("coordinator")
        assert [p.wait(30) for p in ranks] == [0] * job.ranks
    finally:
        job.stop()
    results = json.loads(job.json.read_text())
    assert 2 <= len(results) < 1_000_000
    assert [r["iteration"] for r in results] == list(range(len(results)))
    assert all(r["energy_j"] > 0 for r in results)
    assert "ends after" in job.log("coordinator")


def test_a_killed_rank_rejoins_and_the_job_redoes_the_iteration(
    job_env: tuple[Path, SidecarProcess],
) -> None:
    """Rank 2 is SIGKILLed while the job runs: the coordinator aborts the attempt, a new rank-2
    process (new pod name and IP, announced again as the operator would) joins, registers with
    the sidecar, and the job redoes the interrupted iteration and completes."""
    tmp_path, sidecar = job_env
    job = Job(tmp_path, sidecar, pipelines=1)
    microbatches, iterations = 8, 5
    t0_s, _ = _all_max(PROFILE, microbatches, _blocking_w(sidecar))
    try:
        job.start_coordinator(iterations=iterations, microbatches=microbatches)
        ranks = {r: job.start_rank(r) for r in range(job.ranks)}
        job.wait_for("coordinator", "iteration    1  time")
        os.kill(ranks[2].pid, signal.SIGKILL)
        ranks[2].wait()
        job.wait_for("coordinator", "rank 2 left during iteration")
        job.pods[2] = ("job-2-again", _ip(2, base=50))
        job.announce()
        ranks[2] = job.start_rank(2, name="rank2-again")
        assert job.coordinator is not None
        assert job.coordinator.wait(120) == 0, job.log("coordinator")
        codes = {r: p.wait(30) for r, p in ranks.items()}
        timings = sidecar.timings("default", "dist")
    finally:
        job.stop()
    assert codes == dict.fromkeys(range(4), 0), job.log("rank2-again")
    out = job.log("coordinator")
    assert "1 restart(s)" in out
    assert "rank 2 joined from 127.0.0.52" in out
    results = json.loads(job.json.read_text())
    assert [r["iteration"] for r in results] == list(range(iterations))
    redone = int(out.split("rank 2 left during iteration ")[1].split()[0])
    assert 2 <= redone < iterations
    # The redone iteration holds the lost attempt and the wait; the others are clean.
    assert results[redone]["timeline_s"] > t0_s * 1.1
    others = [r for i, r in enumerate(results) if i != redone and r["late_starts"] == 0]
    assert others
    for r in others:
        assert r["timeline_s"] == pytest.approx(t0_s, rel=0.01)
    again = [r for r in timings["ranks"] if r["pod"] == "job-2-again"]
    assert len(again) == 1
    assert again[0]["rank"] == 2
    assert not again[0]["stale"]
    assert again[0]["iterations"] >= iterations - redone


def test_a_rank_that_never_rejoins_fails_the_job(job_env: tuple[Path, SidecarProcess]) -> None:
    tmp_path, sidecar = job_env
    job = Job(tmp_path, sidecar, pipelines=1)
    try:
        job.start_coordinator("--rejoin-timeout-s", "1", iterations=1000, microbatches=4)
        ranks = [job.start_rank(r) for r in range(job.ranks)]
        job.wait_for("coordinator", "iteration    0  time")
        ranks[1].kill()
        assert job.coordinator is not None
        assert job.coordinator.wait(30) == 1
        codes = [p.wait(30) for p in ranks]
    finally:
        job.stop()
    reason = "ranks 1 did not rejoin within 1 s"
    assert job.log("coordinator").splitlines()[-1] == f"perseus sim-train: error: {reason}"
    assert codes == [1, -signal.SIGKILL, 1, 1]
    for r in (0, 2, 3):
        lines = [line for line in job.log(f"rank{r}").splitlines() if "perseus sim-train" in line]
        assert lines == [f"perseus sim-train: error: the job failed: {reason}"]


def test_ranks_exit_when_the_coordinator_dies(job_env: tuple[Path, SidecarProcess]) -> None:
    tmp_path, sidecar = job_env
    job = Job(tmp_path, sidecar, pipelines=1)
    try:
        job.start_coordinator(iterations=1000, microbatches=4)
        ranks = [job.start_rank(r) for r in range(job.ranks)]
        job.wait_for("coordinator", "iteration    0  time")
        assert job.coordinator is not None
        job.coordinator.kill()
        codes = [p.wait(30) for p in ranks]
    finally:
        job.stop()
    assert codes == [1] * 4
    for r in range(4):
        lines = [line for line in job.log(f"rank{r}").splitlines() if "perseus sim-train" in line]
        assert lines == [
            "perseus sim-train: error: the coordinator at 127.0.0.1:"
            f"{job.port} closed the connection"
        ]


# Bad input ------------------------------------------------------------------------------------


def _rank_args(
    sidecar: SidecarProcess, coordinator_port: int, token_file: Path, *extra: str
) -> list[str]:
    return [
        "sim-train", "rank", "--coordinator", f"127.0.0.1:{coordinator_port}",
        "--node-state", str(sidecar.state_dir), "--sidecar", f"127.0.0.1:{sidecar.port}",
        "--listen-port", "0", "--job-token-file", str(token_file), "--connect-timeout-s", "1",
        *extra,
    ]  # fmt: skip


def _one_line_error(code: int, err: str, message: str) -> None:
    # Another test's logging.basicConfig may leave a handler on a closed capture stream, whose
    # "--- Logging error ---" reports (of the fixtures' httpx logs) are not this command's.
    err = re.sub(r"--- Logging error ---\n.*?\nArguments: [^\n]*\n", "", err, flags=re.DOTALL)
    assert code == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("perseus sim-train: error:")]
    assert len(errors) == 1, err
    assert message in errors[0]


@pytest.fixture
def coordinator(job_env: tuple[Path, SidecarProcess]) -> Iterator[int]:
    """An in-process coordinator for a 1 x 4 job (port)."""
    import asyncio

    from perseus_sim.coordinator import Coordinator
    from perseus_sim.spec import CoordinatorConfig

    config = CoordinatorConfig(
        stages=4, pipelines=1, microbatches=2, iterations=1, host="127.0.0.1", port=0
    )
    ports: list[int] = []
    started = threading.Event()
    loop = asyncio.new_event_loop()
    server = Coordinator(config, say=lambda _: None)

    def ready(port: int) -> None:
        ports.append(port)
        started.set()

    task = loop.create_task(server.serve(ready))

    def run() -> None:
        with contextlib.suppress(asyncio.CancelledError):
            loop.run_until_complete(task)
        loop.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(10)
    yield ports[0]
    loop.call_soon_threadsafe(task.cancel)
    thread.join(10)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--rank", "7"], "refused rank 7: rank 7 is not one of 0..3 (1 pipelines x 4 stages)"),
        (["--rank", "1", "--gpu-index", "9"], "--gpu-index 9 is not one of the node's GPUs 0..7"),
    ],
)
def test_rank_refused_by_the_coordinator_or_the_node(
    job_env: tuple[Path, SidecarProcess],
    coordinator: int,
    extra: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    tmp_path, sidecar = job_env
    token = tmp_path / "job.token"
    code = perseus(_rank_args(sidecar, coordinator, token, *extra))
    _one_line_error(code, capsys.readouterr().err, message)


def test_stage_count_mismatch_is_refused(
    job_env: tuple[Path, SidecarProcess], capsys: pytest.CaptureFixture[str]
) -> None:
    tmp_path, sidecar = job_env
    job = Job(tmp_path, sidecar, pipelines=1)
    job.coordinator = job._spawn(
        "coordinator",
        ["coordinator", "--host", "127.0.0.1", "--port", str(job.port), "--stages", "3",
         "--pipelines", "1", "--microbatches", "2", "--iterations", "1",
         "--join-timeout-s", "30"],
    )  # fmt: skip
    try:
        code = perseus(
            _rank_args(
                sidecar, job.port, job.token_file, "--rank", "0", "--connect-timeout-s", "20"
            )
        )
    finally:
        job.stop()
    _one_line_error(
        code, capsys.readouterr().err, "refused rank 0: its node's profile has 4 stages, the job 3"
    )


def test_unreachable_sidecar_coordinator_and_state(
    job_env: tuple[Path, SidecarProcess], capsys: pytest.CaptureFixture[str]
) -> None:
    tmp_path, sidecar = job_env
    token = tmp_path / "job.token"
    nobody = free_port()
    code = perseus(_rank_args(sidecar, nobody, token, "--rank", "0"))
    _one_line_error(
        code, capsys.readouterr().err, f"cannot reach the coordinator at 127.0.0.1:{nobody}"
    )
    args = _rank_args(sidecar, nobody, token, "--rank", "0")
    args[args.index("--sidecar") + 1] = f"127.0.0.1:{nobody}"
    code = perseus(args)
    _one_line_error(
        code, capsys.readouterr().err, f"cannot reach the node's sidecar at 127.0.0.1:{nobody}"
    )
    args = _rank_args(sidecar, nobody, token, "--rank", "0")
    args[args.index("--node-state") + 1] = str(tmp_path / "nothing-here")
    code = perseus(args)
    _one_line_error(code, capsys.readouterr().err, "no simulated GPU state in")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["rank", "--rank", "0", "--coordinator", "nowhere", "--node-state", "/s",
          "--sidecar", "h:1", "--job-token-file", "t"], "'nowhere': expected HOST:PORT"),
        (["rank", "--rank", "0", "--coordinator", "h:99999", "--node-state", "/s",
          "--sidecar", "h:1", "--job-token-file", "t"], "port must be 1-65535"),
        (["rank", "--rank", "-1", "--coordinator", "h:1", "--node-state", "/s",
          "--sidecar", "h:1", "--job-token-file", "t"], "--rank must be >= 0"),
        (["rank", "--rank", "0", "--coordinator", "h:1", "--node-state", "/s",
          "--sidecar", "h:1", "--job-token-file", "t", "--advertise-ip", "ten"], "is not an IP"),
        (["coordinator", "--stages", "0", "--pipelines", "1", "--microbatches", "2",
          "--iterations", "1"], "stages must be >= 1"),
        (["coordinator", "--stages", "4", "--pipelines", "1", "--microbatches", "2",
          "--iterations", "1", "--straggler", "3:2"], "straggler pipeline 3 is not one of 0..0"),
        (["coordinator", "--stages", "4", "--pipelines", "1", "--microbatches", "2",
          "--iterations", "1", "--rejoin-timeout-s", "nan"], "--rejoin-timeout-s must be"),
        (["coordinator", "--stages", "4", "--pipelines", "1", "--microbatches", "2",
          "--iterations", "1", "--time-scale-from-node", "/nonexistent"], "no simulated GPU state"),
    ],
)  # fmt: skip
def test_bad_arguments_are_one_line_errors(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = perseus(["sim-train", *args])
    _one_line_error(code, capsys.readouterr().err, message)


def test_malformed_peer_message_ends_the_rank_with_one_line(
    job_env: tuple[Path, SidecarProcess], capsys: pytest.CaptureFixture[str]
) -> None:
    """The test plays the coordinator and rank 0 of a 1 x 4 job: rank 1 (the real one) takes
    rank 0's link, gets an activation whose fields are wrong, and exits 2 with one line."""
    tmp_path, sidecar = job_env
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    seen: dict[str, object] = {}

    def fake_coordinator() -> None:
        conn, _ = server.accept()
        reader = wire.LineReader(conn)
        line = reader.line()
        assert line is not None
        hello = wire.decode(line, ("hello",))
        seen["port"] = hello.get_int("port")
        conn.sendall(
            wire.encode("welcome", stages=4, pipelines=1, microbatches=2, iterations=1)
            + wire.encode(
                "setup", generation=1, next_ip=None, next_port=None, next_rank=None, prev_rank=0
            )
        )
        with socket.create_connection(("127.0.0.1", hello.get_int("port"))) as stranger:
            stranger.sendall(b"\x00\xff garbage\n")  # refused, and changes nothing
        with socket.create_connection(("127.0.0.1", hello.get_int("port"))) as peer:
            peer.sendall(wire.encode("peer", generation=1, rank=0))
            peer.sendall(b'{"type": "act", "microbatch": -1, "end_s": 0}\n')
            conn.settimeout(20)
            try:
                while conn.recv(65536):
                    pass
            except OSError:
                pass
        conn.close()

    thread = threading.Thread(target=fake_coordinator, daemon=True)
    thread.start()
    # The setup's links come up; the rank then waits for a start, which never comes, while
    # its link reader sees the malformed activation.
    code = perseus(
        _rank_args(sidecar, port, tmp_path / "job.token", "--rank", "1", "--pod", "job-1")
    )
    thread.join(20)
    server.close()
    _one_line_error(
        code,
        capsys.readouterr().err,
        "malformed message from rank 0: act.microbatch must be within 0..1000000, got -1",
    )
