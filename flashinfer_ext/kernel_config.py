"""Launch configurations of the ragged attention kernel (flashinfer_ext.triton_tree) on CUDA.

Chosen from the compiler, not from a GPU: the kernel is compiled for sm_90a through Triton's
target API and `ptxas -v` reports its registers, spills and shared memory
(flashinfer_ext.kernel_resources; tests/test_kernel_resources.py compiles every configuration this
module can return and fails on a spill). What the search over BLOCK_M x BLOCK_N x warps found
(2026-12-07, triton 3.8.0, GROUP 4, with the tree mask):
- four warps spill at every BLOCK_M >= 32 with BLOCK_N 64 (bf16, head dim 128, BLOCK_M 64,
  BLOCK_N 64, 4 warps, the previous default: 255 registers and 1 KB of spill stores);
- eight warps hold a 32-row block at head dim 128 without spills (218 registers in 16-bit
  types, 222 in float32); 64 rows at head dim 128 need all 255 registers even with 8 warps, so
  blocks stop at 32 rows there (a 64-row request gets two row blocks);
- float32 (the IEEE dot used for exact float32 verification) needs half the key block of 16-bit
  types at head dim 128;
- head dim 256 holds 32-row blocks with 8 warps and 32 keys (16 in float32).
Shared memory stays far below the H100's 227 KB per block in every configuration here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Stages of the software pipeline: two overlap the next KV tile's load with this tile's math;
# more only add shared memory for a kernel that is bound by its gathers from the token pool.
NUM_STAGES = 2


@dataclass(frozen=True)
class LaunchConfig:
    block_m: int  # query rows (query tokens x the GQA group) per program
    block_n: int  # keys per inner iteration
    num_warps: int
    num_stages: int = NUM_STAGES


# (float32?, padded head dim) -> {BLOCK_M: (BLOCK_N, warps)}, from ptxas -v for sm_90a (above).
_NO_SPILL = {
    (False, 64): {16: (64, 4), 32: (64, 8), 64: (32, 8)},
    (False, 128): {16: (64, 8), 32: (64, 8)},
    (False, 256): {16: (32, 8), 32: (32, 8)},
    (True, 64): {16: (32, 8), 32: (64, 8)},
    (True, 128): {16: (32, 8), 32: (32, 8)},
    (True, 256): {16: (16, 8), 32: (16, 8)},
}
ROW_BLOCKS = (16, 32, 64)  # BLOCK_M candidates: the smallest that holds a request's rows


def padded_head_dim(head_dim: int) -> int:
    """The kernel's BLOCK_D: the head dimension rounded up to a power of two, at least 16."""
    return max(16, 1 << max(0, int(head_dim) - 1).bit_length())


def supported_head_dims() -> tuple[int, ...]:
    return tuple(sorted({d for _, d in _NO_SPILL}))


def cuda_launch_config(dtype: torch.dtype, head_dim: int, rows: int) -> LaunchConfig:
    """The configuration for a launch whose longest request has `rows` query rows (query tokens
    x GQA group). Raises for a head dimension no configuration was checked for."""
    bd = padded_head_dim(head_dim)
    table = _NO_SPILL.get((dtype == torch.float32, bd))
    if table is None:
        raise ValueError(f"the Triton tree kernel has no checked CUDA configuration for head dim "
                         f"{head_dim} (checked: {supported_head_dims()})")
    fits = [m for m in ROW_BLOCKS if m in table and m >= rows]
    block_m = fits[0] if fits else max(table)
    block_n, warps = table[block_m]
    return LaunchConfig(block_m, block_n, warps)


def all_cuda_launch_configs(dtype: torch.dtype, head_dim: int) -> list[LaunchConfig]:
    """Every configuration cuda_launch_config can return for this dtype and head dim."""
    return sorted({cuda_launch_config(dtype, head_dim, rows) for rows in (1, *ROW_BLOCKS, 10**6)},
                  key=lambda c: c.block_m)
