#!/usr/bin/env bash
# The device check of the GPU attention path, sized to a lent machine's budget (under 6 minutes
# with FlashInfer's JIT, one call): the kernel and wrapper tests on CUDA, then a reduced timing
# table (64K context, trees of 16 and 64, batch 1 and 16: hybrid vs dense custom mask vs one
# decode step, Llama-3.1-8B layer shapes). Results and logs go to $OUT (./gpu_out by default).
#
#   bash scripts/fetch_gpu_wheels.sh           # on the host, once: FlashInfer into .whl/
#   bash scripts/gpu_check.sh                  # on the GPU machine, from the repository root
#   bash scripts/gpu_check.sh --dry-run        # anywhere: the same steps at CPU sizes (CI runs it)
#
# Each phase has its own time limit, so that a slow JIT cannot eat the table's time; without
# .whl/ the FlashInfer cases are skipped and the table has the Triton-only methods (said in the
# output). The device machine has no SGLang: tests that need it skip themselves there.
set -uo pipefail
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/gpu_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
[ -x "$ROOT/.venv/bin/python" ] && [ $DRY = 1 ] && PY="$ROOT/.venv/bin/python"
TESTS=(tests/test_attention_triton.py tests/test_attention_reference.py tests/test_gpu_backend.py)
BENCH=(benchmarks/bench_verify_attention_gpu.py --contexts 65536 --trees 16 64 --batch 1 16
       --reps 10 --warmup 3 --save "$OUT")
LIMIT_INSTALL=60 LIMIT_TESTS=200 LIMIT_BENCH=90   # seconds; 350 in all
methods=(hybrid hybrid_tri dense decode)

if [ $DRY = 1 ]; then
  echo "[gpu_check] dry run: CPU sizes, the Triton kernel in its interpreter, no FlashInfer"
  BENCH=(benchmarks/bench_verify_attention_gpu.py --dry-run --save "$OUT")
  TESTS=(tests/test_gpu_backend.py)  # the interpreter's kernel tests run in the suite already
else
  export FLASHINFER_WORKSPACE_BASE="${FLASHINFER_WORKSPACE_BASE:-/tmp/fi_cache}"  # JIT cache
  export FLASHINFER_CUDA_ARCH_LIST="${FLASHINFER_CUDA_ARCH_LIST:-9.0a}"  # H100/H200: one target
  export MAX_JOBS="${MAX_JOBS:-16}"
  if ls .whl/*.whl >/dev/null 2>&1; then
    timeout $LIMIT_INSTALL "$PY" -m pip install -q --no-index --no-deps --no-compile \
      --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || echo "[gpu_check] install failed"
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "[gpu_check] no .whl/ (scripts/fetch_gpu_wheels.sh): FlashInfer cases skipped"
    methods=(hybrid_tri)  # dense and decode would time PyTorch fallbacks, not baselines
  fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

"$PY" - <<'PY' 2>&1 | tee "$OUT/env.txt"
import platform
import torch
import triton
try:
    import flashinfer
    fi = flashinfer.__version__
except Exception as e:  # noqa: BLE001 - reported, not fatal
    fi = f"not importable ({type(e).__name__}: {e})"
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
print("python", platform.python_version(), "torch", torch.__version__, "triton", triton.__version__,
      "flashinfer", fi, "gpu", gpu)
PY

rc=0
timeout $LIMIT_TESTS "$PY" -m pytest -q -ra -p no:cacheprovider "${TESTS[@]}" 2>&1 \
  | tee "$OUT/pytest.log" | tail -15
[ "${PIPESTATUS[0]}" = 0 ] || { echo "[gpu_check] tests failed or ran past ${LIMIT_TESTS}s"; rc=1; }
if [ $DRY = 1 ]; then
  "$PY" "${BENCH[@]}" 2>&1 | tee "$OUT/bench.log" | tail -8
else
  timeout $LIMIT_BENCH "$PY" "${BENCH[@]}" --methods "${methods[@]}" 2>&1 \
    | tee "$OUT/bench.log" | tail -12
fi
[ "${PIPESTATUS[0]}" = 0 ] || { echo "[gpu_check] benchmark failed or ran past its limit"; rc=1; }
ls "$OUT"
exit $rc
