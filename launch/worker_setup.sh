#!/usr/bin/env bash
# Makes the Python environment for vqddm_jax on one TPU VM worker, then checks it.
#
#   bash worker_setup.sh          (`python launch/tpu.py setup` copies it with requirements.txt to every worker
#                                  and runs it on all of them at once)
#
# TPU VM base images (tpu-ubuntu2204-base) come with Python 3.10, and JAX 0.10.2 needs 3.11 or newer: uv
# installs a standalone Python 3.11 and makes the environment with it. Then requirements.txt, the TPU build
# of JAX (libtpu) and TensorFlow's GCS file system (gs:// work directories). Running it again updates the
# environment in place. An environment of the wrong Python version is made again only when this script made it
# (it holds the file .vqddm_venv); any other directory at that path is left alone and the script fails.
# Settings (environment variables): VQDDM_HOME (default $HOME), VQDDM_VENV (default $VQDDM_HOME/vqddm_venv),
# PYTHON_VERSION (3.11), JAX_VERSION (0.10.2), TF_VERSION (2.21.0).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BASE=${VQDDM_HOME:-$HOME}
VENV=${VQDDM_VENV:-$BASE/vqddm_venv}
PYTHON_VERSION=${PYTHON_VERSION:-3.11}
JAX_VERSION=${JAX_VERSION:-0.10.2}
TF_VERSION=${TF_VERSION:-2.21.0}
# Written into every environment this script makes: the only kind it will ever delete.
VENV_MARKER=.vqddm_venv

log() {
  echo "[worker_setup $(hostname)] $*"
}

# requirements.txt sits next to this script when `setup` copied them, one folder up in a synced tree.
find_requirements() {
  local candidate
  for candidate in "$HERE/requirements.txt" "$HERE/../requirements.txt"; do
    if [[ -f $candidate ]]; then
      echo "$candidate"
      return
    fi
  done
  echo "worker_setup.sh: no requirements.txt next to $HERE or above it" >&2
  return 1
}

install_uv() {
  export PATH=$HOME/.local/bin:$PATH
  if command -v uv >/dev/null; then
    return
  fi
  log "installing uv"
  if python3 -m pip --version >/dev/null 2>&1; then
    python3 -m pip install --user --quiet --upgrade uv
  else
    curl -LsSf https://astral.sh/uv/install.sh | sh
  fi
  command -v uv >/dev/null || {
    echo "worker_setup.sh: uv is not on PATH after installing it" >&2
    return 1
  }
}

make_venv() {
  if [[ -x $VENV/bin/python ]] && "$VENV/bin/python" -c \
    "import sys; sys.exit(sys.version_info[:2] != tuple(map(int, '$PYTHON_VERSION'.split('.'))))"; then
    log "keeping $VENV ($("$VENV/bin/python" --version))"
    return
  fi
  if [[ -e $VENV || -L $VENV ]] && [[ ! -f $VENV/$VENV_MARKER ]]; then
    echo "worker_setup.sh: $VENV exists but is not a Python $PYTHON_VERSION environment that this script made" \
      "(no $VENV_MARKER in it): left as it is; move it away or set VQDDM_VENV to another path" >&2
    return 1
  fi
  log "making $VENV with Python $PYTHON_VERSION"
  uv python install "$PYTHON_VERSION"
  rm -rf "$VENV"
  # Whatever uv leaves at $VENV from here on is ours (the path was free): marked, or removed when uv fails.
  if ! uv venv --python "$PYTHON_VERSION" "$VENV"; then
    rm -rf "$VENV"
    return 1
  fi
  echo "Made by vqddm's launch/worker_setup.sh, which may delete and make this environment again." \
    >"$VENV/$VENV_MARKER"
}

install_packages() {
  local requirements
  requirements=$(find_requirements)
  log "installing $requirements, jax[tpu]==$JAX_VERSION, tensorflow-cpu[gcs-filesystem]==$TF_VERSION"
  # One resolution for all three: the TPU extra adds libtpu to the pinned jax; the GCS extra adds TensorFlow's
  # gs:// file system for the input pipeline and TensorBoard summaries.
  uv pip install --python "$VENV/bin/python" -r "$requirements" "jax[tpu]==$JAX_VERSION" \
    "tensorflow-cpu[gcs-filesystem]==$TF_VERSION"
}

# The environment check: imports and versions, then the TPU itself. On a pod slice every worker has to start
# the TPU runtime at the same time (setup runs this on all workers at once).
check() {
  log "checking the environment"
  "$VENV/bin/python" - "$JAX_VERSION" <<'EOF'
import sys

import etils.epath  # noqa: F401  (gs://-capable paths for Orbax and the preflight)
import flax
import jax
import orbax.checkpoint  # noqa: F401
import tensorflow as tf

want = sys.argv[1]
if sys.version_info < (3, 11) or jax.__version__ != want:
  sys.exit(f"worker_setup check FAILED: Python {sys.version.split()[0]}, jax {jax.__version__} (want 3.11+, {want})")
devices = jax.devices()
found = (f"Python {sys.version.split()[0]}, jax {jax.__version__}, flax {flax.__version__}, tensorflow {tf.__version__}; "
         f"process {jax.process_index()}/{jax.process_count()}, {jax.local_device_count()} local / {len(devices)} "
         f"global devices ({devices[0].platform})")
if devices[0].platform != "tpu":
  sys.exit(f"worker_setup check FAILED: JAX does not see a TPU: {found}")
print(f"worker_setup check ok: {found}", flush=True)
EOF
}

install_uv
make_venv
install_packages
check
