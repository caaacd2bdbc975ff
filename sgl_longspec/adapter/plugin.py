"""SGLang plugin entry point (group `sglang.srt.plugins`).

SGLang calls `register()` in the launcher, the engine, and in every scheduler and detokenizer
process, so it must be idempotent and cheap. It wires in, through SGLang's public routes only:
- the CPU support layer where CUDA is absent (the sgl_kernel shim);
- LONGSPEC's attention backends under their own names (`longspec_cpu`, `longspec_flashinfer`);
  stock backends stay untouched, and a LONGSPEC server selects its backend by itself;
- HookRegistry hooks: the `--longspec-*` flags on SGLang's own argument parser, and the request
  check that turns an out-of-vocabulary token id into a 400 on every server, and SGLang's
  external-corpus endpoints on a LONGSPEC server (`corpus_endpoints`), and the req_to_token row
  width of a LONGSPEC server (`adapter.algorithm.register_row_sizing`);
- the LONGSPEC speculative algorithm.

An SGLang outside the supported range fails loudly: the error is logged here, and a server asked
for LONGSPEC stops at argument validation with the supported range in the message (a plain server
is left alone). Any other failure propagates (SGLang logs it with its traceback): LONGSPEC never
disappears silently.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("sgl_longspec")
_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    from sgl_longspec import cpu
    from sgl_longspec.adapter import sglang_compat

    on_cpu = cpu.prepare_environment()
    problem = sglang_compat.version_problem()
    if problem:
        logger.error("sgl-longspec: %s", problem)
        from sgl_longspec.adapter.algorithm import register_unsupported

        register_unsupported(problem)
        return
    from sgl_longspec.attention import registration as attention_backends
    from sgl_longspec.adapter import corpus_endpoints
    from sgl_longspec.adapter import request_checks
    from sgl_longspec.adapter.cli_flags import register_cli_hooks
    from sgl_longspec.adapter.algorithm import register_longspec_algorithm, register_row_sizing

    attention_backends.register(on_cpu)
    register_cli_hooks()
    request_checks.register()
    corpus_endpoints.register()
    sglang_compat.register_load_hook()
    register_row_sizing()
    register_longspec_algorithm()
