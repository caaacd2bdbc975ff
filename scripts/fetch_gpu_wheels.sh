#!/usr/bin/env bash
# Fetch, on this host, the wheels the device check (scripts/gpu_check.sh) installs on a GPU machine
# that has PyTorch and Triton but no FlashInfer and no package index. They go to .whl/ (ignored by
# git), which a device call carries.
#
# FlashInfer 0.6.12, not the 0.7.2 that SGLang 0.5.23 pins for CUDA (requirements/cuda.lock):
# 0.7.2's wheel alone is 62 MiB and a device call carries at most 64 MiB with the repository
# (24 MB). The calls this project makes (BatchPrefillWithPagedKVCacheWrapper plan/run,
# merge_state_in_place) have the same signatures in both. Only the imported dependencies are
# fetched: flashinfer imports cuDNN's frontend and cuda-tile conditionally, and the CuTe-DSL
# packages only for kernels this project does not call.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="${DEST:-$ROOT/.whl}"
PY_VERSION="${PY_VERSION:-3.12}"   # the device image's python3 (KINDS.md: 3.12.3)
WHEELS=(flashinfer-python==0.6.12 apache-tvm-ffi==0.1.15.post2)
mkdir -p "$DEST"
python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version "$PY_VERSION" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$DEST" "${WHEELS[@]}" 2> >(grep -v "is ignored" >&2)
du -sh "$DEST"
