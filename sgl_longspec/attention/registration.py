"""LONGSPEC's attention backends, registered under their own names through SGLang's registry.

- `longspec_cpu`: SGLang's torch_native backend plus a TARGET_VERIFY path (hybrid tree attention:
  committed prefix unmasked, draft tree masked, merged by log-sum-exp) and the same decomposition
  for prefill chunks over a cached prefix. Stock torch_native cannot verify drafts at all, so this
  is what `sgl-longspec serve` uses on a CPU by default, for every algorithm (NGRAM included).
- `longspec_flashinfer`: SGLang's FlashInfer backend; only a LONGSPEC verify step takes the hybrid
  path (FlashInfer paged prefix + Triton tree kernel, merged by LSE).

Stock backends are never replaced. A LONGSPEC server selects its backend itself
(`select_backend`, called from the algorithm's server-args hook): on CPU `longspec_cpu`, on CUDA
`longspec_flashinfer`; an explicit `flashinfer` keeps SGLang's backend with the dense custom-mask
verify (the baseline of benchmarks/bench_verify_attention_gpu.py).
"""

from __future__ import annotations

from sgl_longspec.adapter import sglang_compat

CPU_BACKEND = "longspec_cpu"
GPU_BACKEND = "longspec_flashinfer"

# Backends a LONGSPEC verify step can run on, per device, and what an unset (or stock CPU)
# choice becomes.
_CPU_ALIASES = {None: CPU_BACKEND, "torch_native": CPU_BACKEND, CPU_BACKEND: CPU_BACKEND}
_GPU_ALIASES = {None: GPU_BACKEND, GPU_BACKEND: GPU_BACKEND, "flashinfer": "flashinfer"}


def _create_cpu(runner):
    from sgl_longspec.attention.cpu_hybrid import LongSpecCPUAttnBackend

    return LongSpecCPUAttnBackend(runner)


def _create_gpu(runner):
    from sgl_longspec.attention.flashinfer_hybrid import create_backend

    return create_backend(runner)


def register(on_cpu: bool) -> None:
    """Idempotent (the plugin runs in every SGLang process)."""
    sglang_compat.add_backend(CPU_BACKEND, _create_cpu)
    sglang_compat.add_backend(GPU_BACKEND, _create_gpu)


def select_backend(device: str, requested: str | None) -> str:
    """The attention backend a LONGSPEC server runs with, given the user's --attention-backend."""
    aliases = _CPU_ALIASES if device == "cpu" else _GPU_ALIASES
    if requested not in aliases:
        accepted = sorted(k for k in aliases if k is not None)
        raise ValueError(
            f"--attention-backend {requested}: LONGSPEC verifies ragged draft trees, which this "
            f"backend cannot do on {device}; use one of {accepted} (or leave it unset)")
    return aliases[requested]
