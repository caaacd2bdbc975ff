#!/usr/bin/env bash
# Run on the lent GPU machine from the repository root (see benchmarks/results/verify_attention_gpu/TODO.md).
#   bash scripts/run_on_gpu.sh PHASE
# PHASE: install | test | bench | bench_shared | all. Logs and results go to $OUT (or ./gpu_out).
set -uo pipefail
PHASE=${1:-all}
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
export FLASHINFER_WORKSPACE_BASE=${FLASHINFER_WORKSPACE_BASE:-/tmp/fi_cache}   # JIT cache, kept while warm
export MAX_JOBS=${MAX_JOBS:-16}
export FLASHINFER_CUDA_ARCH_LIST=${FLASHINFER_CUDA_ARCH_LIST:-9.0a}   # H100/H200 only: shorter JIT builds

install() {
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || return 1
  python3 - <<'PY' 2>&1 | tee "$OUT/env.txt"
import torch, triton, flashinfer, platform
print("python", platform.python_version(), "torch", torch.__version__, "triton", triton.__version__,
      "flashinfer", flashinfer.__version__, "gpu", torch.cuda.get_device_name(0))
PY
}

run_tests() {
  # compiles the FlashInfer JIT modules used here (bf16/fp16 prefill, merge) on first use: minutes
  timeout 540 python3 -m pytest -q -ra -p no:cacheprovider tests/test_attention_triton.py \
      tests/test_attention_reference.py 2>&1 | tee "$OUT/pytest.log"
}

bench() {  # bench TAG [extra args]
  local tag=$1; shift
  timeout 560 python3 benchmarks/bench_verify_attention_gpu.py --reps 20 --warmup 5 \
      --save "$OUT" "$@" 2>&1 | tee "$OUT/bench_$tag.log"
}

case "$PHASE" in
  install) install ;;
  test) install && run_tests ;;
  bench) bench plain ;;
  bench_shared) bench shared --shared-frac 0.75 --batch 4 16 32 ;;
  all) install && run_tests && bench plain ;;
  *) echo "unknown phase $PHASE"; exit 2 ;;
esac
