#!/usr/bin/env bash
# Static checks: ruff (lint + format), mypy strict, import contracts. Assumes scripts/setup.sh ran.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=$PWD/.venv/bin:$PATH
# One command per line: under `set -e` a failure on the left of `&&` would not stop the script.
echo "==> ruff"
ruff check .
ruff format --check .
echo "==> mypy --strict"; mypy operator/perseus_operator sidecar/perseus_sidecar profiles/perseus_profiles \
  hooks/perseus_hooks sim/perseus_sim tests bench \
  scripts/node/sim_device_plugin.py scripts/node/deviceplugin_messages.py scripts/import_picture.py
echo "==> import contracts"; lint-imports
