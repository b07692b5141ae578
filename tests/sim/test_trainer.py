"""The simulated trainer against real simulated sidecar processes: fidelity to the profile's
all-max-clock iteration time, following locked clocks, stragglers and crashes as the sidecar sees
them, and the `perseus sim-train` command's errors."""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from perseus_hooks.pipeline import (
    Instruction,
    format_instruction,
    interleaved_order,
    iteration_time_s,
    one_f_one_b_order,
)
from perseus_operator.cli import main as perseus
from perseus_profiles import EXAMPLES, INSTRUCTIONS, StageProfile, load_example
from perseus_profiles import Instruction as Instr
from perseus_sim.spec import (
    Crash,
    IterationResult,
    NodeSpec,
    SimConfig,
    SimulationError,
    Straggler,
)
from perseus_sim.trainer import SimTrainer
from tests.sim.sidecar_process import JOB_TOKEN, SidecarProcess, sidecar_process

pytestmark = pytest.mark.slow

# Tests whose schedules change clocks run the GPUs at half speed: the sidecar's reaction is wall
# time, and at 0.1 s per simulated second a loaded host's 30 ms reaction spans several simulated
# instructions, each then run at the previous clock.
CLOCK_CHANGE_TIME_SCALE = 0.5


def _all_max(profile: StageProfile, microbatches: int, blocking_w: float) -> tuple[float, float]:
    """(iteration time, energy of one pipeline) with every GPU at maximum clock."""
    f_max = profile.max_frequency_mhz
    orders = one_f_one_b_order(profile.num_stages, microbatches)

    def duration(stage: int, instruction: Instruction) -> float:
        name: Instr = "forward" if instruction[0] else "backward"
        return profile.measurement(stage, name, f_max).time_s

    time_s = iteration_time_s(orders, duration)
    energy_j = 0.0
    for s in range(profile.num_stages):
        busy_s = 0.0
        for name in INSTRUCTIONS:
            m = profile.measurement(s, name, f_max)
            busy_s += microbatches * m.time_s
            energy_j += microbatches * m.energy_j
        energy_j += blocking_w * (time_s - busy_s)
    return time_s, energy_j


def _four_stage(tmp_path: Path) -> Path:
    path = tmp_path / "four-stage.csv"
    path.write_text(load_example("gpt3-175b-a100").select_stages((0, 1, 2, 7)).to_csv())
    return path


def _on_time(results: list[IterationResult]) -> list[float]:
    """The simulated iteration times of the iterations with no late start (a rank thread woke
    more than max_lag_s late on a loaded host and the GPUs' timeline waited for it); a clock
    change's latency is real, so tests that change clocks keep the default max lag."""
    on_time = [r.timeline_s for r in results if r.late_starts == 0]
    assert on_time, f"host too loaded: late starts {[r.late_starts for r in results]}"
    return on_time


def _run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = perseus(["sim-train", *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("example", sorted(EXAMPLES))
def test_all_max_iteration_is_the_longest_path(
    example: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """8 stages, 12 microbatches, time scale 0.1: the simulated GPUs' iteration time is the
    longest path of the 1F1B DAG, and the sidecar times every instruction as profiled. With no
    clock change to race, the GPUs' timeline absorbs any host lag (a 60 s launch queue), so
    every figure holds whatever the host's load; how closely the wall clock follows the
    timeline is bench/sim_fidelity.py's figure, not a test's."""
    profile = load_example(example)
    t0_s, energy_j = _all_max(profile, 12, EXAMPLES[example].blocking_power_w)
    out_json = tmp_path / "results.json"
    with sidecar_process(tmp_path, example=example, time_scale=0.1) as sidecar:
        code, out, err = _run_cli(
            [
                "--node", sidecar.node_arg, "--microbatches", "12", "--iterations", "7",
                "--operator-token-file", str(tmp_path / "operator.token"), "--job", "fidelity",
                "--job-token", JOB_TOKEN, "--keep-job", "--time-scale", "0.1",
                "--max-lag-ms", "60000", "--json", str(out_json),
            ],
            capsys,
        )  # fmt: skip
        assert code == 0, err
        timings = sidecar.timings("default", "fidelity")
    results = json.loads(out_json.read_text())
    assert len(results) == 7
    assert f"all-max-clock iteration {t0_s:.4f} s" in out
    assert all(r["expected_s"] == pytest.approx(t0_s) for r in results)
    assert [r["late_starts"] for r in results] == [0] * 7
    assert [r["timeline_s"] for r in results] == pytest.approx([t0_s] * 7, rel=1e-9)
    assert [r["energy_j"] for r in results] == pytest.approx([energy_j] * 7, rel=1e-6)
    ranks = timings["ranks"]
    assert [r["rank"] for r in ranks] == list(range(8))
    for r in ranks:
        assert r["iterations"] == 7
        by_name = {i["instruction"]: i for i in r["instructions"]}
        for name in INSTRUCTIONS:
            assert by_name[name]["count"] == 84
            f_max = profile.max_frequency_mhz
            expected = profile.measurement(r["pipeline_rank"], name, f_max).time_s
            assert by_name[name]["mean_s"] == pytest.approx(expected, rel=0.01)
    # Stage 0 begins and ends each iteration: the sidecar sees the trainer's timeline.
    assert timings["pipelines"][0]["stage0_span_mean_s"] == pytest.approx(
        statistics.fmean(r["timeline_s"] for r in results), rel=0.005
    )


def test_locked_clocks_slow_the_pipeline_as_profiled(tmp_path: Path) -> None:
    """A schedule locking every instruction to the lowest clock: the iteration takes the
    DAG's longest path at that clock, and the energy follows the low-clock profile. Judged on
    the simulated GPUs' timeline, in the iterations the host kept up with (`_on_time`)."""
    profile_path = _four_stage(tmp_path)
    profile = load_example("gpt3-175b-a100").select_stages((0, 1, 2, 7))
    low = profile.frequencies_mhz[-1]
    orders = one_f_one_b_order(4, 6)

    def duration(stage: int, instruction: Instruction) -> float:
        name: Instr = "forward" if instruction[0] else "backward"
        return profile.measurement(stage, name, low).time_s

    expected_s = iteration_time_s(orders, duration)
    with sidecar_process(
        tmp_path, profile=profile_path, gpus=4, time_scale=CLOCK_CHANGE_TIME_SCALE
    ) as sidecar:
        config = SimConfig(
            nodes=(NodeSpec(sidecar.host, sidecar.port, sidecar.state_dir),),
            pipelines=1,
            microbatches=6,
            iterations=5,
            job_token=JOB_TOKEN,
            job="locked",
        )
        trainer = SimTrainer(config)
        sidecar.announce("default", "locked", trainer.pods_by_node()[0])
        body = {
            "entries": [
                {
                    "data_rank": 0,
                    "pipeline_rank": s,
                    "order": [format_instruction(i) for i in orders[s]],
                    "frequencies_mhz": [low] * len(orders[s]),
                }
                for s in range(4)
            ]
        }
        response = sidecar.request("PUT", "/v1/jobs/default/locked/schedule", json=body)
        assert response.status_code == 200, response.text
        results = trainer.run()
        timings = sidecar.timings("default", "locked")
    assert expected_s > 1.05 * trainer.expected_s(0)
    # The first instruction of the run may start before its clock is applied.
    assert statistics.median(_on_time(results[1:])) == pytest.approx(expected_s, rel=0.02)
    assert all(r["schedule_active"] for r in timings["ranks"])
    for r in timings["ranks"]:
        forward = next(i for i in r["instructions"] if i["instruction"] == "forward")
        assert forward["mean_s"] == pytest.approx(
            profile.measurement(r["pipeline_rank"], "forward", low).time_s, rel=0.03
        )


def test_interleaved_pipeline_plays_each_chunk_at_its_clock(tmp_path: Path) -> None:
    """A per-chunk ground truth (stages 0 and 7, each split in two chunks): the trainer runs
    Megatron's interleaved order, the events name the chunk, and a schedule that locks chunk 1
    low and chunk 0 at the maximum clock gives the interleaved DAG's longest path at those
    clocks."""
    profile = load_example("gpt3-175b-a100").select_stages((0, 7)).split_chunks(2)
    profile_path = tmp_path / "chunks.csv"
    profile_path.write_text(profile.to_csv())
    top, low = profile.max_frequency_mhz, profile.frequencies_mhz[-1]
    orders = interleaved_order(2, 4, 2)

    def duration(stage: int, instruction: Instruction) -> float:
        forward, _, chunk = instruction
        name: Instr = "forward" if forward else "backward"
        return profile.measurement(stage, name, low if chunk else top, chunk=chunk).time_s

    expected_s = iteration_time_s(orders, duration)
    with sidecar_process(
        tmp_path, profile=profile_path, gpus=2, time_scale=CLOCK_CHANGE_TIME_SCALE
    ) as sidecar:
        config = SimConfig(
            nodes=(NodeSpec(sidecar.host, sidecar.port, sidecar.state_dir),),
            pipelines=1,
            microbatches=4,
            iterations=5,
            job_token=JOB_TOKEN,
            job="chunks",
        )
        trainer = SimTrainer(config)
        assert trainer.chunks == 2 and trainer.orders == orders
        with pytest.raises(SimulationError, match="not a multiple of 2"):
            SimTrainer(replace(config, microbatches=3))
        sidecar.announce("default", "chunks", trainer.pods_by_node()[0])
        body = {
            "entries": [
                {
                    "data_rank": 0,
                    "pipeline_rank": s,
                    "order": [format_instruction(i, chunked=True) for i in orders[s]],
                    "frequencies_mhz": [low if c else top for _, _, c in orders[s]],
                }
                for s in range(2)
            ]
        }
        response = sidecar.request("PUT", "/v1/jobs/default/chunks/schedule", json=body)
        assert response.status_code == 200, response.text
        results = trainer.run()
        timings = sidecar.timings("default", "chunks")
    assert expected_s > 1.03 * trainer.expected_s(0)
    assert statistics.median(_on_time(results[1:])) == pytest.approx(expected_s, rel=0.02)
    for r in timings["ranks"]:
        forward = next(i for i in r["instructions"] if i["instruction"] == "forward")
        assert forward["count"] == 5 * 2 * 4  # iterations x microbatches x chunks


def test_straggler_shows_in_the_sidecar_timings(tmp_path: Path) -> None:
    """Pipeline 1 becomes 1.5x slower from iteration 2: the job's iterations follow it and
    the sidecar's per-pipeline stage-0 spans show which pipeline straggles. No clock changes:
    the GPUs' timeline absorbs any host lag, so the simulated times are exact under load."""
    profile_path = _four_stage(tmp_path)
    seen: list[IterationResult] = []
    with sidecar_process(tmp_path, profile=profile_path, gpus=8) as sidecar:
        config = SimConfig(
            nodes=(NodeSpec(sidecar.host, sidecar.port, sidecar.state_dir),),
            pipelines=2,
            microbatches=8,
            iterations=4,
            job_token=JOB_TOKEN,
            job="straggle",
            stragglers=(Straggler(pipeline=1, factor=1.5, from_iteration=2),),
            max_lag_s=60.0,
        )
        trainer = SimTrainer(config)
        sidecar.announce("default", "straggle", trainer.pods_by_node()[0])
        before: dict[str, Any] = {}

        def record(result: IterationResult) -> None:
            seen.append(result)
            if result.iteration == 1:
                before.update(sidecar.timings("default", "straggle"))

        trainer.run(record)
        after = sidecar.timings("default", "straggle")
    t0_s = trainer.expected_s(0)
    assert [r.expected_s for r in seen] == pytest.approx([t0_s, t0_s, 1.5 * t0_s, 1.5 * t0_s])
    assert [r.late_starts for r in seen] == [0] * 4
    assert [r.timeline_s for r in seen] == pytest.approx([t0_s, t0_s, 1.5 * t0_s, 1.5 * t0_s])
    spans_before = {p["data_rank"]: p["stage0_span_last_s"] for p in before["pipelines"]}
    spans_after = {p["data_rank"]: p["stage0_span_last_s"] for p in after["pipelines"]}
    assert spans_before[1] == pytest.approx(spans_before[0], rel=0.02)
    assert spans_after[0] == pytest.approx(t0_s, rel=0.02)
    assert spans_after[1] == pytest.approx(1.5 * t0_s, rel=0.02)


@pytest.fixture
def crash_sidecar(tmp_path: Path) -> Iterator[SidecarProcess]:
    with sidecar_process(
        tmp_path, profile=_four_stage(tmp_path), gpus=4, extra=["--rank-timeout-s", "0.3"]
    ) as sidecar:
        yield sidecar


def test_crash_shows_in_the_sidecar_and_the_rank_comes_back(
    crash_sidecar: SidecarProcess,
) -> None:
    """Rank 2 dies in iteration 2 for 1.5 s: the sidecar sees its events stop first, times it
    out (resetting its locked clock), and the restarted rank re-registers under the same id."""
    sidecar = crash_sidecar
    config = SimConfig(
        nodes=(NodeSpec(sidecar.host, sidecar.port, sidecar.state_dir),),
        pipelines=1,
        microbatches=4,
        iterations=4,
        job_token=JOB_TOKEN,
        job="crash",
        crashes=(Crash(rank=2, at_iteration=2, down_s=1.5),),
    )
    trainer = SimTrainer(config)
    sidecar.announce("default", "crash", trainer.pods_by_node()[0])
    low = trainer.nodes[0].truth.frequencies_mhz[-1]
    orders = one_f_one_b_order(4, 4)
    body = {
        "entries": [
            {
                "data_rank": 0,
                "pipeline_rank": s,
                "order": [format_instruction(i) for i in orders[s]],
                "frequencies_mhz": [low] * len(orders[s]),
            }
            for s in range(4)
        ]
    }
    assert sidecar.request("PUT", "/v1/jobs/default/crash/schedule", json=body).status_code == 200
    results: list[IterationResult] = []
    runner = threading.Thread(target=lambda: results.extend(trainer.run()))
    runner.start()
    snapshots: list[dict[str, Any]] = []
    gpu_clocks: list[dict[str, Any]] = []
    try:
        while runner.is_alive():
            snapshots.append(sidecar.timings("default", "crash"))
            gpu_clocks.append(sidecar.request("GET", "/v1/gpus").json())
            time.sleep(0.1)
    finally:
        runner.join()
    assert len(results) == 4
    # While rank 2 was down: it went stale, with the longest silence of the job.
    down = [s for s in snapshots if any(r["rank"] == 2 and r["stale"] for r in s["ranks"])]
    assert down, "the sidecar never saw rank 2 go silent"
    silences = {r["rank"]: r["seconds_since_last_event"] for r in down[-1]["ranks"]}
    assert silences[2] == max(silences.values())
    # Its GPU's lock was released by the timeout at some point.
    gpu2 = "GPU-sim-n0-2"
    assert any(
        not next(g for g in snap["gpus"] if g["uuid"] == gpu2)["locked_by_sidecar"]
        for snap in gpu_clocks
    )
    # The stall is in that iteration's time; the rank came back under the same id.
    assert results[2].time_s > results[1].time_s + 1.5 / 0.1 * 0.9
    final = sidecar.timings("default", "crash")
    assert len(final["ranks"]) == 4
    assert not any(r["stale"] for r in final["ranks"])


def test_pod_ips_are_announced_and_bound(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Standalone with --pod-ip-base: pods are announced with their own loopback IPs (not host
    network) and each rank's hooks really connect from its pod IP, so the sidecar accepts them."""
    with sidecar_process(tmp_path, profile=_four_stage(tmp_path), gpus=4) as sidecar:
        code, _, err = _run_cli(
            [
                "--node", sidecar.node_arg, "--microbatches", "4", "--iterations", "2",
                "--operator-token-file", str(tmp_path / "operator.token"), "--job", "ips",
                "--pod-ip-base", "127.0.0.20", "--keep-job",
            ],
            capsys,
        )  # fmt: skip
        assert code == 0, err
        job = sidecar.request("GET", "/v1/jobs/default/ips").json()
        timings = sidecar.timings("default", "ips")
    assert [(p["name"], p["ip"], p["host_network"]) for p in job["pods"]] == [
        (f"ips-{r}", f"127.0.0.{20 + r}", False) for r in range(4)
    ]
    assert [r["iterations"] for r in timings["ranks"]] == [2, 2, 2, 2]
    assert "unavailable" not in err


def test_standalone_withdraws_the_job(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with sidecar_process(tmp_path, profile=_four_stage(tmp_path), gpus=4) as sidecar:
        code, _, err = _run_cli(
            [
                "--node", sidecar.node_arg, "--microbatches", "2", "--iterations", "1",
                "--operator-token-file", str(tmp_path / "operator.token"), "--job", "gone",
            ],
            capsys,
        )  # fmt: skip
        assert code == 0, err
        assert sidecar.request("GET", "/v1/jobs/default/gone").status_code == 404


def test_wrong_operator_token_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.token"
    bad.write_text("not-the-operator-token-at-all")
    with sidecar_process(tmp_path, profile=_four_stage(tmp_path), gpus=4) as sidecar:
        code, _, err = _run_cli(
            ["--node", sidecar.node_arg, "--microbatches", "2", "--operator-token-file", str(bad)],
            capsys,
        )
    assert code == 2
    assert "refused the job announcement (HTTP 401)" in err


def test_too_few_gpus_and_time_scale_mismatch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with sidecar_process(tmp_path, profile=_four_stage(tmp_path), gpus=4) as sidecar:
        code, _, err = _run_cli(
            ["--node", sidecar.node_arg, "--microbatches", "2", "--pipelines", "2",
             "--job-token", JOB_TOKEN],
            capsys,
        )  # fmt: skip
        assert code == 2
        assert "2 pipelines x 4 stages need 8 GPUs; the nodes have 4" in err
        code, _, err = _run_cli(
            ["--node", sidecar.node_arg, "--microbatches", "2", "--job-token", JOB_TOKEN,
             "--time-scale", "1"],
            capsys,
        )  # fmt: skip
        assert code == 2
        assert "--time-scale 1.0 differs from the nodes' 0.1" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--node", "nowhere", "--microbatches", "2"], "expected HOST:PORT=STATE_DIR"),
        (["--node", "h:x=/s", "--microbatches", "2"], "port 'x' is not a number"),
        (["--node", "h:0=/s", "--microbatches", "2"], "port must be 1-65535"),
        (["--node", "h:1=/s", "--microbatches", "2"], "the job token is needed"),
        (
            ["--node", "h:1=/s", "--microbatches", "2", "--job-token", "t", "--straggler", "1"],
            "expected P:FACTOR[:ITER]",
        ),
        (
            ["--node", "h:1=/s", "--microbatches", "2", "--job-token", "t", "--straggler", "0:x"],
            "numbers",
        ),
        (
            ["--node", "h:1=/s", "--microbatches", "2", "--job-token", "t", "--straggler", "0:-2"],
            "FACTOR must be a positive number",
        ),
        (
            ["--node", "h:1=/s", "--microbatches", "2", "--job-token", "t", "--crash", "1:2:-1"],
            "DOWN_S must be a number >= 0",
        ),
        (
            ["--node", "h:1=/nonexistent-state", "--microbatches", "2", "--job-token", "t"],
            "no simulated GPU state in /nonexistent-state",
        ),
        (
            ["--node", "h:1=/s", "--microbatches", "0", "--job-token", "t"],
            "microbatches must be >= 1",
        ),
        (
            ["--node", "h:1=/s", "--microbatches", "2", "--job-token-file", "/no/such/file"],
            "cannot read the job token",
        ),
        (
            ["--node", "h:1=/s", "--microbatches", "2", "--job-token", "t", "--pod-ip-base", "ten"],
            "is not an IP",
        ),
    ],
)
def test_bad_arguments_are_one_line_errors(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _run_cli(args, capsys)
    assert code == 2
    assert message in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"stragglers": (Straggler(5, 1.5),)}, "straggler pipeline 5 is not one of 0..0"),
        ({"stragglers": (Straggler(0, 0.0),)}, "straggler factor must be > 0"),
        ({"crashes": (Crash(0, -1, 1.0),)}, "a crash needs"),
        ({"allreduce_s": float("nan")}, "allreduce_s"),
        ({"nodes": ()}, "at least one simulated node"),
    ],
)
def test_bad_configs(kwargs: dict[str, Any], message: str) -> None:
    base: dict[str, Any] = {
        "nodes": (NodeSpec("h", 1, Path("/s")),),
        "pipelines": 1,
        "microbatches": 2,
        "iterations": 1,
        "job_token": "t",
    }
    with pytest.raises(SimulationError, match=message):
        SimConfig(**{**base, **kwargs})


def test_unreachable_sidecar_in_standalone_mode(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with sidecar_process(tmp_path, profile=_four_stage(tmp_path), gpus=4) as sidecar:
        state_dir = sidecar.state_dir
    # The sidecar is gone, its simulated GPUs' state remains.
    code, _, err = _run_cli(
        ["--node", f"127.0.0.1:{sidecar.port}={state_dir}", "--microbatches", "2",
         "--operator-token-file", str(tmp_path / "operator.token")],
        capsys,
    )  # fmt: skip
    assert code == 2
    assert f"cannot reach the sidecar at 127.0.0.1:{sidecar.port}" in err
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{sidecar.port}/v1/healthz", timeout=0.5)


def test_pipelines_across_two_nodes(tmp_path: Path) -> None:
    """Two sidecars started at different times (different simulated epochs), one pipeline on
    each: the timeline, the energy and each sidecar's view of its own ranks agree."""
    profile_path = _four_stage(tmp_path)
    profile = load_example("gpt3-175b-a100").select_stages((0, 1, 2, 7))
    t0_s, energy_j = _all_max(profile, 4, EXAMPLES["gpt3-175b-a100"].blocking_power_w)
    first_dir, second_dir = tmp_path / "a", tmp_path / "b"
    first_dir.mkdir()
    second_dir.mkdir()
    with (
        sidecar_process(first_dir, name="n0", profile=profile_path, gpus=4) as first,
        sidecar_process(second_dir, name="n1", profile=profile_path, gpus=4) as second,
    ):
        config = SimConfig(
            nodes=tuple(NodeSpec(s.host, s.port, s.state_dir) for s in (first, second)),
            pipelines=2,
            microbatches=4,
            iterations=3,
            job_token=JOB_TOKEN,
            job="twonodes",
        )
        trainer = SimTrainer(config)
        pods = trainer.pods_by_node()
        assert [[p["name"] for p in node] for node in pods] == [
            [f"twonodes-{r}" for r in range(4)],
            [f"twonodes-{r}" for r in range(4, 8)],
        ]
        first.announce("default", "twonodes", pods[0])
        second.announce("default", "twonodes", pods[1])
        results = trainer.run()
        views = [s.timings("default", "twonodes") for s in (first, second)]
    assert [p.gpu_uuid for p in trainer.placements] == [
        *(f"GPU-sim-n0-{i}" for i in range(4)),
        *(f"GPU-sim-n1-{i}" for i in range(4)),
    ]
    assert statistics.median(r.time_s for r in results) == pytest.approx(t0_s, rel=0.02)
    assert statistics.median(r.energy_j for r in results) == pytest.approx(2 * energy_j, rel=0.02)
    for node, view in enumerate(views):
        assert [r["data_rank"] for r in view["ranks"]] == [node] * 4
        assert all(r["iterations"] == 3 for r in view["ranks"])
        assert view["pipelines"][0]["stage0_span_mean_s"] == pytest.approx(t0_s, rel=0.02)
