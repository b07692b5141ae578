#!/usr/bin/env bash
# Proves the training hooks install alone: builds the perseus-hooks wheel from hooks/ (pip, no
# build isolation: offline, the .venv's setuptools), checks that it declares no dependency, installs
# it into a fresh venv that holds nothing else, and there, outside the source tree, imports it and
# runs a smoke test: a wire message round trip, the no-op hooks, and hooks whose sidecar is down
# (training calls return, close does not hang). A few seconds.
# Usage: scripts/hooks-wheel-check.sh        (after scripts/setup.sh)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=$ROOT/.venv/bin/python
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
t0=$SECONDS
# Build from a copy so that the build's egg-info and build/ stay out of the tree.
mkdir "$WORK/src"
cp -r "$ROOT/hooks/pyproject.toml" "$ROOT/hooks/README.md" "$ROOT/hooks/perseus_hooks" "$WORK/src/"
find "$WORK/src" -name __pycache__ -prune -exec rm -rf {} +
"$PY" -m pip wheel -q --no-deps --no-build-isolation --disable-pip-version-check \
  --wheel-dir "$WORK/dist" "$WORK/src" 2>"$WORK/build.log" || { cat "$WORK/build.log" >&2; exit 1; }
wheel=$(ls "$WORK"/dist/perseus_hooks-*.whl)
echo "    built $(basename "$wheel")"
# A venv without pip (nothing in it but the interpreter); the .venv's pip installs into it.
python3 -m venv --without-pip "$WORK/venv"
"$PY" -m pip --python "$WORK/venv/bin/python" install -q --no-index --disable-pip-version-check \
  "$wheel"
cd "$WORK"
"$WORK/venv/bin/python" -I - "$wheel" <<'PY'
"""Runs in the clean venv: the installed hooks alone."""
import importlib.metadata as md
import logging
import socket
import sys
import zipfile

wheel = sys.argv[1]
names = zipfile.ZipFile(wheel).namelist()
assert all(n.startswith(("perseus_hooks/", "perseus_hooks-")) for n in names), names
assert "perseus_hooks/py.typed" in names, "the wheel must ship py.typed"
assert md.requires("perseus-hooks") is None, md.requires("perseus-hooks")
dists = sorted(d.metadata["Name"] for d in md.distributions())
assert dists == ["perseus-hooks"], f"the venv must hold the hooks alone, has {dists}"

before = set(sys.modules)
import perseus_hooks
from perseus_hooks import wire

assert "/venv/" in perseus_hooks.__file__, perseus_hooks.__file__
loaded = {m.split(".")[0] for m in set(sys.modules) - before}
foreign = sorted(t for t in loaded if t not in sys.stdlib_module_names and t != "perseus_hooks")
assert not foreign, f"the hooks imported {foreign}"

# The wire protocol: an event line round trip, a refused line.
line = wire.encode_events([("FB", 3, 123, 1)])
assert wire.parse_event(line.rstrip(b"\n")) == (wire.FORWARD_BEGIN, 3, 123, 1)
try:
    wire.parse_event(b"FB x 1")
except wire.WireError:
    pass
else:
    raise AssertionError("a malformed line must be refused")

# No sidecar host: a no-op.
noop = perseus_hooks.Hooks(None, sync=None)
with noop.instruction("forward", 0):
    pass
assert not noop.enabled

# A sidecar that is down (a port nobody listens on): calls return, one warning, close returns.
warnings = []
log = logging.getLogger("perseus.hooks")
log.addHandler(logging.Handler())
log.handlers[0].emit = warnings.append  # type: ignore[method-assign]
log.propagate = False
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
hooks = perseus_hooks.register(
    rank=0, pipeline_rank=0, data_rank=0, gpu_uuid="GPU-smoke", host="127.0.0.1", port=port,
    job_token="t", sync=None, make_default=False, min_backoff_s=0.05, max_backoff_s=0.05,
)
for m in range(100):
    hooks.instruction_begin("forward", m)
    hooks.instruction_end("forward", m)
hooks.iteration_end()
assert not hooks.flush(0.2), "nothing listens: the events cannot have been sent"
hooks.close(timeout_s=1.0)
assert not hooks.wait_connected(0)
assert any("unavailable" in r.getMessage() for r in warnings), warnings
print(f"    imported from the clean venv; stdlib only; {len(names)} files in the wheel")
PY
echo "hooks wheel check: ok ($((SECONDS - t0)) s)"
