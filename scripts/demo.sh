#!/usr/bin/env bash
# The demo, from a fresh machine: sets up .venv, builds (once, ~4 min, with progress) and starts a
# local Kubernetes control plane, then runs the operator, one simulated-GPU sidecar per fake node
# and a simulated 2-pipeline x 4-stage training job; applies examples/energypolicy-demo.yaml,
# waits for Ready, and prints `kubectl get energypolicies` and the measured energy saving. First,
# it prints the planner's summary for an embedded real profile.
#   scripts/demo.sh [--keep] [--measure-s S]   (extra args go to perseus_sim.demo)
#   scripts/demo.sh --down RUN                 stop and remove a demo kept with --keep
# Everything it starts is stopped and removed at the end; with --keep a successful demo leaves the
# control plane, the operator, the sidecars and the simulated job running and prints how to reach
# and stop them. A failed demo keeps its logs and says where.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = --down ]; then
  RUN=${2:?usage: scripts/demo.sh --down RUN}
  [ -f "$RUN/demo/pids" ] && kill $(cat "$RUN/demo/pids") 2>/dev/null || true
  scripts/cluster.sh down "$RUN/k8s"
  rm -rf "$RUN"
  exit 0
fi
keep=0
for a in "$@"; do [ "$a" = --keep ] && keep=1; done
scripts/setup.sh
echo "==> the planner on an embedded real profile: GPT-3 175B, 8 A100 stages, 12 microbatches"
.venv/bin/perseus plan --example gpt3-175b-a100 --microbatches 12
echo "==> local control plane (etcd + kube-apiserver + controller-manager v1.20)"
scripts/cluster.sh build
RUN=$(mktemp -d "${TMPDIR:-/tmp}/perseus-demo.XXXXXX")
# Ports below Linux's ephemeral range (32768-60999): see scripts/test.sh.
export API_PORT=${API_PORT:-26443} ETCD_PORT=${ETCD_PORT:-25790} ETCD_PEER=${ETCD_PEER:-25800}
export KCM_PORT=${KCM_PORT:-26257}
finish() {
  local rc=$?
  if [ "$rc" = 0 ] && [ "$keep" = 1 ]; then
    echo "the demo keeps running (control plane, operator, sidecars, simulated job):"
    echo "  export KUBECONFIG=$RUN/k8s/kubeconfig PATH=$(scripts/cluster.sh bin):\$PATH"
    echo "  kubectl -n perseus-demo get energypolicies; logs in $RUN/demo"
    echo "  stop it with: scripts/demo.sh --down $RUN"
    return
  fi
  scripts/cluster.sh down "$RUN/k8s" || true
  if [ "$rc" = 0 ]; then
    rm -rf "$RUN"
  else
    rm -rf "$RUN/k8s/etcd-data"
    echo "demo failed; its logs are kept in $RUN (demo/*.log, k8s/*.log)" >&2
  fi
}
trap finish EXIT
# Its `export KUBECONFIG=...` line is printed by `finish` only when the cluster outlives the demo.
scripts/cluster.sh up "$RUN/k8s" | grep -v '^export KUBECONFIG='
export KUBECONFIG=$RUN/k8s/kubeconfig
.venv/bin/python -m perseus_sim.demo --workdir "$RUN/demo" \
  --kubectl "$(scripts/cluster.sh bin)/kubectl" "$@"
