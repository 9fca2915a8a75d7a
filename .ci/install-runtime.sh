#!/usr/bin/env bash
# Install the device runtime (no torch) into a virtual environment: the Dockerfile's
# install steps, kept here so CI runs them too (no Docker engine on CI machines).
#
#   .ci/install-runtime.sh PREFIX [SRC]
#
# PREFIX  the virtual environment to create (e.g. /opt/reverie)
# SRC     the project source directory (default: the repository holding this script)
set -euo pipefail

PREFIX=${1:?usage: install-runtime.sh PREFIX [SRC]}
SRC=${2:-$(cd "$(dirname "$0")/.." && pwd)}
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}

# hnswlib compiles from source: without -march=native, so the binary runs on every CPU
# of the architecture, not just the build machine's.
export HNSWLIB_NO_NATIVE=1
export PIP_NO_CACHE_DIR=${PIP_NO_CACHE_DIR:-1}
export PIP_DISABLE_PIP_VERSION_CHECK=1
export NUMBA_CACHE_DIR=${NUMBA_CACHE_DIR:-$PREFIX/numba-cache}

"$PYTHON" -m venv "$PREFIX"
"$PREFIX/bin/python" -m pip install --quiet "$SRC"

# Compile numba kernels once, into the cache the runtime will read. The cache belongs to
# the installing user (root) and is only readable by the service user: numba's cache is
# pickled code, so a cache the service could write would run its writes at the next start.
# The daemon copies a read-only cache to a private directory per run (agent/numba_cache.py).
"$PREFIX/bin/python" -m agent.warmup
chmod -R go-w "$NUMBA_CACHE_DIR" && chmod -R a+rX "$NUMBA_CACHE_DIR"

# The runtime must work without torch, and must not even try to import it.
"$PREFIX/bin/python" - <<'PY'
import importlib.util, sys
assert importlib.util.find_spec("torch") is None, "torch must not be installed in the runtime"
import agent.cli, agent.daemon
agent.cli.build_parser()
assert "torch" not in sys.modules
print("runtime ok: agent imports without torch")
PY
"$PREFIX/bin/reverie" --version
