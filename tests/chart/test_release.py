"""The e2e helper yields a kubeconfig that is the operator's ServiceAccount, not the admin."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.chart._scripts import K8S_BIN
from tests.chart.release import install_operator_release, uninstall_operator_release

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not os.environ.get("KUBECONFIG"), reason="e2e: KUBECONFIG not set (scripts/cluster.sh)"
    ),
    pytest.mark.skipif(
        not (K8S_BIN / "helm").is_file(), reason="scripts/cluster.sh build has not run"
    ),
]


def _can_i(kubeconfig: Path, *args: str) -> str:
    done = subprocess.run(
        [str(K8S_BIN / "kubectl"), "auth", "can-i", *args],
        env={**os.environ, "KUBECONFIG": str(kubeconfig)},
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.strip()


@pytest.mark.timeout(120)
def test_operator_kubeconfig_has_exactly_the_chart_rbac(tmp_path: Path) -> None:
    admin = Path(os.environ["KUBECONFIG"])
    # A release and namespace of its own: the shared e2e cluster may hold another release.
    release = install_operator_release(
        admin, tmp_path, release="perseus-rbac-probe", namespace="perseus-rbac-probe"
    )
    try:
        assert _can_i(release.kubeconfig, "list", "pods", "-n", "default") == "yes"
        assert _can_i(release.kubeconfig, "create", "secrets", "-n", "default") == "yes"
        assert _can_i(release.kubeconfig, "delete", "pods", "-n", "default") == "no"
        assert _can_i(release.kubeconfig, "list", "secrets", "-n", "default") == "no"
        assert _can_i(admin, "delete", "pods", "-n", "default") == "yes"
    finally:
        uninstall_operator_release(admin, release)
