#!/usr/bin/env bash
# The demo on a real one-node Kubernetes cluster (needs root): builds the Kubernetes binaries
# (scripts/cluster.sh build, ~6 min once) and the image (scripts/image.sh, ~3 min), starts a node
# with a kubelet (scripts/node.sh), installs the Helm chart with simulated GPUs, applies
# examples/energypolicy-demo.yaml and runs the training job as 8 rank pods + a coordinator, then
# prints the pods, `kubectl get energypolicies` and the measured saving.
#   scripts/node-demo.sh [--keep] [--measure-s S]
# --keep leaves the cluster running and prints how to reach it and how to stop it.
set -euo pipefail
cd "$(dirname "$0")/.."
keep=0
args=()
for a in "$@"; do [ "$a" = --keep ] && keep=1 || args+=("$a"); done
scripts/setup.sh
scripts/cluster.sh build
scripts/image.sh
RUN=$(mktemp -d "${TMPDIR:-/tmp}/perseus-node-demo.XXXXXX")
finish() {
  if [ "$keep" = 1 ]; then
    echo "the cluster keeps running:"
    echo "  export KUBECONFIG=$RUN/cfg/admin.kubeconfig PATH=$(scripts/cluster.sh bin):\$PATH"
    echo "  stop it with: scripts/node.sh down $RUN && rm -rf $RUN"
  else
    scripts/node.sh down "$RUN" >/dev/null
    rm -rf "$RUN"
  fi
}
trap finish EXIT
scripts/node.sh up "$RUN" | tail -n 2
export KUBECONFIG=$RUN/cfg/admin.kubeconfig
.venv/bin/python -m perseus_sim.nodedemo --bin-dir "$(scripts/cluster.sh bin)" \
  --gpu-state-dir "$RUN/hostpath/gpus" --pod-resources-dir "$RUN/state/kubelet/pod-resources" "${args[@]}"
