"""What the ragged attention kernel costs a GPU's multiprocessor, from the compiler alone.

Triton compiles the kernel for a CUDA target without a GPU or a driver (its target API), and
ptxas (shipped with Triton) reports registers, spills and shared memory per configuration. Used by
tests/test_kernel_resources.py to check flashinfer_ext.kernel_config on a machine with no GPU.

The compiles run in a child process: a process that imported triton under TRITON_INTERPRET=1 (the
interpreter tests of the CPU kernels) can no longer compile for a GPU target.

    python -m flashinfer_ext.kernel_resources bfloat16 128 64 64 4    # dtype, head dim, M, N, warps
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from flashinfer_ext.kernel_config import LaunchConfig, padded_head_dim

H100_CAPABILITY = 90
# Largest dynamic shared memory one block may opt into on an H100 (sm_90): 227 KB.
H100_MAX_SHARED_BYTES = 227 * 1024
MAX_REGISTERS_PER_THREAD = 255  # the architectural limit; ptxas spills past it

_TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_INT_ARGS = ("kv_chunk", "m_blocks", "stride_qt", "stride_qh", "stride_kt", "stride_kh",
             "stride_vt", "stride_vh", "stride_os", "stride_ot", "stride_oh", "stride_ls",
             "stride_lt")


@dataclass(frozen=True)
class KernelResources:
    registers: int  # per thread
    spill_bytes: int  # spill stores per thread
    shared_bytes: int  # per block
    ptxas_report: str


def _signature(dtype: torch.dtype) -> dict:
    t = _TRITON_TYPES[dtype]
    sig = {"Q": f"*{t}", "K": f"*{t}", "V": f"*{t}", "O": "*fp32", "LSE": "*fp32",
           "QO_INDPTR": "*i32", "KV_INDPTR": "*i32", "KV_INDICES": "*i32", "MASK": "*u8",
           "MASK_INDPTR": "*i64", "qk_scale_log2": "fp32"}
    sig.update({name: "i32" for name in _INT_ARGS})
    return sig


def compiled_resources(dtype: torch.dtype, head_dim: int, configs: list[LaunchConfig],
                       group: int = 4, has_mask: bool = True,
                       capability: int = H100_CAPABILITY) -> list[KernelResources]:
    """Each configuration's resources, compiled for `capability` in a child process without
    TRITON_INTERPRET (no GPU needed)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    job = dict(dtype=str(dtype).removeprefix("torch."), head_dim=head_dim, group=group,
               has_mask=has_mask, capability=capability,
               configs=[[c.block_m, c.block_n, c.num_warps, c.num_stages] for c in configs])
    run = subprocess.run([sys.executable, "-m", "flashinfer_ext.kernel_resources", "--json",
                          json.dumps(job)], env=env, capture_output=True, text=True, timeout=900)
    if run.returncode:
        raise RuntimeError(f"compiling the kernel failed:\n{run.stderr[-4000:]}")
    return [KernelResources(**r) for r in json.loads(run.stdout.strip().splitlines()[-1])]


def _compile(dtype: torch.dtype, head_dim: int, config: LaunchConfig, group: int, has_mask: bool,
             capability: int) -> KernelResources:
    """Compile the kernel for `capability` in this process and read ptxas -v's report."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    from triton.compiler import ASTSource

    from flashinfer_ext.triton_tree import _ragged_attn_fwd

    consts = dict(GROUP=group, HEAD_DIM=head_dim, BLOCK_D=padded_head_dim(head_dim),
                  BLOCK_M=config.block_m, BLOCK_N=config.block_n, HAS_MASK=has_mask,
                  LSE_BASE2=False, IEEE_FP32=dtype == torch.float32)
    sig = _signature(dtype)
    sig.update({name: "constexpr" for name in consts})
    src = ASTSource(fn=triton.jit(_ragged_attn_fwd), signature=sig, constexprs=consts)
    kernel = triton.compile(src, target=GPUTarget("cuda", capability, 32),
                            options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
    arch = sm_arch_from_capability(capability)
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "kernel.ptx"
        ptx.write_text(kernel.asm["ptx"])
        run = subprocess.run([get_ptxas(capability).path, "-v", f"--gpu-name={arch}", str(ptx),
                              "-o", str(Path(tmp) / "kernel.cubin")],
                             capture_output=True, text=True, check=True)
    report = run.stdout + run.stderr
    regs = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores", report)
    if regs is None:
        raise RuntimeError(f"unexpected ptxas report:\n{report}")
    return KernelResources(int(regs.group(1)), int(spills.group(1)) if spills else 0,
                           int(kernel.metadata.shared), report)


def _main(argv: list[str]) -> int:
    if argv[:1] == ["--json"]:
        job = json.loads(argv[1])
        dtype = getattr(torch, job["dtype"])
        out = [_compile(dtype, job["head_dim"], LaunchConfig(*c), job["group"], job["has_mask"],
                        job["capability"]).__dict__ for c in job["configs"]]
        print(json.dumps(out))
        return 0
    dtype, head_dim, m, n, warps = argv
    res = _compile(getattr(torch, dtype), int(head_dim), LaunchConfig(int(m), int(n), int(warps)),
                   group=4, has_mask=True, capability=H100_CAPABILITY)
    print(res.ptxas_report)
    print(f"registers {res.registers}, spill stores {res.spill_bytes} B, shared {res.shared_bytes} B")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
