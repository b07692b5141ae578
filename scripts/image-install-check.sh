#!/usr/bin/env bash
# Proves the Dockerfile's install steps without a Docker engine: copies exactly the build stage's
# COPY sources into a clean build context (honouring .dockerignore's cache patterns), runs the
# same RUN step (scripts/image-install.sh) into a fresh venv, then runs both entry points' --help
# from that venv, outside the source tree. The image itself is not built here.
# Usage: scripts/image-install-check.sh        (network or a wheel cache for pip is needed)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
python3 - "$ROOT" "$WORK/context" <<'PY'
"""Replays the build stage's COPY instructions (relative to its WORKDIR) into a new context."""
import re
import shutil
import sys
from pathlib import Path

root, context = Path(sys.argv[1]), Path(sys.argv[2])
lines = (root / "Dockerfile").read_text().splitlines()
build = []
in_build = False
for line in lines:
    if line.startswith("FROM "):
        in_build = bool(re.search(r"\bAS build\b", line))
        continue
    if in_build:
        build.append(line)
copies = [l.split()[1:] for l in build if l.startswith("COPY ") and "--from" not in l]
runs = [l[4:] for l in build if l.startswith("RUN ")]
if not copies or runs != ["scripts/image-install.sh /src /opt/perseus"]:
    sys.exit(f"Dockerfile build stage changed shape: COPY {copies}, RUN {runs}; update this check")
ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
for *sources, dest in copies:
    # Docker's rules: a directory's contents go into dest; a file goes into dest when dest ends
    # with "/" (or there are several sources), otherwise it becomes dest.
    into_dir = dest.endswith("/") or len(sources) > 1
    base = context / dest
    for src in sources:
        path = root / src
        if path.is_dir():
            shutil.copytree(path, base, ignore=ignore, dirs_exist_ok=True)
        else:
            target = base / path.name if into_dir else base
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
print("build context:", sorted(str(p.relative_to(context)) for p in context.iterdir()))
PY
want=$(sed -n 's/^ARG PYTHON_VERSION=//p' "$ROOT/Dockerfile")
have=$(python3 -c 'import platform; print(platform.python_version())')
[ "$want" = "$have" ] || echo "warning: the image pins Python $want, this check runs $have" >&2
echo "==> image install step (scripts/image-install.sh) into a clean venv"
t0=$SECONDS
(cd "$WORK/context" && scripts/image-install.sh "$WORK/context" "$WORK/venv")
echo "    installed in $((SECONDS - t0))s"
cd "$WORK"
for cmd in perseus-operator perseus-sidecar perseus; do
  "$WORK/venv/bin/$cmd" --help >/dev/null
  echo "    $cmd --help: ok"
done
# The image installs no test or dev tooling, and the package imports from the venv, not the tree.
"$WORK/venv/bin/python" - <<'PY'
import importlib.util, sys
import perseus_operator, perseus_sidecar, perseus_profiles, perseus_hooks, perseus_sim
for mod in (perseus_operator, perseus_sidecar, perseus_profiles, perseus_hooks, perseus_sim):
    assert "/venv/" in mod.__file__, mod.__file__
for dev in ("pytest", "mypy", "torch"):
    assert importlib.util.find_spec(dev) is None, f"{dev} must not be in the image"
print("    packages from the venv; no dev tools installed")
PY
echo "image install check: ok (the image itself was not built: no Docker engine here)"
