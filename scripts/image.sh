#!/usr/bin/env bash
# Builds the project's container image from its Dockerfile without Docker or a registry, for the
# real one-node cluster of scripts/node.sh:
#   1. a Debian 12 + python3 base image from debootstrap (the Dockerfile's BASE_IMAGE build
#      argument; its default stays the pinned upstream python image),
#   2. `buildah bud --pull=never` of the Dockerfile FROM that base,
#   3. the pod sandbox ("pause") image from scripts/node/pause.c,
# and writes both as OCI archives that `ctr images import` loads into the node's containerd.
#
#   scripts/image.sh [OUT_DIR]     default OUT_DIR: .cache/node/images
#
# Prints each step's time and the image's size. The base rootfs is kept under .cache/node (about
# a minute to make, once); the project layers are rebuilt on every call (about 1-2 minutes).
# Debian packages it needs (buildah, debootstrap) are installed when missing.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${PERSEUS_NODE_CACHE:-$ROOT/.cache/node}
OUT=${1:-$CACHE/images}
mkdir -p "$OUT" "$CACHE" && OUT=$(cd "$OUT" && pwd)
VERSION=$(awk -F'"' '/^appVersion:/ {print $2}' "$ROOT/charts/perseus/Chart.yaml")
IMAGE=localhost/perseus-k8s:$VERSION
BASE=localhost/perseus-base:bookworm
PAUSE=localhost/pause:perseus
BR=(buildah --root "$CACHE/buildah/root" --runroot "$CACHE/buildah/runroot" --storage-driver overlay)

step() { echo "==> [$(date +%H:%M:%S)] $*"; }
need() { # command package
  command -v "$1" >/dev/null || {
    step "installing Debian package $2"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq "$2" >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq "$2" >/dev/null; }
  }
}
need buildah buildah
need debootstrap debootstrap
need gcc gcc

t0=$SECONDS
rootfs=$CACHE/base-rootfs
if [ ! -x "$rootfs/usr/bin/python3" ]; then
  # The host's own Debian mirror (from its apt sources), so the base needs no other registry.
  mirror=$(awk '/^URIs:/ && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  [ -n "$mirror" ] || mirror=$(awk '/^deb / && $3 !~ /security/ {print $2; exit}' /etc/apt/sources.list)
  step "[1/4] debootstrap Debian 12 minbase + python3 (once, about a minute)"
  rm -rf "$rootfs.tmp"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$rootfs.tmp" "$mirror" >"$CACHE/debootstrap.log" 2>&1 ||
    { tail -n 20 "$CACHE/debootstrap.log"; exit 1; }
  rm -rf "$rootfs.tmp"/var/cache/apt/archives/*.deb "$rootfs.tmp"/var/lib/apt/lists/* \
    "$rootfs.tmp"/usr/share/doc/* "$rootfs.tmp"/usr/share/man/* "$rootfs.tmp"/usr/share/info/*
  mv "$rootfs.tmp" "$rootfs"
else
  step "[1/4] Debian 12 + python3 rootfs already in $rootfs"
fi
if ! "${BR[@]}" inspect --type image "$BASE" >/dev/null 2>&1; then
  c=$("${BR[@]}" from scratch)
  "${BR[@]}" copy "$c" "$rootfs" / >/dev/null
  "${BR[@]}" config --cmd '["python3"]' --env LANG=C.UTF-8 \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$c"
  "${BR[@]}" commit -q --rm "$c" "$BASE" >/dev/null
fi
echo "    base image $BASE after $((SECONDS - t0))s"

t1=$SECONDS
step "[2/4] buildah bud --pull=never the Dockerfile FROM $BASE"
# pip inside the build uses the host's network and CA bundle, as `docker build` would.
"${BR[@]}" bud --pull=never --isolation chroot --layers=false \
  --build-arg "BASE_IMAGE=$BASE" --build-arg "VERSION=$VERSION" \
  -v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro \
  -t "$IMAGE" -f "$ROOT/Dockerfile" "$ROOT" >"$CACHE/bud.log" 2>&1 ||
  { tail -n 40 "$CACHE/bud.log"; exit 1; }
echo "    $IMAGE built in $((SECONDS - t1))s"

step "[3/4] pause image"
work=$CACHE/pause-root
rm -rf "$work" && mkdir -p "$work"
gcc -Os -static -o "$work/pause" "$ROOT/scripts/node/pause.c"
c=$("${BR[@]}" from scratch)
"${BR[@]}" copy "$c" "$work/pause" /pause >/dev/null
"${BR[@]}" config --entrypoint '["/pause"]' "$c"
"${BR[@]}" commit -q --rm "$c" "$PAUSE" >/dev/null

step "[4/4] OCI archives in $OUT"
for pair in "perseus:$IMAGE" "pause:$PAUSE"; do
  name=${pair%%:*} ref=${pair#*:}
  rm -f "$OUT/$name.tar"
  "${BR[@]}" push -q "$ref" "oci-archive:$OUT/$name.tar:$ref" >/dev/null
done
"${BR[@]}" rmi --prune >/dev/null 2>&1 || true
echo "$IMAGE: $("${BR[@]}" images --format '{{.Size}}' "$IMAGE" | head -n 1), archive $(du -h "$OUT/perseus.tar" | cut -f1)"
echo "image build: $((SECONDS - t0))s"
