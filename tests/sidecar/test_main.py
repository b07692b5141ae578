"""The entry point: env settings, flags over them, one-line errors with exit 2, JSON logs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from perseus_sidecar.main import JsonFormatter, main, settings_from_args


def test_flags_as_written_and_env_prefix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PERSEUS_SIDECAR_PORT", "9000")
    monkeypatch.setenv("PERSEUS_SIDECAR_NODE_NAME", "from-env")
    monkeypatch.setenv("PERSEUS_SIDECAR_RANK_TIMEOUT_S", "7.5")
    s = settings_from_args(
        [
            "--gpu-backend", "simulated", "--profile", "p.csv", "--gpus", "8",
            "--host", "127.0.0.1", "--port", "8080", "--token-file", "tok",
            "--event-port", "9001", "--state-dir", str(tmp_path), "--time-scale", "0.1",
            "--sim-blocking-power-w", "70", "--sim-perturbation", "0.03", "--sim-seed", "4",
            "--sim-energy-update-s", "0.02",
        ]
    )  # fmt: skip
    assert s.port == 8080  # the flag wins over the environment
    assert s.node_name == "from-env"
    assert s.rank_timeout_s == 7.5
    assert (s.gpu_backend, s.gpus, s.host, s.event_port) == ("simulated", 8, "127.0.0.1", 9001)
    assert s.profile == Path("p.csv") and s.token_file == Path("tok")
    assert (s.time_scale, s.sim_blocking_power_w, s.sim_perturbation, s.sim_seed) == (
        0.1,
        70.0,
        0.03,
        4,
    )
    assert s.sim_energy_update_s == 0.02
    assert settings_from_args(["--gpu-backend", "simulated", "--example", "x"]).example == "x"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--gpu-backend", "simulated"], "exactly one of profile or example"),
        (["--time-scale", "-1"], "time_scale"),
        (["--time-scale", "nan"], "time_scale"),
        (["--port", "70000"], "port"),
        (["--gpu-backend", "nvml"], "no operator token"),
        (["--gpu-backend", "nvml", "--token-file", "/nonexistent/token"], "cannot read token file"),
        (
            ["--gpu-backend", "simulated", "--example", "nope", "--token-file", "{token}"],
            "unknown example",
        ),
        (
            [
                "--gpu-backend",
                "simulated",
                "--profile",
                "/nonexistent.csv",
                "--token-file",
                "{token}",
            ],
            "cannot load",
        ),
    ],
)
def test_bad_settings_are_one_line_exit_2(
    argv: list[str],
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    token = tmp_path / "token"
    token.write_text("t" * 32)
    argv = [a.replace("{token}", str(token)) for a in argv]
    assert main([*argv, "--state-dir", str(tmp_path / "state")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err
    assert len(err.splitlines()) == 1
    assert err.startswith("perseus-sidecar: error: ")  # as `perseus` and `perseus-operator` say


def test_short_token_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    token = tmp_path / "token"
    token.write_text("short")
    argv = ["--gpu-backend", "nvml", "--token-file", str(token), "--state-dir", str(tmp_path)]
    assert main(argv) == 2
    assert "at least 16 characters" in capsys.readouterr().err


def test_json_log_lines_carry_extra_fields() -> None:
    record = logging.makeLogRecord(
        {"name": "perseus", "levelname": "INFO", "msg": "reset %s", "args": ("x",), "gpu": "G0"}
    )
    line = json.loads(JsonFormatter().format(record))
    assert line["msg"] == "reset x" and line["gpu"] == "G0" and line["level"] == "info"
