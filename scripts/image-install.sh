#!/usr/bin/env bash
# The container image's install step, shared by the Dockerfile and scripts/image-install-check.sh
# so that what CI proves is exactly what the image runs.
#   image-install.sh SRC_DIR VENV_DIR
# Creates VENV_DIR with the running python3 and installs the project's two distributions from
# SRC_DIR, perseus-hooks (SRC_DIR/hooks) and perseus-k8s (SRC_DIR: runtime dependencies only, no
# dev/plot/torch extras), not editable, in one pip call (perseus-k8s requires perseus-hooks).
set -euo pipefail
SRC=${1:?usage: image-install.sh SRC_DIR VENV_DIR}
VENV=${2:?usage: image-install.sh SRC_DIR VENV_DIR}
python3 -m venv "$VENV"
"$VENV/bin/pip" install --no-cache-dir --disable-pip-version-check -q --upgrade pip
"$VENV/bin/pip" install --no-cache-dir --disable-pip-version-check -q "$SRC/hooks" "$SRC"
# Fail the build here, not in the cluster, when an entry point cannot import.
"$VENV/bin/perseus-operator" --help >/dev/null
"$VENV/bin/perseus-sidecar" --help >/dev/null
"$VENV/bin/perseus" --help >/dev/null
# The real-node tests run their rank pods from the image with `perseus sim-train rank`.
"$VENV/bin/perseus" sim-train rank --help >/dev/null
