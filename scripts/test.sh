#!/usr/bin/env bash
# The whole test suite: setup, static checks, unit tests, then the e2e tests against a real local
# Kubernetes control plane (built once into .cache/k8s, about 4 minutes from cold).
# Usage: scripts/test.sh [extra pytest args]      PERSEUS_SKIP_E2E=1 skips the control plane.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/check.sh
export PATH=$PWD/.venv/bin:$PATH
echo "==> unit tests"
python -m pytest -q -m "not e2e" "$@"
