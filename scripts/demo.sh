#!/usr/bin/env bash
# The demo, from a fresh machine: sets up .venv, builds (once, ~4 min, with progress) and starts a
# local Kubernetes control plane, then runs the operator, one simulated-GPU sidecar per fake node
# and a simulated 2-pipeline x 4-stage training job; applies examples/energypolicy-demo.yaml,
# waits for Ready, and prints `kubectl get energypolicies` and the measured energy saving. First,
# it prints the planner's summary for an embedded real profile (the frontier JSON goes to $TMPDIR).
# Everything it starts is stopped and removed at the end. Extra args go to perseus_sim.demo
# (e.g. --measure-s 30).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
echo "==> the planner on an embedded real profile: GPT-3 175B, 8 A100 stages, 12 microbatches"
.venv/bin/perseus plan --example gpt3-175b-a100 --microbatches 12 \
  --out "${TMPDIR:-/tmp}/perseus-demo-frontier.json"
echo "==> local control plane (etcd + kube-apiserver + controller-manager v1.20)"
scripts/cluster.sh build
RUN=$(mktemp -d "${TMPDIR:-/tmp}/perseus-demo.XXXXXX")
export API_PORT=${API_PORT:-26443} ETCD_PORT=${ETCD_PORT:-33790} ETCD_PEER=${ETCD_PEER:-33800}
export KCM_PORT=${KCM_PORT:-26257}
cleanup() {
  scripts/cluster.sh down "$RUN/k8s" || true
  rm -rf "$RUN"
}
trap cleanup EXIT
scripts/cluster.sh up "$RUN/k8s"
export KUBECONFIG=$RUN/k8s/kubeconfig
.venv/bin/python -m perseus_sim.demo --workdir "$RUN/demo" \
  --kubectl "$(scripts/cluster.sh bin)/kubectl" "$@"
