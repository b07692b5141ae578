#!/usr/bin/env bash
# A real one-node Kubernetes 1.20 cluster on this machine: the control plane of scripts/cluster.sh
# plus kube-scheduler, containerd (CRI), the kubelet and kube-proxy, so that the chart's pods and
# the training job's pods really run. No Docker, no registry: images come from scripts/image.sh
# as OCI archives imported into containerd.
#
#   scripts/node.sh up RUN_DIR [IMAGES_DIR]   start everything, state under RUN_DIR, import the
#                                             images (default .cache/node/images), wait for the
#                                             node to be Ready; last line: export KUBECONFIG=...
#   scripts/node.sh down RUN_DIR              stop everything and leave the host as it was
#                                             (processes, mounts, bridge, iptables, sysctls)
#   scripts/node.sh status RUN_DIR            components, node and pods
#
# Needs `scripts/cluster.sh build` (the Kubernetes binaries), scripts/setup.sh's .venv (the
# device plugin) and root. Debian packages it needs (containerd, runc, CNI plugins, iptables,
# conntrack) are installed when missing.
#
# GPUs: scripts/node/sim_device_plugin.py registers NODE_GPUS (8) simulated GPUs with the kubelet
# as nvidia.com/gpu, named like the sidecar's simulated backend (GPU-sim-<node>-<i>): pods request
# them as real GPUs, get PERSEUS_GPU_UUID, and the kubelet's pod-resources API lists them.
#
# Network: the API server and the kubelet listen on NODE_IP (10.99.0.1), a /32 alias on lo, which
# pods reach (the `kubernetes` Service points at it); pods live on the bridge perseus0
# (10.88.0.0/16) and cannot reach anything beyond this host. hostPorts are DNAT'ed on every local
# address, loopback included: the chart's node values use ports no other local test uses.
# Traps this script avoids (each cost hours once): no CAP_SYS_RESOURCE here, so containerd runs with
# restrict_oom_score_adj and the kubelet with --oom-score-adj=0; images cannot be pulled back, so
# image GC is off; kube-proxy leaves the host's conntrack settings alone.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=$("$ROOT/scripts/cluster.sh" bin)
NODE_IP=${NODE_IP:-10.99.0.1}
NODE=${NODE_NAME:-perseus-node}
GPUS=${NODE_GPUS:-8}
PYTHON=$ROOT/.venv/bin/python
BR=perseus0
POD_CIDR=10.88.0.0/16
POD_GW=10.88.0.1
SVC_CIDR=10.96.0.0/24
SVC_IP=10.96.0.1
ETCD_PORT=${NODE_ETCD_PORT:-23791}
ETCD_PEER=${NODE_ETCD_PEER:-23801}
ETCD_METRICS=${NODE_ETCD_METRICS:-23811}
API_PORT=${NODE_API_PORT:-27443}
KCM_PORT=${NODE_KCM_PORT:-27257}
SCHED_PORT=${NODE_SCHED_PORT:-27259}
KUBELET_PORT=${NODE_KUBELET_PORT:-20250}
KUBELET_HEALTHZ=${NODE_KUBELET_HEALTHZ:-20248}
PROXY_HEALTHZ=${NODE_PROXY_HEALTHZ:-20256}
PROXY_METRICS=${NODE_PROXY_METRICS:-20249}
PAUSE=localhost/pause:perseus
COMPONENTS="etcd apiserver kcm scheduler containerd kubelet kube-proxy device-plugin"
export PATH=$BIN:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

say() { echo "==> [$(date +%H:%M:%S)] $*"; }
die() { echo "node.sh: $*" >&2; exit 1; }

setup_paths() {
  RUN=$1; CFG=$RUN/cfg; LOG=$RUN/logs; PKI=$CFG/pki; STATE=$RUN/state
  SOCK=$STATE/containerd/containerd.sock
  export KUBECONFIG=$CFG/admin.kubeconfig
}
alive() { [ -f "$STATE/$1.pid" ] && kill -0 "$(cat "$STATE/$1.pid")" 2>/dev/null; }
# start NAME CMD...: in its own session, logging to $LOG/NAME.log
start() {
  local n=$1; shift
  setsid "$@" >"$LOG/$n.log" 2>&1 </dev/null &
  echo $! >"$STATE/$n.pid"
}
# waitfor SECONDS WHAT COMPONENT CMD...: poll CMD every 0.5 s; fail with COMPONENT's log when it
# dies or the time runs out
waitfor() {
  local n=$(($1 * 2)) what=$2 comp=$3 i; shift 3
  for ((i = 0; i < n; i++)); do
    "$@" >/dev/null 2>&1 && return 0
    alive "$comp" || { echo "node.sh: $comp exited while waiting for $what; its log:" >&2; tail -n 25 "$LOG/$comp.log" >&2; return 1; }
    sleep 0.5
  done
  echo "node.sh: timed out waiting for $what; $comp's log:" >&2
  tail -n 25 "$LOG/$comp.log" >&2
  return 1
}
ctr_() { ctr --address "$SOCK" -n k8s.io "$@"; }

packages() {
  local missing=() p
  for p in containerd:containerd runc:runc iptables:iptables conntrack:conntrack; do
    command -v "${p%%:*}" >/dev/null || missing+=("${p#*:}")
  done
  [ -x /usr/lib/cni/bridge ] && [ -x /usr/lib/cni/portmap ] || missing+=(containernetworking-plugins)
  [ ${#missing[@]} = 0 ] && return 0
  say "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq "${missing[@]}" >/dev/null 2>&1 ||
    { apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null; }
}

pki() {
  [ -f "$PKI/ca.crt" ] && return 0
  mkdir -p "$PKI"
  (
    cd "$PKI"
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 30 -subj "/CN=perseus-node-ca" 2>/dev/null
    cert() { # name subject extensions
      openssl req -newkey rsa:2048 -nodes -keyout "$1.key" -out "$1.csr" -subj "$2" 2>/dev/null
      printf "%b\n" "$3" >"$1.ext"
      openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -out "$1.crt" -days 30 -extfile "$1.ext" 2>/dev/null
    }
    cert apiserver "/CN=kube-apiserver" "subjectAltName=IP:$NODE_IP,IP:127.0.0.1,IP:$SVC_IP,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\nextendedKeyUsage=serverAuth"
    cert admin "/O=system:masters/CN=admin" "extendedKeyUsage=clientAuth"
    cert kubelet "/O=system:nodes/CN=system:node:$NODE" "extendedKeyUsage=clientAuth"
    cert kube-proxy "/CN=system:kube-proxy" "extendedKeyUsage=clientAuth"
    cert scheduler "/CN=system:kube-scheduler" "extendedKeyUsage=clientAuth"
    cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" "extendedKeyUsage=clientAuth"
    openssl genrsa -out sa.key 2048 2>/dev/null
    openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
  )
}

kubeconfig() { # identity
  cat >"$CFG/$1.kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters: [{name: perseus-node, cluster: {server: "https://$NODE_IP:$API_PORT", certificate-authority: $PKI/ca.crt}}]
users: [{name: $1, user: {client-certificate: $PKI/$1.crt, client-key: $PKI/$1.key}}]
contexts: [{name: perseus-node, context: {cluster: perseus-node, user: $1, namespace: default}}]
current-context: perseus-node
KC
}

write_configs() {
  mkdir -p "$CFG/cni" "$STATE/containerd"
  cat >"$CFG/containerd.toml" <<EOF
version = 2
root = "$STATE/containerd/root"
state = "$STATE/containerd/state"
[grpc]
  address = "$SOCK"
[ttrpc]
  address = "$SOCK.ttrpc"
[metrics]
  address = ""
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE"
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  disable_apparmor = true
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "$(command -v runc)"
        Root = "$STATE/containerd/runc"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$CFG/cni"
    max_conf_num = 1
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = ""
EOF
  cat >"$CFG/cni/10-perseus.conflist" <<EOF
{"cniVersion": "0.4.0", "name": "perseus-node",
 "plugins": [
  {"type": "bridge", "bridge": "$BR", "isGateway": true, "ipMasq": false, "hairpinMode": true,
   "ipam": {"type": "host-local", "dataDir": "$STATE/cni-ipam",
            "ranges": [[{"subnet": "$POD_CIDR", "gateway": "$POD_GW"}]], "routes": [{"dst": "0.0.0.0/0"}]}},
  {"type": "portmap", "capabilities": {"portMappings": true}, "snat": true}]}
EOF
  cat >"$CFG/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_IP
port: $KUBELET_PORT
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $KUBELET_HEALTHZ
authentication: {anonymous: {enabled: false}, webhook: {enabled: true}, x509: {clientCAFile: $PKI/ca.crt}}
authorization: {mode: Webhook}
cgroupDriver: cgroupfs
failSwapOn: false
clusterDomain: cluster.local
resolvConf: /etc/resolv.conf
# a Secret the operator creates after the pods started reaches their volumes within seconds
syncFrequency: 10s
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: "100Mi", nodefs.available: "2%", imagefs.available: "2%"}
EOF
  cat >"$CFG/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
clientConnection: {kubeconfig: $CFG/kube-proxy.kubeconfig}
hostnameOverride: $NODE
bindAddress: $NODE_IP
healthzBindAddress: 127.0.0.1:$PROXY_HEALTHZ
metricsBindAddress: 127.0.0.1:$PROXY_METRICS
clusterCIDR: $POD_CIDR
nodePortAddresses: [$NODE_IP/32]
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
iptables: {syncPeriod: 30s, minSyncPeriod: 1s}
EOF
  local k
  for k in admin kubelet kube-proxy scheduler; do kubeconfig "$k"; done
}

# Paths the kubelet and the CNI plugins use whatever their configuration says.
FIXED_DIRS="/var/log/pods /var/log/containers /var/lib/cni /var/lib/kubelet"
SYSCTLS="vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops kernel.keys.root_maxkeys kernel.keys.root_maxbytes net.ipv4.conf.all.route_localnet net.ipv4.ip_forward net.bridge.bridge-nf-call-iptables"

host_prepare() {
  # Snapshot what the kubelet, kube-proxy and the CNI plugins change, for `down`.
  modprobe br_netfilter 2>/dev/null || true
  local s d
  [ -f "$STATE/sysctl.before" ] || for s in $SYSCTLS; do echo "$s=$(sysctl -n "$s" 2>/dev/null || echo '')"; done >"$STATE/sysctl.before"
  [ -f "$STATE/iptables.before" ] || { iptables-save >"$STATE/iptables.before"; ip6tables-save >"$STATE/ip6tables.before"; }
  [ -f "$STATE/preexisting" ] || for d in $FIXED_DIRS /sys/fs/cgroup/memory/kubepods; do [ -e "$d" ] && echo "$d"; done >"$STATE/preexisting" || true
  ip addr show dev lo | grep -q "$NODE_IP/32" || ip addr add "$NODE_IP/32" dev lo
  sysctl -qw net.bridge.bridge-nf-call-iptables=1 2>/dev/null || true
  # Pods reach this host and each other, never beyond it.
  iptables -N PERSEUS-NODE-NO-EGRESS 2>/dev/null || true
  iptables -C PERSEUS-NODE-NO-EGRESS -i "$BR" ! -o "$BR" -j DROP 2>/dev/null || iptables -A PERSEUS-NODE-NO-EGRESS -i "$BR" ! -o "$BR" -j DROP
  iptables -C FORWARD -j PERSEUS-NODE-NO-EGRESS 2>/dev/null || iptables -A FORWARD -j PERSEUS-NODE-NO-EGRESS
}

ports_free() {
  local busy="" p
  for p in $ETCD_PORT $ETCD_PEER $ETCD_METRICS $API_PORT $KCM_PORT $SCHED_PORT $KUBELET_PORT $KUBELET_HEALTHZ $PROXY_HEALTHZ $PROXY_METRICS; do
    [ -z "$(ss -Htln "sport = :$p")" ] || busy="$busy $p"
  done
  [ -z "$busy" ] || die "ports already in use:$busy (another node.sh or cluster running? scripts/node.sh down RUN_DIR)"
}

up() {
  setup_paths "$1"
  local images=${2:-$ROOT/.cache/node/images} b t0=$SECONDS
  [ "$(id -u)" = 0 ] || die "needs root (containerd, the kubelet, iptables)"
  for b in etcd kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl; do
    [ -x "$BIN/$b" ] || die "missing $BIN/$b: run scripts/cluster.sh build"
  done
  [ -f "$images/pause.tar" ] && [ -f "$images/perseus.tar" ] || die "missing images in $images: run scripts/image.sh"
  "$PYTHON" -c "import grpc" 2>/dev/null || die "no grpcio in $ROOT/.venv (the device plugin): run scripts/setup.sh"
  mkdir -p "$CFG" "$LOG" "$STATE"
  if alive apiserver; then
    echo "already running"; echo "export KUBECONFIG=$KUBECONFIG"; return 0
  fi
  packages
  ports_free
  host_prepare
  pki
  write_configs
  say "control plane (etcd, kube-apiserver on $NODE_IP:$API_PORT, controller-manager, scheduler)"
  start etcd "$BIN/etcd" --name perseus-node --data-dir "$STATE/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER" \
    --initial-cluster "perseus-node=http://127.0.0.1:$ETCD_PEER" --listen-metrics-urls "http://127.0.0.1:$ETCD_METRICS"
  waitfor 30 "etcd" etcd curl -sf "http://127.0.0.1:$ETCD_PORT/health"
  start apiserver "$BIN/kube-apiserver" --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
    --bind-address="$NODE_IP" --secure-port="$API_PORT" --insecure-port=0 --advertise-address="$NODE_IP" \
    --service-cluster-ip-range="$SVC_CIDR" \
    --tls-cert-file="$PKI/apiserver.crt" --tls-private-key-file="$PKI/apiserver.key" --client-ca-file="$PKI/ca.crt" \
    --service-account-key-file="$PKI/sa.pub" --service-account-signing-key-file="$PKI/sa.key" \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --authorization-mode=Node,RBAC --enable-admission-plugins=NodeRestriction --allow-privileged=true \
    --kubelet-client-certificate="$PKI/apiserver-kubelet-client.crt" --kubelet-client-key="$PKI/apiserver-kubelet-client.key" \
    --kubelet-preferred-address-types=InternalIP --cert-dir="$STATE/apiserver-certs"
  waitfor 90 "the API server" apiserver curl -sf --cacert "$PKI/ca.crt" --cert "$PKI/admin.crt" --key "$PKI/admin.key" \
    "https://$NODE_IP:$API_PORT/readyz"
  start kcm "$BIN/kube-controller-manager" --kubeconfig="$KUBECONFIG" --authentication-kubeconfig="$KUBECONFIG" \
    --authorization-kubeconfig="$KUBECONFIG" --bind-address=127.0.0.1 --secure-port="$KCM_PORT" --port=0 \
    --leader-elect=false --use-service-account-credentials=false \
    --service-account-private-key-file="$PKI/sa.key" --root-ca-file="$PKI/ca.crt" \
    --controllers='*,-nodeipam,-cloud-node-lifecycle,-service,-route,-bootstrapsigner,-tokencleaner,-csrsigning,-csrapproving,-csrcleaner'
  start scheduler "$BIN/kube-scheduler" --kubeconfig="$CFG/scheduler.kubeconfig" \
    --authentication-kubeconfig="$CFG/scheduler.kubeconfig" --authorization-kubeconfig="$CFG/scheduler.kubeconfig" \
    --bind-address=127.0.0.1 --secure-port="$SCHED_PORT" --port=0 --leader-elect=false
  say "containerd, images"
  start containerd containerd --config "$CFG/containerd.toml"
  waitfor 30 "containerd" containerd ctr_ version
  for b in pause perseus; do ctr_ images import "$images/$b.tar" >/dev/null; done
  echo "    images: $(ctr_ images ls -q | grep -v '^sha256:' | tr '\n' ' ')"
  say "kubelet, kube-proxy"
  start kubelet "$BIN/kubelet" --config="$CFG/kubelet.yaml" --kubeconfig="$CFG/kubelet.kubeconfig" \
    --container-runtime=remote --container-runtime-endpoint="unix://$SOCK" --runtime-request-timeout=5m \
    --pod-infra-container-image="$PAUSE" --node-ip="$NODE_IP" --hostname-override="$NODE" \
    --node-labels=nvidia.com/gpu.present=true \
    --root-dir="$STATE/kubelet" --cert-dir="$STATE/kubelet/pki" --fail-swap-on=false --oom-score-adj=0
  start kube-proxy "$BIN/kube-proxy" --config="$CFG/kube-proxy.yaml"
  # The kubelet's device-plugin socket is /var/lib/kubelet/device-plugins whatever --root-dir
  # says; the plugin registers as soon as it appears, and again whenever the kubelet restarts.
  start device-plugin "$PYTHON" "$ROOT/scripts/node/sim_device_plugin.py" --node-name "$NODE" --gpus "$GPUS"
  local ready="{.status.conditions[?(@.type==\"Ready\")].status}"
  waitfor 120 "node $NODE Ready" kubelet sh -c "kubectl get node $NODE -o jsonpath='$ready' | grep -qx True"
  # nodelifecycle lifts the not-ready taint shortly after Ready
  waitfor 60 "node $NODE untainted" kcm sh -c "[ -z \"\$(kubectl get node $NODE -o jsonpath='{.spec.taints}')\" ]"
  waitfor 60 "$GPUS allocatable nvidia.com/gpu on $NODE" device-plugin \
    sh -c "kubectl get node $NODE -o jsonpath='{.status.allocatable.nvidia\.com/gpu}' | grep -qx $GPUS"
  for b in $COMPONENTS; do alive "$b" || die "$b exited; its log: $LOG/$b.log"; done
  say "node $NODE Ready with $GPUS simulated GPUs after $((SECONDS - t0))s"
  echo "export KUBECONFIG=$KUBECONFIG"
}

down() {
  setup_paths "$1"
  set +e
  [ -d "$STATE" ] || { echo "nothing to stop in $RUN"; return 0; }
  if alive apiserver && alive kubelet; then
    # Let the kubelet stop every pod through the CRI (CNI DEL, unmounts), bounded.
    kubectl delete ns --all --wait=false >/dev/null 2>&1
    kubectl delete pods --all -A --grace-period=5 --wait=false >/dev/null 2>&1
    local i
    for ((i = 0; i < 90; i++)); do
      [ -z "$(kubectl get pods -A -o name 2>/dev/null)" ] && break
      sleep 0.5
    done
  fi
  local p
  for p in device-plugin kube-proxy kubelet scheduler kcm apiserver etcd; do alive "$p" && kill "$(cat "$STATE/$p.pid")"; done
  sleep 1
  if alive containerd; then
    local c
    for c in $(ctr_ tasks ls -q 2>/dev/null); do ctr_ tasks kill -s KILL "$c"; done
    sleep 1
    for c in $(ctr_ tasks ls -q 2>/dev/null); do ctr_ tasks delete -f "$c"; done
    for c in $(ctr_ containers ls -q 2>/dev/null); do ctr_ containers delete "$c"; done
    kill "$(cat "$STATE/containerd.pid")"
  fi
  for p in $COMPONENTS; do
    for ((i = 0; i < 20; i++)); do alive "$p" || break; sleep 0.5; done
    alive "$p" && kill -9 "$(cat "$STATE/$p.pid")"
    rm -f "$STATE/$p.pid"
  done
  # containerd shims that outlived it (their command line names our socket)
  local d
  for d in /proc/[0-9]*; do
    grep -qa -- "$SOCK" "$d/cmdline" 2>/dev/null && kill -9 "${d#/proc/}" 2>/dev/null
  done
  # mounts under our tree (secrets' tmpfs, netns, overlay rootfs, shm), deepest first
  local m
  for i in 1 2 3; do
    awk '{print $2}' /proc/mounts | grep "^$STATE/" | sort -r | while read -r m; do umount "$m" 2>/dev/null || umount -l "$m"; done
  done
  ip link show "$BR" >/dev/null 2>&1 && ip link del "$BR"
  ip addr del "$NODE_IP/32" dev lo 2>/dev/null
  if [ -f "$STATE/iptables.before" ]; then
    "$BIN/kube-proxy" --cleanup >/dev/null 2>&1
    local t
    for t in filter nat mangle raw; do
      iptables -t $t -F; iptables -t $t -X; ip6tables -t $t -F; ip6tables -t $t -X
    done 2>/dev/null
    iptables-restore <"$STATE/iptables.before"
    ip6tables-restore <"$STATE/ip6tables.before"
    # iptables-nft leaves empty tables behind: drop those that did not exist before `up`
    for t in filter nat mangle raw security; do
      grep -qx "\*$t" "$STATE/iptables.before" || nft delete table ip $t 2>/dev/null
      grep -qx "\*$t" "$STATE/ip6tables.before" || nft delete table ip6 $t 2>/dev/null
    done
    rm -f "$STATE/iptables.before" "$STATE/ip6tables.before"
  fi
  if [ -f "$STATE/sysctl.before" ]; then
    local k v
    while IFS== read -r k v; do [ -n "$v" ] && sysctl -qw "$k=$v"; done <"$STATE/sysctl.before"
    rm -f "$STATE/sysctl.before"
  fi
  for d in $FIXED_DIRS; do grep -qx "$d" "$STATE/preexisting" 2>/dev/null || rm -rf "$d"; done
  # the kubelet's QoS cgroups outlive it: remove them bottom-up
  if ! grep -qx /sys/fs/cgroup/memory/kubepods "$STATE/preexisting" 2>/dev/null; then
    for d in /sys/fs/cgroup/*/kubepods /sys/fs/cgroup/kubepods; do
      [ -d "$d" ] && find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null
    done
  fi
  rm -f "$STATE/preexisting"
  say "node down"
}

status() {
  setup_paths "$1"
  local p
  for p in $COMPONENTS; do
    printf "%-11s %s\n" "$p" "$(alive "$p" && echo "running, pid $(cat "$STATE/$p.pid")" || echo stopped)"
  done
  alive apiserver && kubectl get nodes,pods -A -o wide 2>&1 | head -n 40 || true
}

case ${1:-} in
  up) up "$(mkdir -p "${2:?usage: node.sh up RUN_DIR [IMAGES_DIR]}" && cd "$2" && pwd)" "${3:-}" ;;
  down) down "$(cd "${2:?usage: node.sh down RUN_DIR}" && pwd)" ;;
  status) status "$(cd "${2:?usage: node.sh status RUN_DIR}" && pwd)" ;;
  *)
    echo "usage: node.sh up RUN_DIR [IMAGES_DIR] | down RUN_DIR | status RUN_DIR" >&2
    exit 2
    ;;
esac
