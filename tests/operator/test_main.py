"""`perseus-operator` refuses bad settings with one line and exit code 2, before starting kopf."""

from __future__ import annotations

from pathlib import Path

import pytest

from perseus_operator.main import main


def test_missing_token_is_a_one_line_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("PERSEUS_OPERATOR_TOKEN_FILE", raising=False)
    monkeypatch.delenv("PERSEUS_OPERATOR_TOKEN", raising=False)
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("perseus-operator: error: set PERSEUS_OPERATOR_TOKEN_FILE")
    assert err.count("\n") == 1


def test_unreadable_token_file_and_bad_selector(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("PERSEUS_OPERATOR_TOKEN_FILE", raising=False)  # main() sets it: restore
    assert main(["--token-file", str(tmp_path / "missing")]) == 2
    assert "No such file" in capsys.readouterr().err
    token = tmp_path / "token"
    token.write_text("t\n")
    monkeypatch.setenv("PERSEUS_OPERATOR_SIDECAR_SELECTOR", "app.kubernetes.io/component")
    assert main(["--token-file", str(token)]) == 2
    assert "sidecar selector must be k=v" in capsys.readouterr().err
