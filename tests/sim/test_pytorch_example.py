"""examples/pytorch_1f1b.py, a real PyTorch pipeline (4 processes, gloo), against a simulated
sidecar: the sidecar receives the exact 1F1B instruction sequence of every rank."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from perseus_hooks.pipeline import format_instruction, one_f_one_b_order
from perseus_profiles import load_example
from tests.sim.sidecar_process import JOB_TOKEN, sidecar_process
from tests.sim.tap import EventTap

pytestmark = [pytest.mark.torch, pytest.mark.slow]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "pytorch_1f1b.py"
STAGES, MICROBATCHES, ITERATIONS = 4, 5, 3


def _expected_lines(stage: int) -> list[tuple[str, int]]:
    lines: list[tuple[str, int]] = []
    for _ in range(ITERATIONS):
        for instruction in one_f_one_b_order(STAGES, MICROBATCHES)[stage]:
            name = format_instruction(instruction)
            kind, m = name[0], int(name[1:])
            lines += [(f"{kind}B", m), (f"{kind}E", m)]
        lines.append(("IE", -1))
    return lines


def test_the_sidecar_sees_every_ranks_exact_1f1b_sequence(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    profile = tmp_path / "four-stage.csv"
    profile.write_text(load_example("gpt3-175b-a100").select_stages((0, 1, 2, 7)).to_csv())
    token_file = tmp_path / "job-token"
    token_file.write_text(JOB_TOKEN)
    with sidecar_process(tmp_path, profile=profile, gpus=STAGES) as sidecar:
        sidecar.announce(
            "ml",
            "torchjob",
            [{"namespace": "ml", "name": "trainer-0", "uid": "u0", "ip": "127.0.0.1",
              "host_network": True,
              "gpu_uuids": [f"GPU-sim-n0-{i}" for i in range(STAGES)]}],
        )  # fmt: skip
        with EventTap(sidecar.event_port) as tap:
            env = {
                **os.environ,
                "PERSEUS_SIDECAR_HOST": "127.0.0.1",
                "PERSEUS_SIDECAR_PORT": str(sidecar.port),
                "PERSEUS_SIDECAR_EVENT_PORT": str(tap.port),
                "PERSEUS_POD_NAMESPACE": "ml",
                "PERSEUS_POD_NAME": "trainer-0",
                "PERSEUS_JOB_TOKEN_FILE": str(token_file),
            }
            uuids = ",".join(f"GPU-sim-n0-{i}" for i in range(STAGES))
            proc = subprocess.run(
                [sys.executable, str(EXAMPLE), "--stages", str(STAGES), "--microbatches",
                 str(MICROBATCHES), "--iterations", str(ITERATIONS), "--gpu-uuids", uuids],
                env=env, capture_output=True, text=True, timeout=240, check=False,
            )  # fmt: skip
            assert proc.returncode == 0, proc.stderr
            assert "final loss" in proc.stdout
            assert "unavailable" not in proc.stderr
            received = tap.lines_by_rank()
        timings = sidecar.timings("ml", "torchjob")
    ranks = {r["rank_id"]: r for r in timings["ranks"]}
    assert sorted(r["rank"] for r in ranks.values()) == list(range(STAGES))
    assert set(received) == set(ranks)
    for rank_id, lines in received.items():
        rank = ranks[rank_id]
        assert rank["pipeline_rank"] == rank["rank"]
        assert rank["gpu_uuid"] == f"GPU-sim-n0-{rank['rank']}"
        events = [line.split() for line in lines]
        assert [(kind, int(m)) for kind, m, _ in events] == _expected_lines(rank["pipeline_rank"])
        stamps = [int(t) for _, _, t in events]
        assert stamps == sorted(stamps)
        # The sidecar took them all: per-instruction timings of every iteration.
        assert rank["iterations"] == ITERATIONS
        counts = {i["instruction"]: i["count"] for i in rank["instructions"]}
        assert counts == {
            "forward": ITERATIONS * MICROBATCHES,
            "backward": ITERATIONS * MICROBATCHES,
        }
