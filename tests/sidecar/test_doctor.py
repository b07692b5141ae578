"""`perseus-sidecar doctor` against pynvml mocked with autospec: its report, its JSON, the energy
counter period measurement under a fake clock, its one-line errors, and that it only reads."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from typing import Any
from unittest import mock

import pynvml
import pytest

from perseus_sidecar import doctor
from perseus_sidecar import main as sidecar_main
from perseus_sidecar.doctor import clock_steps_mhz, measure_counter_period
from perseus_sidecar.gpu import nvml as nvml_module

UUIDS = ["GPU-h100", "GPU-mig"]
# H100-like: 1980 down to 345 MHz in 15 MHz steps, plus one odd step at the bottom.
H100_CLOCKS = [*range(1980, 344, -15), 210]
READ_ONLY = re.compile(r"nvml(Init|Shutdown|SystemGet\w+|DeviceGet\w+)")


class FakeClock:
    """Time that advances by `step_s` at every reading, like a tight polling loop."""

    def __init__(self, step_s: float = 0.001) -> None:
        self.t_s = 0.0
        self.step_s = step_s

    def __call__(self) -> float:
        self.t_s += self.step_s
        return self.t_s


class StepCounter:
    """An energy counter that jumps at the given times (in the fake clock's seconds)."""

    def __init__(self, clock: FakeClock, updates: list[tuple[float, int]]) -> None:
        self.clock = clock
        self.updates = updates

    def __call__(self, *_: object) -> int:
        return sum(mj for at_s, mj in self.updates if at_s <= self.clock.t_s)


def _err(code: int) -> pynvml.NVMLError:
    return pynvml.NVMLError(code)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def nv(clock: FakeClock) -> Iterator[Any]:
    """Two GPUs: 0 an idle H100 whose counter adds 7,000 mJ every 100 ms; 1 MIG-enabled."""
    fake = mock.create_autospec(pynvml, spec_set=False)
    fake.NVMLError = pynvml.NVMLError
    for name in dir(pynvml):
        if name.startswith("NVML_") and isinstance(getattr(pynvml, name), int):
            setattr(fake, name, getattr(pynvml, name))
    handles = [object(), object()]
    fake.nvmlDeviceGetCount.return_value = 2
    fake.nvmlDeviceGetHandleByIndex.side_effect = lambda i: handles[i]
    fake.nvmlDeviceGetHandleByUUID.side_effect = lambda u: handles[UUIDS.index(u)]
    fake.nvmlDeviceGetUUID.side_effect = lambda h: UUIDS[handles.index(h)]
    fake.nvmlDeviceGetName.return_value = b"NVIDIA H100 80GB HBM3"
    fake.nvmlSystemGetDriverVersion.return_value = b"580.159.04"
    fake.nvmlDeviceGetMigMode.side_effect = lambda h: (
        (pynvml.NVML_DEVICE_MIG_ENABLE,) * 2
        if handles.index(h) == 1
        else (pynvml.NVML_DEVICE_MIG_DISABLE,) * 2
    )
    fake.nvmlDeviceGetMPSComputeRunningProcesses.return_value = []
    fake.nvmlDeviceGetSupportedMemoryClocks.return_value = [2619]
    fake.nvmlDeviceGetSupportedGraphicsClocks.return_value = H100_CLOCKS
    fake.nvmlDeviceGetClockInfo.side_effect = lambda h, kind: (
        345 if kind == pynvml.NVML_CLOCK_SM else 2619
    )
    fake.nvmlDeviceGetMaxClockInfo.return_value = 1980
    fake.nvmlDeviceGetCurrentClocksEventReasons.return_value = 0x1
    fake.nvmlDeviceGetPowerUsage.return_value = 70_250
    fake.nvmlDeviceGetEnforcedPowerLimit.return_value = 700_000
    fake.nvmlDeviceGetTotalEnergyConsumption.side_effect = StepCounter(
        clock, [(0.0, 1_000_000)] + [(0.05 + 0.1 * k, 7_000) for k in range(100)]
    )
    with mock.patch.object(nvml_module, "pynvml", fake):
        yield fake


def _assert_read_only(fake: Any) -> None:
    called = {call[0].split(".")[0] for call in fake.mock_calls if call[0]}
    assert called, "the doctor queried nothing"
    assert all(READ_ONLY.fullmatch(name) for name in called), called
    fake.nvmlDeviceSetGpuLockedClocks.assert_not_called()
    fake.nvmlDeviceResetGpuLockedClocks.assert_not_called()


# ---- the counter period measurement -----------------------------------------------------------


def test_regular_counter_period_and_increments(clock: FakeClock) -> None:
    counter = StepCounter(clock, [(0.0, 500)] + [(0.0205 + 0.1 * k, 7_000) for k in range(30)])
    period = measure_counter_period(counter, duration_s=1.0, now_s=clock)
    assert period.updates == 10  # at 20.5, 120.5, ..., 920.5 ms
    assert period.interval_ms is not None and period.increment_mj is not None
    assert period.interval_ms.median == pytest.approx(100.0, abs=1.01)
    assert period.interval_ms.min >= 99.0 and period.interval_ms.max <= 101.0
    assert (period.increment_mj.median, period.increment_mj.min, period.increment_mj.max) == (
        7_000,
        7_000,
        7_000,
    )
    assert period.counter_power_w == pytest.approx(70.0, rel=0.02)
    # One read and one clock reading per loop turn, each advancing the fake clock 1 ms.
    assert period.reads == pytest.approx(1000, abs=2)
    assert period.read_us == pytest.approx(1000.0, rel=0.01)


def test_irregular_updates_report_their_spread(clock: FakeClock) -> None:
    counter = StepCounter(clock, [(0.02, 100), (0.07, 300), (0.2, 250), (0.22, 50)])
    period = measure_counter_period(counter, duration_s=0.5, now_s=clock)
    assert period.updates == 4
    assert period.interval_ms is not None and period.increment_mj is not None
    assert period.interval_ms.min == pytest.approx(20.0, abs=1.01)
    assert period.interval_ms.max == pytest.approx(130.0, abs=1.01)
    assert period.interval_ms.median == pytest.approx(50.0, abs=1.01)
    assert (period.increment_mj.min, period.increment_mj.max) == (50, 300)


def test_a_counter_that_never_changes_has_no_period(clock: FakeClock) -> None:
    period = measure_counter_period(lambda: 42, duration_s=0.1, now_s=clock)
    assert (period.updates, period.interval_ms, period.increment_mj) == (0, None, None)
    assert period.counter_power_w is None


def test_one_change_gives_an_increment_but_no_period(clock: FakeClock) -> None:
    period = measure_counter_period(StepCounter(clock, [(0.03, 9)]), 0.1, clock)
    assert period.updates == 1 and period.interval_ms is None
    assert period.increment_mj is not None and period.increment_mj.median == 9


def test_clock_steps() -> None:
    assert clock_steps_mhz(H100_CLOCKS) == {15: 109, 135: 1}
    assert clock_steps_mhz([1410, 1395, 1395, 1380]) == {15: 2}
    assert clock_steps_mhz([1980]) == {}


# ---- the report -------------------------------------------------------------------------------


def test_text_report(nv: Any, clock: FakeClock, capsys: pytest.CaptureFixture[str]) -> None:
    assert doctor.main(["--energy-s", "2"], now_s=clock) == 1  # the MIG GPU is unusable
    out = capsys.readouterr().out
    assert out.startswith("NVIDIA driver 580.159.04; 2 GPUs visible\n")
    assert "GPU 0  NVIDIA H100 80GB HBM3  GPU-h100\n  usable: yes\n  MIG: disabled\n" in out
    assert "supported SM clocks: 111, 210-1980 MHz, steps 15 MHz x109, 135 MHz x1" in out
    assert "supported memory clocks: 2619 MHz" in out
    assert "current clocks: SM 345 MHz, memory 2619 MHz; max rated SM 1980 MHz" in out
    assert "clock event reasons: idle" in out
    assert "power: 70.2 W (enforced limit 700 W)" in out
    assert re.search(r"energy counter: updates every 100\.\d ms median .*\+7000 mJ median", out)
    assert "usable: NO - MIG is enabled" in out and "MIG: enabled" in out
    _assert_read_only(nv)
    nv.nvmlShutdown.assert_called_once_with()


def test_json_report(nv: Any, clock: FakeClock, capsys: pytest.CaptureFixture[str]) -> None:
    doctor.main(["--json", "--energy-s", "1"], now_s=clock)
    report = json.loads(capsys.readouterr().out)
    assert report["driver_version"] == "580.159.04" and report["all_usable"] is False
    h100, mig = report["gpus"]
    assert (h100["uuid"], h100["usable"], h100["mig_enabled"]) == ("GPU-h100", True, False)
    assert h100["sm_clocks"]["count"] == 111
    assert (h100["sm_clocks"]["min_mhz"], h100["sm_clocks"]["max_mhz"]) == (210, 1980)
    assert h100["sm_clocks"]["steps_mhz"] == {"15": 109, "135": 1}
    assert h100["sm_clocks"]["values_mhz"][:2] == [1980, 1965]
    assert h100["memory_clocks_mhz"] == [2619]
    assert h100["power_w"] == pytest.approx(70.25) and h100["power_limit_w"] == 700.0
    assert h100["clock_event_reasons"] == ["idle"]
    energy = h100["energy_counter"]
    assert energy["interval_ms"]["median"] == pytest.approx(100.0, abs=1.01)
    assert energy["increment_mj"]["median"] == 7_000 and energy["updates"] >= 9
    assert h100["errors"] == {}
    assert (mig["usable"], mig["mig_enabled"]) == (False, True)
    assert "MIG" in mig["reason"]
    _assert_read_only(nv)


def test_unsupported_readings_are_reported_not_fatal(
    nv: Any, clock: FakeClock, capsys: pytest.CaptureFixture[str]
) -> None:
    nv.nvmlDeviceGetCount.return_value = 1
    nv.nvmlDeviceGetMigMode.side_effect = _err(pynvml.NVML_ERROR_NOT_SUPPORTED)
    nv.nvmlDeviceGetTotalEnergyConsumption.side_effect = _err(pynvml.NVML_ERROR_NOT_SUPPORTED)
    nv.nvmlDeviceGetEnforcedPowerLimit.side_effect = _err(pynvml.NVML_ERROR_NO_PERMISSION)
    assert doctor.main(["--energy-s", "0.1"], now_s=clock) == 0
    out = capsys.readouterr().out
    assert "MIG: n/a (reading MIG mode on GPU GPU-h100: Not Supported)" in out
    assert "energy counter: n/a (reading energy on GPU GPU-h100: Not Supported)" in out
    assert "enforced limit n/a" in out


def test_energy_can_be_skipped(nv: Any, capsys: pytest.CaptureFixture[str]) -> None:
    doctor.main(["--json", "--energy-s", "0"])
    assert json.loads(capsys.readouterr().out)["gpus"][0]["energy_counter"] is None
    nv.nvmlDeviceGetTotalEnergyConsumption.assert_not_called()


def test_no_gpus_exit_1(nv: Any, capsys: pytest.CaptureFixture[str]) -> None:
    nv.nvmlDeviceGetCount.return_value = 0
    assert doctor.main(["--energy-s", "0"]) == 1
    assert "no GPU visible" in capsys.readouterr().out


def test_the_console_script_dispatches_doctor(nv: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert sidecar_main.main(["doctor", "--json", "--energy-s", "0"]) == 1
    assert json.loads(capsys.readouterr().out)["gpus"][0]["uuid"] == "GPU-h100"


# ---- errors: one line, exit 2 -----------------------------------------------------------------


def test_no_driver_is_one_line_exit_2(nv: Any, capsys: pytest.CaptureFixture[str]) -> None:
    nv.nvmlInit.side_effect = _err(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
    assert sidecar_main.main(["doctor"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("perseus-sidecar doctor: error: NVML is unavailable")
    assert "Shared Library Not Found" in lines[0]


def test_missing_bindings_is_one_line_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "perseus_sidecar.gpu.nvml", None)  # import raises
    assert doctor.main([]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines == [lines[0]] and lines[0].startswith("perseus-sidecar doctor: error: ")
    assert "NVML bindings are missing" in lines[0]


@pytest.mark.parametrize("how", ["flag", "env"])
def test_time_sliced_like_the_sidecar(
    nv: Any, how: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--energy-s", "0"]
    if how == "flag":
        argv.append("--time-sliced")
    else:
        monkeypatch.setenv("PERSEUS_SIDECAR_TIME_SLICED", "True")
    nv.nvmlDeviceGetCount.return_value = 1
    assert doctor.main(argv) == 1
    assert "usable: NO - the node shares GPUs by time slicing" in capsys.readouterr().out


def test_time_sliced_env_false_and_bad(
    nv: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    nv.nvmlDeviceGetCount.return_value = 1
    monkeypatch.setenv("PERSEUS_SIDECAR_TIME_SLICED", "false")
    assert doctor.main(["--energy-s", "0"]) == 0
    monkeypatch.setenv("PERSEUS_SIDECAR_TIME_SLICED", "maybe")
    capsys.readouterr()
    assert doctor.main(["--energy-s", "0"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "perseus-sidecar doctor: error: "
        "PERSEUS_SIDECAR_TIME_SLICED must be true or false, got 'maybe'"
    ]
    nv.nvmlInit.assert_called_once()  # the bad value stopped the second run before NVML


@pytest.mark.parametrize("value", ["-1", "61", "soon"])
def test_bad_energy_seconds(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        doctor.main(["--energy-s", value])
    assert info.value.code == 2
    assert "--energy-s" in capsys.readouterr().err
