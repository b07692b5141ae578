"""`perseus-operator` refuses bad settings with one line and exit code 2, before starting kopf."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from perseus_operator.main import build_parser, flag_overrides, main
from perseus_operator.settings import Settings


def test_missing_token_is_a_one_line_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("PERSEUS_OPERATOR_TOKEN_FILE", raising=False)
    monkeypatch.delenv("PERSEUS_OPERATOR_TOKEN", raising=False)
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("perseus-operator: error: no operator token: pass --token-file FILE")
    assert "PERSEUS_OPERATOR_TOKEN_FILE" in err and err.count("\n") == 1


def test_unreadable_token_file_and_bad_selector(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("PERSEUS_OPERATOR_TOKEN_FILE", raising=False)
    assert main(["--token-file", str(tmp_path / "missing")]) == 2
    assert "No such file" in capsys.readouterr().err
    token = tmp_path / "token"
    token.write_text("t\n")
    monkeypatch.setenv("PERSEUS_OPERATOR_SIDECAR_SELECTOR", "app.kubernetes.io/component")
    assert main(["--token-file", str(token)]) == 2
    assert "sidecar selector must be k=v" in capsys.readouterr().err


def test_flags_are_read_once_into_the_settings_never_into_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The flags override the environment in the one `Settings` built, and leave
    `os.environ` as it was."""
    monkeypatch.setenv("PERSEUS_OPERATOR_TICK_S", "2.0")
    monkeypatch.delenv("PERSEUS_OPERATOR_TOKEN_FILE", raising=False)
    token = tmp_path / "token"
    token.write_text("t\n")
    args = build_parser().parse_args(["--token-file", str(token), "--tick-s", "0.25", "-n", "a"])
    settings = Settings(**flag_overrides(args))
    assert (settings.tick_s, settings.namespace_list()) == (0.25, ["a"])
    assert settings.operator_token() == "t"
    assert "PERSEUS_OPERATOR_TOKEN_FILE" not in os.environ
    assert os.environ["PERSEUS_OPERATOR_TICK_S"] == "2.0"


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--tick-s", "0"], {}, "perseus-operator: error: tick_s: Input should be greater than 0"),
        (
            [],
            {"PERSEUS_OPERATOR_SIDECAR_PORT": "70000", "PERSEUS_OPERATOR_CLEANUP_ATTEMPTS": "0"},
            "perseus-operator: error: sidecar_port: Input should be less than or equal to 65535"
            " (and 1 more)",
        ),
    ],
)
def test_bad_settings_are_one_line_in_plain_words(
    argv: list[str],
    env: dict[str, str],
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    token = tmp_path / "token"
    token.write_text("t\n")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert main(["--token-file", str(token), *argv]) == 2
    assert capsys.readouterr().err == message + "\n"
