"""The schema validator fails on removed APIs and unknown fields, and passes valid objects."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chart._scripts import load_script

vm = load_script("validate_manifests")

DEPLOYMENT = """\
apiVersion: apps/v1
kind: Deployment
metadata: {name: ok}
spec:
  selector: {matchLabels: {a: b}}
  template:
    metadata: {labels: {a: b}}
    spec:
      containers: [{name: c, image: i%s}]
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "m.yaml"
    path.write_text(text)
    return path


def test_a_valid_object_passes(tmp_path: Path) -> None:
    assert vm.validate_file(_write(tmp_path, DEPLOYMENT % ""), "1.37.0") == []


def test_an_unknown_field_fails(tmp_path: Path) -> None:
    errors = vm.validate_file(_write(tmp_path, DEPLOYMENT % ", bogus: 1"), "1.37.0")
    assert len(errors) == 1 and "bogus" in errors[0]


def test_an_api_newer_clusters_removed_fails(tmp_path: Path) -> None:
    psp = "apiVersion: policy/v1beta1\nkind: PodSecurityPolicy\nmetadata: {name: x}\nspec: {}\n"
    errors = vm.validate_file(_write(tmp_path, psp), "1.37.0")
    assert len(errors) == 1 and "PodSecurityPolicy" in errors[0]


def test_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert vm.main([str(_write(tmp_path, DEPLOYMENT % ""))]) == 0
    assert vm.main([str(_write(tmp_path, DEPLOYMENT % ", bogus: 1"))]) == 1
    assert vm.main([str(tmp_path / "missing.yaml")]) == 2
    assert "INVALID" in capsys.readouterr().err
