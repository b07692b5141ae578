#!/usr/bin/env bash
# Writes a kubeconfig that authenticates as a ServiceAccount, so a process run on the host (the
# operator in the e2e suite) gets exactly the chart's RBAC instead of the admin credential.
#   sa-kubeconfig.sh NAMESPACE SERVICEACCOUNT OUT
# Reads the cluster address and CA from the current $KUBECONFIG (which must be allowed to read
# the ServiceAccount's token). Kubernetes < 1.24 keeps the token in a Secret that the token
# controller fills in (waited for, up to 30 s); newer clusters mint one with `kubectl create token`.
# Example, after `helm install perseus charts/perseus -n perseus-system --create-namespace`:
#   scripts/sa-kubeconfig.sh perseus-system perseus-operator /tmp/operator.kubeconfig
#   KUBECONFIG=/tmp/operator.kubeconfig perseus-operator ...
set -euo pipefail
NS=${1:?usage: sa-kubeconfig.sh NAMESPACE SERVICEACCOUNT OUT}
SA=${2:?usage: sa-kubeconfig.sh NAMESPACE SERVICEACCOUNT OUT}
OUT=${3:?usage: sa-kubeconfig.sh NAMESPACE SERVICEACCOUNT OUT}
: "${KUBECONFIG:?set KUBECONFIG to a credential that can read the ServiceAccount token}"
ROOT=$(cd "$(dirname "$0")/.." && pwd)
KUBECTL=${KUBECTL:-kubectl}
command -v "$KUBECTL" >/dev/null || KUBECTL=$("$ROOT/scripts/cluster.sh" bin)/kubectl
k() { "$KUBECTL" "$@"; }

k -n "$NS" get serviceaccount "$SA" >/dev/null ||
  { echo "sa-kubeconfig: no ServiceAccount $NS/$SA" >&2; exit 2; }
token=""
for _ in $(seq 150); do
  secret=$(k -n "$NS" get serviceaccount "$SA" -o jsonpath='{.secrets[0].name}' 2>/dev/null || true)
  if [ -n "$secret" ]; then
    token=$(k -n "$NS" get secret "$secret" -o jsonpath='{.data.token}' | base64 -d)
    [ -n "$token" ] && break
  elif k create token --help >/dev/null 2>&1; then
    token=$(k -n "$NS" create token "$SA" --duration=24h)
    break
  fi
  sleep 0.2
done
[ -n "$token" ] || { echo "sa-kubeconfig: no token for $NS/$SA after 30 s (is the token controller running?)" >&2; exit 1; }
server=$(k config view --minify -o jsonpath='{.clusters[0].cluster.server}')
ca=$(k config view --minify --flatten -o jsonpath='{.clusters[0].cluster.certificate-authority-data}')
umask 077
cat >"$OUT" <<KC
apiVersion: v1
kind: Config
clusters: [{name: cluster, cluster: {server: "$server", certificate-authority-data: "$ca"}}]
users: [{name: $SA, user: {token: "$token"}}]
contexts: [{name: $SA, context: {cluster: cluster, user: $SA, namespace: $NS}}]
current-context: $SA
KC
echo "$OUT: kubeconfig for system:serviceaccount:$NS:$SA"
