"""SGLang plugin entry point (group `sglang.srt.plugins`).

SGLang calls `register()` in the launcher, the engine, and in every scheduler and detokenizer
process, so it must be idempotent and cheap. It wires in:
- the CPU support layer (only where CUDA is absent): sgl_kernel shim and verify-capable
  attention backend;
- on CUDA, hybrid tree attention for LONGSPEC's verify pass (a subclass of SGLang's flashinfer backend);
- the LONGSPEC speculative algorithm (suffix tree + OWL drafters with a per-request router).
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)
_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    from sgl_longspec import cpu

    if not cpu.activate():
        try:
            from sgl_longspec.gpu_attention import register_gpu_backend

            register_gpu_backend()
        except Exception as e:  # an SGLang build without FlashInfer: stock backends only
            logger.warning("longspec_flashinfer attention backend unavailable: %s", e)
    try:
        from sgl_longspec.sglang_worker import register_longspec_algorithm
    except ImportError:  # worker module not present in this build
        return
    register_longspec_algorithm()
