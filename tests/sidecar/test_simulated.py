"""The simulated GPU: clocks from the profile, driver state in files shared across processes,
an energy counter that is piecewise linear in simulated time and updates only every interval."""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
import time
from pathlib import Path

import pytest

from perseus_profiles import StageProfile, load_example, parse_profile_csv
from perseus_sidecar.gpu.base import GpuError, GpuNotFoundError, GpuNotSupportedError
from perseus_sidecar.gpu.simnode import NODE_FILE, open_node, perturbed_profile, simulated_uuid
from perseus_sidecar.gpu.simulated import SimulatedBackend

PROFILE_CSV = """stage,instruction,frequency,time,energy
0,forward,1000,0.1,20
0,forward,800,0.125,18
0,backward,1000,0.2,40
0,backward,800,0.25,36
1,forward,1000,0.15,30
1,forward,800,0.2,27
1,backward,1000,0.3,60
1,backward,800,0.35,54
"""


@pytest.fixture
def profile() -> StageProfile:
    return parse_profile_csv(PROFILE_CSV)


def _backend(profile: StageProfile, state_dir: Path, **kwargs: object) -> SimulatedBackend:
    kwargs.setdefault("blocking_power_w", 50.0)
    return SimulatedBackend(profile, 2, state_dir, node_name="n1", **kwargs)  # type: ignore[arg-type]


def test_inventory_uses_the_profile_clocks(profile: StageProfile, tmp_path: Path) -> None:
    backend = _backend(profile, tmp_path)
    gpus = backend.list_gpus()
    assert [g.uuid for g in gpus] == ["GPU-sim-n1-0", "GPU-sim-n1-1"]
    assert [g.index for g in gpus] == [0, 1]
    assert all(g.supported_sm_clocks_mhz == (1000, 800) for g in gpus)
    assert all(g.usable for g in gpus)
    assert simulated_uuid("n1", 1) == "GPU-sim-n1-1"


def test_zero_gpus_is_an_empty_inventory(profile: StageProfile, tmp_path: Path) -> None:
    assert SimulatedBackend(profile, 0, tmp_path).list_gpus() == []


def test_unlocked_gpus_run_at_max_clock(profile: StageProfile, tmp_path: Path) -> None:
    backend = _backend(profile, tmp_path)
    uuid = "GPU-sim-n1-0"
    assert backend.locked_sm_clock_mhz(uuid) is None
    assert backend.current_sm_clock_mhz(uuid) == 1000
    backend.set_locked_sm_clock(uuid, 800)
    assert backend.locked_sm_clock_mhz(uuid) == 800
    assert backend.current_sm_clock_mhz(uuid) == 800
    assert backend.locked_sm_clock_mhz("GPU-sim-n1-1") is None
    backend.reset_locked_clocks(uuid)
    assert backend.locked_sm_clock_mhz(uuid) is None
    assert backend.current_sm_clock_mhz(uuid) == 1000


def test_bad_clock_and_unknown_gpu_are_typed_errors(profile: StageProfile, tmp_path: Path) -> None:
    backend = _backend(profile, tmp_path)
    with pytest.raises(GpuNotSupportedError, match="900 MHz is not a supported clock"):
        backend.set_locked_sm_clock("GPU-sim-n1-0", 900)
    for call in (
        lambda: backend.set_locked_sm_clock("GPU-nope", 800),
        lambda: backend.reset_locked_clocks("GPU-nope"),
        lambda: backend.locked_sm_clock_mhz("GPU-nope"),
        lambda: backend.total_energy_mj("GPU-nope"),
        lambda: backend.current_sm_clock_mhz("GPU-nope"),
        lambda: backend.power_w("GPU-nope"),
    ):
        with pytest.raises(GpuNotFoundError, match="no simulated GPU 'GPU-nope'"):
            call()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"node_name": "bad name"}, "node name"),
        ({"node_name": ""}, "node name"),
        ({"time_scale": 0.0}, "time scale"),
        ({"time_scale": float("nan")}, "time scale"),
        ({"energy_update_interval_s": -1.0}, "energy update interval"),
        ({"blocking_power_w": float("inf")}, "blocking power"),
        ({"blocking_power_w": -1.0}, "blocking power"),
        ({"perturbation": 1.0}, "perturbation"),
        ({"perturbation": -0.1}, "perturbation"),
    ],
)
def test_bad_settings_are_value_errors(
    profile: StageProfile, tmp_path: Path, kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        SimulatedBackend(profile, 1, tmp_path, **kwargs)  # type: ignore[arg-type]


def test_negative_gpu_count_is_rejected(profile: StageProfile, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="number of simulated GPUs"):
        SimulatedBackend(profile, -1, tmp_path)


def test_unusable_state_dir_is_a_gpu_error(profile: StageProfile, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(GpuError, match="cannot use simulated GPU state dir"):
        SimulatedBackend(profile, 1, blocker / "sub")


def test_corrupt_node_file_is_a_gpu_error(profile: StageProfile, tmp_path: Path) -> None:
    (tmp_path / NODE_FILE).write_text("{not json")
    with pytest.raises(GpuError, match="unreadable"):
        SimulatedBackend(profile, 1, tmp_path)


def test_clock_lock_survives_the_process(profile: StageProfile, tmp_path: Path) -> None:
    """A killed sidecar's locks stay in the driver state; a new backend sees them."""
    code = (
        "import sys; from pathlib import Path;"
        "from perseus_profiles import parse_profile_csv;"
        "from perseus_sidecar.gpu.simulated import SimulatedBackend;"
        "b = SimulatedBackend(parse_profile_csv(sys.stdin.read()), 2, Path(sys.argv[1]),"
        " node_name='n1');"
        "b.set_locked_sm_clock('GPU-sim-n1-1', 800);"
        "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], input=PROFILE_CSV, text=True, check=False
    )
    assert proc.returncode == -9
    backend = _backend(profile, tmp_path)
    assert backend.locked_sm_clock_mhz("GPU-sim-n1-1") == 800
    assert backend.locked_sm_clock_mhz("GPU-sim-n1-0") is None


def test_lock_is_visible_to_another_attached_reader(profile: StageProfile, tmp_path: Path) -> None:
    backend = _backend(profile, tmp_path)
    _, _, gpus = open_node(tmp_path)
    assert gpus[0].effective_clock_mhz() == 1000
    backend.set_locked_sm_clock("GPU-sim-n1-0", 800)
    assert gpus[0].locked_sm_clock_mhz() == 800
    assert gpus[0].effective_clock_mhz() == 800
    backend.reset_locked_clocks("GPU-sim-n1-0")
    assert gpus[0].effective_clock_mhz() == 1000


def test_open_node_without_a_sidecar_explains(tmp_path: Path) -> None:
    with pytest.raises(GpuError, match="start perseus-sidecar --gpu-backend simulated"):
        open_node(tmp_path)


def test_open_node_reads_the_ground_truth(profile: StageProfile, tmp_path: Path) -> None:
    _backend(profile, tmp_path, perturbation=0.03, seed=7, time_scale=0.5)
    settings, truth, gpus = open_node(tmp_path)
    assert settings.time_scale == 0.5
    assert settings.blocking_power_w == 50.0
    assert [g.uuid for g in gpus] == ["GPU-sim-n1-0", "GPU-sim-n1-1"]
    assert truth == perturbed_profile(profile, 0.03, 7)
    assert truth != profile


def test_energy_curve_is_piecewise_linear(profile: StageProfile, tmp_path: Path) -> None:
    backend = _backend(profile, tmp_path)
    gpu = backend.gpu("GPU-sim-n1-0")
    start = gpu.energy_j(0.0)  # curve starts at 0 J at creation
    t0 = 100.0
    base = gpu.energy_j(t0)
    assert base == pytest.approx(start + 50.0 * t0, rel=1e-3)  # idle: blocking power
    gpu.record_work(t0, 0.2, 40.0)
    assert gpu.energy_j(t0 + 0.1) == pytest.approx(base + 20.0)
    assert gpu.energy_j(t0 + 0.2) == pytest.approx(base + 40.0)
    assert gpu.energy_j(t0 + 1.2) == pytest.approx(base + 40.0 + 50.0)
    assert gpu.power_w(t0 + 0.1) == pytest.approx(200.0)
    assert gpu.power_w(t0 + 0.5) == pytest.approx(50.0)
    # The clock changed midway: re-record from the change on.
    gpu.record_work(t0 + 0.1, 0.125, 18.0)
    assert gpu.energy_j(t0 + 0.225) == pytest.approx(base + 20.0 + 18.0)
    with pytest.raises(ValueError, match="duration"):
        gpu.record_work(t0, float("nan"), 1.0)
    with pytest.raises(ValueError, match="energy"):
        gpu.record_work(t0, 1.0, -1.0)


def test_counter_updates_only_every_interval(profile: StageProfile, tmp_path: Path) -> None:
    backend = _backend(profile, tmp_path, energy_update_interval_s=0.1)
    gpu = backend.gpu("GPU-sim-n1-1")
    t0 = 50.0
    gpu.record_work(t0, 1.0, 300.0)  # 300 W for one second
    seen = {round(gpu.counter_energy_j(t0 + k * 0.01), 6) for k in range(100)}
    assert 9 <= len(seen) <= 11  # ~10 distinct values in one second
    for k in range(100):
        t = t0 + k * 0.01
        assert gpu.energy_j(t - 0.1) - 1e-9 <= gpu.counter_energy_j(t) <= gpu.energy_j(t) + 1e-9


def test_reported_counter_is_millijoules_and_monotonic(
    profile: StageProfile, tmp_path: Path
) -> None:
    backend = _backend(profile, tmp_path, time_scale=0.01, energy_update_interval_s=0.01)
    uuid = "GPU-sim-n1-0"
    first = backend.total_energy_mj(uuid)
    deadline = time.monotonic() + 2.0
    while backend.total_energy_mj(uuid) == first and time.monotonic() < deadline:
        time.sleep(0.001)
    second = backend.total_energy_mj(uuid)
    assert second > first
    # 50 W idle, 100 simulated s per wall s: tens of joules per wall tenth of a second.
    assert isinstance(second, int)
    assert backend.power_w(uuid) == pytest.approx(50.0)


def test_restart_with_same_settings_keeps_the_epoch(profile: StageProfile, tmp_path: Path) -> None:
    first = _backend(profile, tmp_path, time_scale=0.2)
    gpu = first.gpu("GPU-sim-n1-0")
    now = first.settings.now_s()
    gpu.record_work(now, 5.0, 1000.0)
    second = _backend(profile, tmp_path, time_scale=0.2)
    assert second.settings.epoch_wall_s == first.settings.epoch_wall_s
    assert second.gpu("GPU-sim-n1-0").energy_j(now + 5.0) == pytest.approx(gpu.energy_j(now + 5.0))


def test_restart_with_new_time_scale_carries_the_counter(
    profile: StageProfile, tmp_path: Path
) -> None:
    first = _backend(profile, tmp_path, time_scale=0.2)
    gpu = first.gpu("GPU-sim-n1-0")
    gpu.record_work(first.settings.now_s() - 10.0, 1.0, 1000.0)
    before = gpu.energy_j(first.settings.now_s())
    second = _backend(profile, tmp_path, time_scale=1.0)
    assert second.settings.time_scale == 1.0
    assert second.settings.epoch_wall_s > first.settings.epoch_wall_s
    after = second.gpu("GPU-sim-n1-0").energy_j(second.settings.now_s())
    assert before <= after < before + 5.0
    assert json.loads((tmp_path / NODE_FILE).read_text())["time_scale"] == 1.0


def test_perturbation_is_deterministic_and_bounded() -> None:
    profile = load_example("gpt3-175b-a100")
    assert perturbed_profile(profile, 0.0, 3) is profile
    a = perturbed_profile(profile, 0.03, 3)
    assert a == perturbed_profile(profile, 0.03, 3)
    assert a != perturbed_profile(profile, 0.03, 4)
    assert a.frequencies_mhz == profile.frequencies_mhz
    for s in range(profile.num_stages):
        for instr in ("forward", "backward"):
            for m0, m1 in zip(
                profile.instruction_options(s, instr), a.instruction_options(s, instr), strict=True
            ):
                assert 0.97 <= m1.time_s / m0.time_s <= 1.03
                assert 0.97 <= m1.energy_j / m0.energy_j <= 1.03
    # Identical stages of the real profile become distinct.
    assert a.options[0] != a.options[1]


def _hammer_clock(state_dir: str, rounds: int) -> None:
    _, _, gpus = open_node(state_dir)
    for k in range(rounds):
        gpus[0].set_locked_sm_clock(800 if k % 2 else 1000)


def _hammer_energy(state_dir: str, rounds: int) -> None:
    _, _, gpus = open_node(state_dir)
    for k in range(rounds):
        gpus[0].record_work(1000.0 + k, 0.5, 10.0)


def test_concurrent_writers_never_corrupt_the_state(profile: StageProfile, tmp_path: Path) -> None:
    """Two processes write clock and energy while this one reads: every read parses."""
    backend = _backend(profile, tmp_path)
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_hammer_clock, args=(str(tmp_path), 300)),
        ctx.Process(target=_hammer_clock, args=(str(tmp_path), 300)),
        ctx.Process(target=_hammer_energy, args=(str(tmp_path), 300)),
    ]
    for p in procs:
        p.start()
    uuid = "GPU-sim-n1-0"
    while any(p.is_alive() for p in procs):
        assert backend.locked_sm_clock_mhz(uuid) in (None, 800, 1000)
        backend.total_energy_mj(uuid)
    for p in procs:
        p.join()
        assert p.exitcode == 0
    gpu = backend.gpu(uuid)
    assert gpu.energy_j(1299.5) - gpu.energy_j(1299.0) == pytest.approx(10.0)
    assert not list(tmp_path.glob("*.tmp")) + list(tmp_path.glob(".*.tmp"))


def test_a_writer_dying_mid_write_does_not_wedge_readers(
    profile: StageProfile, tmp_path: Path
) -> None:
    """A process killed between its two sequence bumps leaves the sequence odd: readers fall
    back to the writers' lock instead of spinning forever, and the next write heals it."""
    backend = _backend(profile, tmp_path)
    uuid = "GPU-sim-n1-0"
    backend.set_locked_sm_clock(uuid, 800)
    path = tmp_path / "gpu-0.clock"
    raw = bytearray(path.read_bytes())
    raw[8] |= 1  # the sequence number (little-endian u64 at offset 8) becomes odd
    path.write_bytes(bytes(raw))
    _, _, gpus = open_node(tmp_path)
    assert gpus[0].locked_sm_clock_mhz() == 800
    backend.set_locked_sm_clock(uuid, 1000)
    assert gpus[0].locked_sm_clock_mhz() == 1000
    assert int.from_bytes(path.read_bytes()[8:16], "little") % 2 == 0


def test_a_foreign_file_is_reinitialised(profile: StageProfile, tmp_path: Path) -> None:
    (tmp_path / "gpu-0.clock").write_text("1410\n")  # not a simulated-GPU record
    backend = _backend(profile, tmp_path)
    assert backend.locked_sm_clock_mhz("GPU-sim-n1-0") is None
    backend.set_locked_sm_clock("GPU-sim-n1-0", 800)
    assert backend.locked_sm_clock_mhz("GPU-sim-n1-0") == 800
    backend.close()
