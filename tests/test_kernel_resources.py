"""The Triton tree kernel's CUDA configurations, checked by the compiler on a machine with no GPU.

flashinfer_ext.kernel_config picks BLOCK_M / BLOCK_N / warps per dtype, head dim and rows; every
configuration it can return is compiled for sm_90a (Triton's target API, ptxas -v) and must use
at most 255 registers without spilling and fit the H100's shared memory. What only a GPU shows
(occupancy in practice, timing) is not checked here.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from flashinfer_ext.kernel_config import (LaunchConfig, all_cuda_launch_configs,  # noqa: E402
                                          cuda_launch_config)
from flashinfer_ext.kernel_resources import (H100_MAX_SHARED_BYTES,  # noqa: E402
                                             MAX_REGISTERS_PER_THREAD, compiled_resources)

CASES = [(dtype, d) for dtype in (torch.float16, torch.bfloat16) for d in (64, 128)]


@pytest.mark.parametrize("dtype,head_dim", CASES + [(torch.float32, 128)],
                         ids=lambda v: str(v).replace("torch.", ""))
def test_every_cuda_configuration_compiles_without_spills(dtype, head_dim):
    configs = all_cuda_launch_configs(dtype, head_dim)
    assert len(configs) >= 2  # small and large row blocks both covered
    for config, res in zip(configs, compiled_resources(dtype, head_dim, configs), strict=True):
        assert res.spill_bytes == 0, (config, res.ptxas_report)
        assert res.registers <= MAX_REGISTERS_PER_THREAD
        assert res.shared_bytes <= H100_MAX_SHARED_BYTES, config


def test_the_check_sees_a_spilling_configuration():
    """The old default (64 rows, 64 keys, 4 warps at head dim 128 in bf16) spills: the measurement
    above can fail."""
    [res] = compiled_resources(torch.bfloat16, 128, [LaunchConfig(64, 64, 4)])
    assert res.spill_bytes > 0 and res.registers == MAX_REGISTERS_PER_THREAD


def test_row_blocks_follow_the_rows_and_stop_where_registers_run_out():
    assert cuda_launch_config(torch.bfloat16, 64, 5).block_m == 16
    assert cuda_launch_config(torch.bfloat16, 64, 17).block_m == 32
    assert cuda_launch_config(torch.bfloat16, 64, 200).block_m == 64
    assert cuda_launch_config(torch.bfloat16, 128, 200).block_m == 32  # 64 rows: 255 registers
    assert cuda_launch_config(torch.float32, 128, 17) == LaunchConfig(32, 32, 8)
    assert cuda_launch_config(torch.float16, 96, 1).block_m == 16  # padded to 128
    with pytest.raises(ValueError, match="head dim 512"):
        cuda_launch_config(torch.bfloat16, 512, 1)
