"""Run the operator in e2e tests with the chart's RBAC instead of the admin credential.

`install_operator_release` helm-installs the chart into the test cluster without the CRD (the
e2e suite applies crds/energypolicy.yaml itself) and without the sidecar DaemonSet (e2e sidecars
are local processes), then writes a kubeconfig that authenticates as the operator's
ServiceAccount. Start `perseus-operator` with ``KUBECONFIG=<that file>`` and
``PERSEUS_OPERATOR_POD_NAMESPACE=<namespace>``: a permission the chart forgot then fails the
test with a Forbidden, as it would in a real cluster.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.chart._scripts import CHART, K8S_BIN, ROOT

__all__ = ["OperatorRelease", "install_operator_release", "uninstall_operator_release"]


@dataclass(frozen=True)
class OperatorRelease:
    release: str
    namespace: str
    kubeconfig: Path
    """Authenticates as system:serviceaccount:<namespace>:<release>-operator (or the fullname)."""


def _run(args: list[str], admin_kubeconfig: Path) -> str:
    env = {**os.environ, "KUBECONFIG": str(admin_kubeconfig)}
    env["PATH"] = f"{K8S_BIN}{os.pathsep}{env.get('PATH', '')}"
    done = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:3])} failed: {done.stderr.strip()[-2000:]}")
    return done.stdout


def install_operator_release(
    admin_kubeconfig: Path,
    out_dir: Path,
    *,
    release: str = "perseus",
    namespace: str = "perseus-system",
    extra_values: tuple[str, ...] = (),
) -> OperatorRelease:
    """Install (or upgrade) the release and return the operator ServiceAccount's kubeconfig."""
    helm = str(K8S_BIN / "helm")
    _run(
        [
            helm, "upgrade", "--install", release, str(CHART), "-n", namespace,
            "--create-namespace", "--set", "crds.install=false", "--set", "sidecar.enabled=false",
            *(a for value in extra_values for a in ("--set", value)),
        ],
        admin_kubeconfig,
    )  # fmt: skip
    fullname = release if "perseus" in release else f"{release}-perseus"
    out = out_dir / f"{release}-operator.kubeconfig"
    _run(
        [str(ROOT / "scripts" / "sa-kubeconfig.sh"), namespace, f"{fullname}-operator", str(out)],
        admin_kubeconfig,
    )
    return OperatorRelease(release=release, namespace=namespace, kubeconfig=out)


def uninstall_operator_release(admin_kubeconfig: Path, release: OperatorRelease) -> None:
    """helm uninstall the release and delete its namespace (no wait)."""
    helm, kubectl = str(K8S_BIN / "helm"), str(K8S_BIN / "kubectl")
    _run([helm, "uninstall", release.release, "-n", release.namespace], admin_kubeconfig)
    _run([kubectl, "delete", "namespace", release.namespace, "--wait=false"], admin_kubeconfig)
