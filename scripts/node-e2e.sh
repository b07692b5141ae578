#!/usr/bin/env bash
# The real-node stage of the tests: builds the image (scripts/image.sh), starts a one-node
# cluster with a kubelet (scripts/node.sh), runs tests/node (the chart's pods, the training job
# as pods, deletions, completion, upgrade, uninstall) and tears everything down, leaving the
# host as it was. Needs root and `scripts/setup.sh`'s .venv.
#   scripts/node-e2e.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$SECONDS
scripts/cluster.sh build
echo "==> image (scripts/image.sh)"
scripts/image.sh
t_image=$((SECONDS - t0))
RUN=$(mktemp -d "${TMPDIR:-/tmp}/perseus-node.XXXXXX")
cleanup() {
  rc=$?
  if [ "$rc" != 0 ]; then
    echo "==> node stage failed: the last lines of each component's and pod's log"
    scripts/node.sh status "$RUN" 2>/dev/null | tail -n 30 || true
    for f in "$RUN"/logs/*.log; do echo "--- $f"; tail -n 8 "$f"; done 2>/dev/null || true
    for f in /var/log/pods/*/*/*.log; do echo "--- $f"; tail -n 12 "$f"; done 2>/dev/null || true
  fi
  scripts/node.sh down "$RUN" || true
  rm -rf "$RUN"
  exit "$rc"
}
trap cleanup EXIT
echo "==> one-node cluster (scripts/node.sh up)"
scripts/node.sh up "$RUN" | tail -n 3
export KUBECONFIG=$RUN/cfg/admin.kubeconfig PERSEUS_NODE_RUN=$RUN
t1=$SECONDS
.venv/bin/python -m pytest -q -m node tests/node --durations=0 -p no:cacheprovider "$@"
echo "node stage: image ${t_image}s, tests $((SECONDS - t1))s, total $((SECONDS - t0))s"
