#!/usr/bin/env bash
# Creates .venv (once) and installs the project with everything the demo and the tests need:
# both distributions, perseus-hooks (hooks/, the training hooks) and perseus-k8s, editable.
# Usage: scripts/setup.sh            -> .venv with the project, dev tools and PyTorch (CPU build)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.perseus-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ hooks/pyproject.toml -nt "$stamp" ]; then
  echo "==> installing perseus-k8s and its dev dependencies into .venv (first time: a few minutes)"
  .venv/bin/pip install -q --upgrade pip
  # One pip call: perseus-k8s requires perseus-hooks, which pip then takes from ./hooks.
  .venv/bin/pip install -q -e ./hooks -e '.[dev,plot,torch]'
  touch "$stamp"
fi
