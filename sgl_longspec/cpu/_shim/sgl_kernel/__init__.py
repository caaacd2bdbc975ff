"""CPU stand-in for the `sgl_kernel` package (pure PyTorch), used only where CUDA is absent.

SGLang's CPU engine imports a handful of `sgl_kernel.*_cpu` ops at module level; the real CPU
build of sgl_kernel is not on PyPI. sgl_longspec.cpu.prepare_environment() puts this folder on sys.path only
when no CUDA device exists and the real package is not importable. Names not defined here raise
ImportError as usual, so SGLang's own fallbacks for optional kernels keep working.
"""

from sgl_longspec.cpu.ops import (  # noqa: F401
    assign_draft_cache_locs_contiguous_cpu,
    assign_extend_cache_locs_cpu,
    assign_req_to_token_pool_cpu,
    build_tree_kernel_efficient_cpu,
    copy_all_layer_kv_cache_cpu,
    fill_accept_out_cache_loc_cpu,
    fill_bonus_tokens_cpu,
    rotate_input_ids_cpu,
    verify_tree_greedy_cpu,
)

__version__ = "0.0.0+sgl_longspec_cpu_shim"
LONGSPEC_CPU_SHIM = True
