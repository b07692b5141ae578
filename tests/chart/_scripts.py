"""Load the chart tooling under scripts/ (a folder of scripts, not a package) as modules."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "perseus"
# Where scripts/cluster.sh build puts the binaries (PERSEUS_K8S_CACHE moves it, as there).
K8S_BIN = Path(os.environ.get("PERSEUS_K8S_CACHE") or ROOT / ".cache" / "k8s") / "bin"


def load_script(name: str) -> ModuleType:
    """Import scripts/<name>.py under the module name ``name``."""
    path = ROOT / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def helm_binary() -> Path | None:
    """The helm that scripts/cluster.sh build fetched, else one on PATH, else None."""
    local = K8S_BIN / "helm"
    if local.is_file():
        return local
    found = shutil.which("helm")
    return Path(found) if found else None


def helm_template(helm: Path, *args: str) -> str:
    """`helm template perseus charts/perseus -n perseus-system ARGS...` as text."""
    done = subprocess.run(
        [str(helm), "template", "perseus", str(CHART), "-n", "perseus-system", *args],
        check=True,
        capture_output=True,
        text=True,
    )
    return done.stdout
