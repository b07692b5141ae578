"""Runs scripts/chart-check.sh: lint, strict schema validation, server dry-run on 1.20,
install/upgrade/uninstall, the operator ServiceAccount's RBAC, and the operator itself running
under that ServiceAccount's token (a missing permission fails this test)."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.chart._scripts import K8S_BIN, ROOT

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not os.environ.get("KUBECONFIG"), reason="e2e: KUBECONFIG not set (scripts/cluster.sh)"
    ),
    pytest.mark.skipif(
        not (K8S_BIN / "helm").is_file(), reason="scripts/cluster.sh build has not run"
    ),
]

STAGES = (
    "generator --check",
    "helm lint --strict",
    "validates strictly against Kubernetes",
    "server-side dry run",
    "helm install creates",
    "the operator's ServiceAccount token may do",
    "perseus-operator under the ServiceAccount token",
    "helm upgrade applies a changed value",
    "helm uninstall removes",
    "adopts the kept CRD",
)


@pytest.mark.timeout(240)
def test_chart_check_passes_every_stage() -> None:
    # chart-check starts its own control plane: it installs and deletes the cluster-wide CRD,
    # which must not disturb the shared e2e cluster.
    env = {k: v for k, v in os.environ.items() if k != "CHART_CHECK_KUBECONFIG"}
    done = subprocess.run(
        [str(ROOT / "scripts" / "chart-check.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=230,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    ok_lines = [line for line in done.stdout.splitlines() if line.startswith("ok: ")]
    for stage in STAGES:
        assert any(stage in line for line in ok_lines), f"stage not reported: {stage}\n{output}"
