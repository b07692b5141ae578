"""How far down the time scale the simulated trainer stays faithful on this machine.

For each time scale, starts a simulated sidecar, runs the trainer (8-stage example profile,
12 microbatches, all GPUs at maximum clock) and compares the wall-clock iteration time with the
all-max-clock longest path of the 1F1B DAG (T0). Prints per scale the median and worst
deviation, the instructions that started late (the host fell behind by more than max_lag_s),
and the trainer's CPU use. The baseline is the slowest scale (1.0) in the same run.

    .venv/bin/python bench/sim_fidelity.py [--scales 1,0.3,0.1,0.05,0.02,0.01] [--pipelines 1]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from perseus_sim.spec import NodeSpec, SimConfig
from perseus_sim.trainer import SimTrainer

OPERATOR_TOKEN = secrets.token_urlsafe(24)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _start_sidecar(workdir: Path, example: str, gpus: int, scale: float) -> tuple[
    subprocess.Popen[bytes], NodeSpec
]:  # fmt: skip
    token_file = workdir / "operator.token"
    token_file.write_text(OPERATOR_TOKEN)
    port, event_port = _free_port(), _free_port()
    state_dir = workdir / f"state-{scale}"
    process = subprocess.Popen(
        [
            sys.executable, "-m", "perseus_sidecar.main", "--gpu-backend", "simulated",
            "--example", example, "--gpus", str(gpus), "--host", "127.0.0.1",
            "--port", str(port), "--event-port", str(event_port), "--token-file",
            str(token_file), "--state-dir", str(state_dir), "--time-scale", str(scale),
            "--log-level", "warning",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/readyz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or process.poll() is not None:
            raise SystemExit("bench: the simulated sidecar did not start")
        time.sleep(0.1)
    return process, NodeSpec("127.0.0.1", port, state_dir)


def _run(node: NodeSpec, pipelines: int, iterations: int, job_token: str) -> tuple[
    list[float], float, int, float
]:  # fmt: skip
    config = SimConfig(
        nodes=(node,),
        pipelines=pipelines,
        microbatches=12,
        iterations=iterations,
        job_token=job_token,
        job="fidelity",
    )
    trainer = SimTrainer(config)
    digest = hashlib.sha256(job_token.encode()).hexdigest()
    response = httpx.put(
        f"http://{node.host}:{node.port}/v1/jobs/default/fidelity",
        json={"token_sha256": digest, "pods": trainer.pods_by_node()[0]},
        headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"},
        timeout=10,
    )
    response.raise_for_status()
    cpu0, wall0 = time.process_time(), time.monotonic()
    results = trainer.run()
    cpu_share = (time.process_time() - cpu0) / (time.monotonic() - wall0)
    late = sum(r.late_starts for r in results)
    return [r.time_s / r.expected_s - 1 for r in results], trainer.expected_s(0), late, cpu_share


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--example", default="gpt3-175b-a100")
    parser.add_argument("--scales", default="1,0.3,0.1,0.05,0.02,0.01")
    parser.add_argument("--pipelines", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=8)
    args = parser.parse_args()
    scales = [float(s) for s in args.scales.split(",")]
    print(f"load average before: {os.getloadavg()[0]:.2f} (2 cores shared with other work)")
    print(
        f"{'scale':>7} {'T0 wall':>9} {'median dev':>11} {'worst dev':>10} {'late':>6} {'CPU':>6}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for scale in scales:
            process, node = _start_sidecar(Path(tmp), args.example, 8 * args.pipelines, scale)
            try:
                deviations, t0_s, late, cpu = _run(
                    node, args.pipelines, args.iterations, secrets.token_urlsafe(16)
                )
            finally:
                process.send_signal(signal.SIGTERM)
                process.wait(15)
            median = statistics.median(deviations) * 100
            worst = max(deviations, key=abs) * 100
            verdict = "ok" if abs(median) < 2 else "UNFAITHFUL"
            print(
                f"{scale:7.3f} {t0_s * scale:8.3f}s {median:+10.2f}% {worst:+9.2f}% "
                f"{late:6d} {cpu * 100:5.0f}%  {verdict}",
                flush=True,
            )
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
