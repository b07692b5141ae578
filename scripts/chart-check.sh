#!/usr/bin/env bash
# Checks the Helm chart end to end. Each stage prints what it proved.
#   scripts/chart-check.sh            every stage: lint, render + schema validation, server dry-run,
#                                     install/upgrade/uninstall, RBAC (a private control plane)
#   scripts/chart-check.sh offline    lint, render and schema validation only (helm, no cluster)
# Needs the binaries of scripts/cluster.sh build (helm, kubectl, the 1.20 control plane) and the
# dev extra (kubernetes-validate). The cluster stages start their own control plane on other
# ports (API_PORT 16543) under a temporary directory, because they install and delete the
# cluster-wide EnergyPolicy CRD, which would disturb a shared test cluster. Set
# CHART_CHECK_KUBECONFIG=FILE to use an existing cluster instead (it must not have the CRD).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
MODE=${1:-all}
case $MODE in all | offline) ;; *) echo "usage: chart-check.sh [all|offline]" >&2; exit 2 ;; esac
BIN=$(scripts/cluster.sh bin)
HELM=$BIN/helm
KUBECTL=$BIN/kubectl
PY=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$HELM" ] && [ -x "$KUBECTL" ] || { echo "chart-check: run scripts/cluster.sh build first" >&2; exit 2; }
CHART=$ROOT/charts/perseus
WORK=$(mktemp -d)
RUN=""
OP_PID=""
cleanup() {
  [ -z "$OP_PID" ] || kill "$OP_PID" 2>/dev/null || true
  [ -z "$RUN" ] || scripts/cluster.sh down "$RUN" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT
ok() { echo "ok: $*"; }
step() { echo "==> [$(date +%H:%M:%S)] $*"; }

# Value sets every render-level stage covers: the defaults, and every option switched the other way.
cat >"$WORK/options.yaml" <<'EOF'
crds: {keep: false}
operatorToken: {existingSecret: site-operator-token}
operator:
  watchNamespaces: [team-a, team-b]
  logLevel: debug
  serviceAccount: {annotations: {example.com/role: perseus}}
sidecar:
  privileged: true
  runtimeClassName: nvidia
  priorityClassName: system-node-critical
  maxUnavailable: 2
  extraArgs: ["--rank-timeout-s", "20"]
  extraEnv: [{name: PERSEUS_SIDECAR_LOG_LEVEL, value: debug}]
networkPolicy: {enabled: true}
metrics: {service: true, serviceMonitor: {enabled: true, labels: {release: prometheus}}}
imagePullSecrets: [{name: regcred}]
EOF
NS=perseus-system

step "CRD template is generated from crds/energypolicy.yaml"
"$PY" scripts/gen_chart_crd.py --check
ok "charts/perseus/templates/crd-energypolicy.yaml matches crds/energypolicy.yaml (generator --check)"

step "helm lint"
"$HELM" lint --strict "$CHART" >"$WORK/lint.log" || { cat "$WORK/lint.log"; exit 1; }
"$HELM" lint --strict "$CHART" -f "$WORK/options.yaml" >>"$WORK/lint.log" || { cat "$WORK/lint.log"; exit 1; }
ok "helm lint --strict passes with the default values and with every option switched"

step "helm template + schema validation against a current Kubernetes release"
"$HELM" template perseus "$CHART" -n "$NS" >"$WORK/default.yaml"
"$HELM" template perseus "$CHART" -n "$NS" -f "$WORK/options.yaml" >"$WORK/options-render.yaml"
"$HELM" template perseus "$CHART" -n "$NS" -f "$WORK/options.yaml" \
  --api-versions monitoring.coreos.com/v1/ServiceMonitor >"$WORK/monitoring.yaml"
"$PY" - "$WORK" <<'PY'
"""Render-level facts the templates must hold (the same files go to the validators below)."""
import sys
from pathlib import Path

import yaml

work = Path(sys.argv[1])


def objects(name):
    return [d for d in yaml.safe_load_all((work / name).read_text()) if d]


def kinds(docs):
    return sorted(f"{d['kind']}/{d['metadata']['name']}" for d in docs)


default, options, monitoring = (objects(n) for n in ("default.yaml", "options-render.yaml", "monitoring.yaml"))
assert not any(d["kind"] == "ServiceMonitor" for d in default + options), "ServiceMonitor without its API"
assert any(d["kind"] == "ServiceMonitor" for d in monitoring), "ServiceMonitor missing when its API exists"
crd = next(d for d in default if d["kind"] == "CustomResourceDefinition")
assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep", crd["metadata"]
for docs in (default, options):
    for d in docs:
        sel = d.get("spec", {}).get("selector", {})
        sel = sel.get("matchLabels", sel) if isinstance(sel, dict) else {}
        assert "helm.sh/chart" not in sel, f"helm.sh/chart in the selector of {d['kind']}"
assert not any(d["kind"] == "Secret" for d in options), "existingSecret must suppress the chart's Secret"
rb = [
    d["metadata"]["namespace"]
    for d in options
    if d["kind"] == "RoleBinding" and d["roleRef"]["name"] == "perseus-operator"
]
assert sorted(rb) == ["perseus-system", "team-a", "team-b"], rb
print("    default render:", ", ".join(kinds(default)))
PY
ok "renders hold: CRD keep annotation, no helm.sh/chart in selectors, existingSecret replaces the Secret, RoleBindings per watched namespace, ServiceMonitor only when monitoring.coreos.com/v1 is served"
KV_VERSION=$("$PY" -c 'import kubernetes_validate.utils as u; print(u.latest_version())')
"$PY" scripts/validate_manifests.py -k "$KV_VERSION" "$WORK/default.yaml" "$WORK/options-render.yaml"
ok "every object of both renders validates strictly against Kubernetes $KV_VERSION schemas (kubernetes-validate; a kind the release no longer serves fails): no API removed since 1.20"

[ "$MODE" = offline ] && { echo "chart-check (offline): all checks passed"; exit 0; }

if [ -n "${CHART_CHECK_KUBECONFIG:-}" ]; then
  export KUBECONFIG=$CHART_CHECK_KUBECONFIG
else
  step "private control plane for the cluster stages"
  RUN=$WORK/cluster
  API_PORT=${CHART_API_PORT:-16543} ETCD_PORT=${CHART_ETCD_PORT:-23890} ETCD_PEER=${CHART_ETCD_PEER:-23900} \
    KCM_PORT=${CHART_KCM_PORT:-16357} scripts/cluster.sh up "$RUN" | tail -n 2
  export KUBECONFIG=$RUN/kubeconfig
fi
k() { "$KUBECTL" "$@"; }
h() { "$HELM" "$@"; }
if k get crd energypolicies.perseus.dev >/dev/null 2>&1; then
  echo "chart-check: this cluster already has the EnergyPolicy CRD; use a fresh one" >&2
  exit 2
fi
"$KUBECTL" version --short 2>/dev/null | sed -n 2p

step "kubectl apply --dry-run=server (the 1.20 API server validates every object)"
for ns in "$NS" team-a team-b; do k create namespace "$ns" >/dev/null; done
k apply --dry-run=server -f "$WORK/default.yaml" >/dev/null
k apply --dry-run=server -f "$WORK/options-render.yaml" >/dev/null
ok "the API server (1.20) accepts every object of both renders (server-side dry run)"

step "helm install"
JOBS=perseus-jobs
k create namespace "$JOBS" >/dev/null
h install perseus "$CHART" -n "$NS" >"$WORK/install.log"
grep -q "PERSEUS_SIDECAR_HOST" "$WORK/install.log" || { cat "$WORK/install.log"; exit 1; }
k -n "$NS" get deployment/perseus-operator daemonset/perseus-sidecar secret/perseus-operator-token \
  serviceaccount/perseus-operator configmap/perseus-operator configmap/perseus-sidecar >/dev/null
k wait --for=condition=Established crd/energypolicies.perseus.dev --timeout=30s >/dev/null
token_before=$(k -n "$NS" get secret perseus-operator-token -o jsonpath='{.data.token}')
[ "${#token_before}" -ge 40 ] || { echo "operator token too short" >&2; exit 1; }
cat >"$WORK/policy.yaml" <<EOF
apiVersion: perseus.dev/v1alpha1
kind: EnergyPolicy
metadata: {name: chart-check, namespace: $JOBS}
spec:
  selector: {matchLabels: {job: chart-check}}
  pipeline: {stages: 4, microbatches: 8}
  profile: {import: {configMap: chart-check-profile}}
  blockingPowerW: 83.64
EOF
ok "helm install creates the operator, sidecar DaemonSet, token Secret and CRD; NOTES print the training-pod env"

step "RBAC of the operator's ServiceAccount (its token, not the admin credential)"
scripts/sa-kubeconfig.sh "$NS" perseus-operator "$WORK/operator.kubeconfig" >/dev/null
can() { KUBECONFIG=$WORK/operator.kubeconfig "$KUBECTL" auth can-i "$@" 2>/dev/null || true; }
allowed=("watch energypolicies.perseus.dev -n $JOBS" "patch energypolicies.perseus.dev --subresource=status -n $JOBS"
  "list pods -n $JOBS" "watch pods -n $JOBS"
  "create secrets -n $JOBS" "patch secrets -n $JOBS" "get configmaps -n $JOBS" "create events -n $JOBS"
  "create configmaps -n $NS" "update configmaps -n $NS" "watch pods -n $NS"
  "watch customresourcedefinitions.apiextensions.k8s.io")
denied=("delete energypolicies.perseus.dev -n $JOBS" "update energypolicies.perseus.dev -n $JOBS" "create energypolicies.perseus.dev -n $JOBS"
  "list secrets -n $JOBS" "delete secrets -n $JOBS"
  "delete pods -n $JOBS" "create pods -n $JOBS" "update configmaps -n $JOBS" "delete configmaps -n $NS"
  "create customresourcedefinitions.apiextensions.k8s.io" "get nodes/proxy")
for a in "${allowed[@]}"; do
  # shellcheck disable=SC2086
  [ "$(can $a)" = yes ] || { echo "operator ServiceAccount may not: $a" >&2; exit 1; }
done
for a in "${denied[@]}"; do
  # shellcheck disable=SC2086
  [ "$(can $a)" = no ] || { echo "operator ServiceAccount may (but should not): $a" >&2; exit 1; }
done
KUBECONFIG=$WORK/operator.kubeconfig "$KUBECTL" -n "$JOBS" get energypolicies >/dev/null
ok "the operator's ServiceAccount token may do the ${#allowed[@]} things the operator needs and none of ${#denied[@]} it does not (kubectl auth can-i)"

step "the operator itself runs under its ServiceAccount token"
# The real process (kopf watches and indices, status patches, events, the finalizer) on the
# host with the chart's RBAC: any permission it lacks shows up as a Forbidden in its log.
probe_port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
PERSEUS_OPERATOR_TOKEN=chart-check PERSEUS_OPERATOR_POD_NAMESPACE=$NS \
  PERSEUS_OPERATOR_SIDECAR_SELECTOR=app.kubernetes.io/instance=perseus,app.kubernetes.io/component=sidecar \
  KUBECONFIG=$WORK/operator.kubeconfig \
  "$ROOT/.venv/bin/perseus-operator" --liveness "http://127.0.0.1:$probe_port/healthz" >"$WORK/operator.log" 2>&1 &
OP_PID=$!
wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...: poll until COMMAND succeeds
  local limit=$1 what=$2 i
  shift 2
  for i in $(seq $((limit * 5))); do
    "$@" >/dev/null 2>&1 && return 0
    kill -0 "$OP_PID" 2>/dev/null || { tail -n 40 "$WORK/operator.log"; echo "operator exited" >&2; exit 1; }
    sleep 0.2
  done
  tail -n 40 "$WORK/operator.log"
  echo "timed out after ${limit}s waiting for $what" >&2
  exit 1
}
has_phase() { [ -n "$(k -n "$JOBS" get energypolicy rbac-probe -o jsonpath='{.status.phase}')" ]; }
gone() { ! k -n "$JOBS" get energypolicy rbac-probe; }
wait_for 30 "the operator's liveness endpoint" curl -sf "http://127.0.0.1:$probe_port/healthz"
sed 's/name: chart-check/name: rbac-probe/' "$WORK/policy.yaml" | k apply -f - >/dev/null
wait_for 60 "the operator to write the policy's status" has_phase
# A running job pod (on a Node object, status set through the API as a kubelet would) makes the
# operator create the policy's job-token Secret, owned by the policy.
"$PY" - "$JOBS" <<'PY'
import asyncio
import sys

from kubernetes_asyncio import client, config


async def main(namespace: str) -> None:
    await config.load_kube_config()
    async with client.ApiClient() as api:
        core = client.CoreV1Api(api)
        await core.create_node({"metadata": {"name": "chart-check-node"}})
        pod = {
            "metadata": {"name": "rank-0", "labels": {"job": "chart-check"}},
            "spec": {
                "nodeName": "chart-check-node",
                "automountServiceAccountToken": False,
                "containers": [{"name": "trainer", "image": "trainer"}],
            },
        }
        await core.create_namespaced_pod(namespace, pod)
        status = {"status": {"phase": "Running", "podIP": "127.0.0.5", "hostIP": "127.0.0.1"}}
        await core.patch_namespaced_pod_status("rank-0", namespace, status)


asyncio.run(main(sys.argv[1]))
PY
wait_for 60 "the operator to create the job-token Secret" k -n "$JOBS" get secret perseus-job-rbac-probe
[ "$(k -n "$JOBS" get secret perseus-job-rbac-probe -o jsonpath='{.metadata.ownerReferences[0].name}')" = rbac-probe ]
k -n "$JOBS" delete energypolicy rbac-probe --wait=false >/dev/null
wait_for 60 "the operator's finalizer to release the deleted policy" gone
secret_gone() { ! k -n "$JOBS" get secret perseus-job-rbac-probe; }
wait_for 60 "the garbage collector to delete the job-token Secret with its policy" secret_gone
k -n "$JOBS" delete pod rank-0 --wait=false >/dev/null
kill "$OP_PID"
wait "$OP_PID" 2>/dev/null || true
OP_PID=""
if grep -E "Forbidden|\(403\)" "$WORK/operator.log"; then
  echo "the operator hit a permission error under its ServiceAccount" >&2
  exit 1
fi
ok "perseus-operator under the ServiceAccount token starts (liveness answers), writes a policy's status, creates the job-token Secret for a running pod (owned by the policy: gone with it) and runs its finalizer, with no Forbidden in its log"
k apply -f "$WORK/policy.yaml" >/dev/null

step "helm upgrade with a changed value and a changed CRD"
cp -r "$CHART" "$WORK/chart-next"
"$PY" - crds/energypolicy.yaml "$WORK/crd-next.yaml" <<'PY'
import sys

import yaml

crd = yaml.safe_load(open(sys.argv[1]))
crd["spec"]["versions"][0].setdefault("additionalPrinterColumns", []).append(
    {"name": "ChartCheck", "type": "string", "jsonPath": ".spec.profileKey"}
)
yaml.safe_dump(crd, open(sys.argv[2], "w"), sort_keys=False)
PY
"$PY" scripts/gen_chart_crd.py --source "$WORK/crd-next.yaml" \
  --out "$WORK/chart-next/templates/crd-energypolicy.yaml" >/dev/null
checksum_before=$(k -n "$NS" get deployment perseus-operator -o jsonpath='{.spec.template.metadata.annotations.checksum/config}')
h upgrade perseus "$WORK/chart-next" -n "$NS" --set operator.logLevel=debug --set sidecar.maxUnavailable=3 >/dev/null
[ "$(k -n "$NS" get configmap perseus-operator -o jsonpath='{.data.PERSEUS_OPERATOR_LOG_LEVEL}')" = debug ]
[ "$(k -n "$NS" get daemonset perseus-sidecar -o jsonpath='{.spec.updateStrategy.rollingUpdate.maxUnavailable}')" = 3 ]
checksum_after=$(k -n "$NS" get deployment perseus-operator -o jsonpath='{.spec.template.metadata.annotations.checksum/config}')
[ "$checksum_before" != "$checksum_after" ] || { echo "checksum/config did not change" >&2; exit 1; }
k get crd energypolicies.perseus.dev -o jsonpath='{.spec.versions[0].additionalPrinterColumns[*].name}' | grep -qw ChartCheck ||
  { echo "helm upgrade did not update the CRD" >&2; exit 1; }
[ "$(k -n "$NS" get secret perseus-operator-token -o jsonpath='{.data.token}')" = "$token_before" ] ||
  { echo "the operator token changed on upgrade" >&2; exit 1; }
k -n "$JOBS" get energypolicy chart-check >/dev/null
ok "helm upgrade applies a changed value (ConfigMap + checksum/config roll the operator, DaemonSet maxUnavailable), updates the CRD schema, keeps the operator token and the policy"

step "helm uninstall keeps the CRD and the policies"
h uninstall perseus -n "$NS" >/dev/null
for obj in deployment/perseus-operator daemonset/perseus-sidecar secret/perseus-operator-token; do
  if k -n "$NS" get "$obj" >/dev/null 2>&1; then echo "$obj survived uninstall" >&2; exit 1; fi
done
if k get clusterrole perseus-operator >/dev/null 2>&1; then echo "ClusterRole survived uninstall" >&2; exit 1; fi
k get crd energypolicies.perseus.dev >/dev/null
[ "$(k -n "$JOBS" get energypolicy chart-check -o jsonpath='{.spec.blockingPowerW}')" = 83.64 ]
ok "helm uninstall removes the release's workloads, Secret and RBAC; the CRD (resource-policy keep) and the EnergyPolicy survive"

step "reinstall adopts the kept CRD"
h install perseus "$CHART" -n "$NS" >/dev/null
k -n "$JOBS" get energypolicy chart-check >/dev/null
if k get crd energypolicies.perseus.dev -o jsonpath='{.spec.versions[0].additionalPrinterColumns[*].name}' | grep -qw ChartCheck; then
  echo "reinstall did not bring the CRD back to the chart's version" >&2; exit 1
fi
h uninstall perseus -n "$NS" >/dev/null
ok "installing the same release again adopts the kept CRD, reverts its schema to the chart's, and the policy is still there"

k delete namespace "$JOBS" --wait=false >/dev/null
k delete crd energypolicies.perseus.dev >/dev/null
echo "chart-check: all checks passed"
