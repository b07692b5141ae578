#!/usr/bin/env bash
# The whole test suite: setup, static checks, unit tests, then the e2e tests against a real local
# Kubernetes control plane (built once into .cache/k8s, about 4 minutes from cold).
# Then the real-node stage (scripts/node-e2e.sh): the image built with buildah, a one-node cluster
# with a kubelet, the chart's pods and the training job as pods (about 10 minutes).
# Usage: scripts/test.sh [extra pytest args]      PERSEUS_SKIP_E2E=1 skips both cluster stages,
#                                                 PERSEUS_SKIP_NODE=1 only the real-node one.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/check.sh
export PATH=$PWD/.venv/bin:$PATH
echo "==> unit tests"
python -m pytest -q -m "not e2e" "$@"
echo "==> hooks wheel check: perseus-hooks built and installed alone into a clean venv"
scripts/hooks-wheel-check.sh
if [ "${PERSEUS_SKIP_E2E:-0}" != 1 ]; then
  echo "==> image install check: the Dockerfile's install step in a clean venv (no image is built)"
  scripts/image-install-check.sh
  # The chart checks (scripts/chart-check.sh, on a private control plane) run as the e2e test
  # tests/chart/test_chart_check.py.
  echo "==> e2e tests on a local control plane (scripts/cluster.sh)"
  scripts/cluster.sh build
  E2E_RUN=$(mktemp -d "${TMPDIR:-/tmp}/perseus-e2e.XXXXXX")
  # Below Linux's ephemeral range (32768-60999), where any outgoing connection may hold a port at
  # the moment the control plane binds it; apart from cluster.sh's, the demo's and the chart's.
  export API_PORT=${API_PORT:-18443} ETCD_PORT=${ETCD_PORT:-24790} ETCD_PEER=${ETCD_PEER:-24800}
  export KCM_PORT=${KCM_PORT:-18257}
  trap 'scripts/cluster.sh down "$E2E_RUN"; rm -rf "$E2E_RUN"' EXIT
  scripts/cluster.sh up "$E2E_RUN"
  rc=0
  KUBECONFIG=$E2E_RUN/kubeconfig python -m pytest -q -m e2e "$@" || rc=$?
  [ "$rc" = 5 ] && rc=0 # extra args selected no e2e test
  scripts/cluster.sh down "$E2E_RUN"
  [ "$rc" = 0 ] || exit "$rc"
  if [ "${PERSEUS_SKIP_NODE:-0}" != 1 ]; then
    echo "==> real-node stage: the image, a kubelet node, the chart and the job as pods"
    scripts/node-e2e.sh
  fi
fi
