"""Everything SGLang needs to serve on a machine without CUDA, in one place.

`prepare_environment()` is called by the plugin in every SGLang process (and by the CLI before
SGLang is imported). It does nothing when CUDA is present. Otherwise it:
- turns on SGLang's CPU engine (SGLANG_USE_CPU_ENGINE=1) unless the user set it;
- keeps SGLang's TP groups off NCCL (see the comment in the function);
- makes `import sgl_kernel` resolve to the pure-PyTorch shim in ./_shim when the real CPU build of
  sgl_kernel is not importable (it is not on PyPI).
The verify-capable CPU attention backend is registered under its own name, `longspec_cpu`, by
sgl_longspec.attention.registration; SGLang's `torch_native` is left as it is.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from pathlib import Path

logger = logging.getLogger("sgl_longspec")

SHIM_DIR = str(Path(__file__).parent / "_shim")


def cuda_present() -> bool:
    import torch

    return torch.cuda.is_available()


def _real_sgl_kernel_importable() -> bool:
    spec = importlib.util.find_spec("sgl_kernel")
    if spec is None or (spec.origin or "").startswith(SHIM_DIR):
        return False
    try:
        import sgl_kernel  # noqa: F401
    except Exception as e:  # noqa: BLE001 - a build for another machine fails in many ways
        logger.info("the installed sgl_kernel does not load here (%r): using the CPU shim", e)
        for name in [m for m in sys.modules if m == "sgl_kernel" or m.startswith("sgl_kernel.")]:
            del sys.modules[name]
        return False
    return True


def install_sgl_kernel_shim() -> None:
    """Put the shim first on sys.path here and (through PYTHONPATH) in child processes."""
    if SHIM_DIR not in sys.path:
        sys.path.insert(0, SHIM_DIR)
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if SHIM_DIR not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([SHIM_DIR, *parts])


def prepare_environment() -> bool:
    """Idempotent and safe to call before SGLang is imported; True when CUDA is absent (the CPU
    support layer is then active in this process and its children)."""
    if cuda_present():
        return False
    os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")
    # SGLang's TP groups try NCCL (PyNcclCommunicator) whenever the NCCL library loads, and the
    # CUDA build of torch that SGLang pins ships one; on a CPU that then asks for a CUDA device.
    # With no loadable library PyNccl disables itself, and CPU all-reduce goes through the gloo
    # group (or the shared-memory kernel where the CPU has AMX).
    os.environ.setdefault("SGLANG_NCCL_SO_PATH", NO_NCCL)
    if not _real_sgl_kernel_importable():
        install_sgl_kernel_shim()
    return True


NO_NCCL = "/nonexistent/sgl-longspec-cpu/no-nccl-on-cpu.so"


def threads_bind(ranks: int, cores: int | None = None) -> str:
    """SGLANG_CPU_OMP_THREADS_BIND for `ranks` processes on this machine's cores, split evenly
    ("0|1" for 2 ranks on 2 cores): SGLang's CPU engine otherwise wants one NUMA node per rank."""
    cores = cores or os.cpu_count() or 1
    if ranks > cores:
        raise ValueError(f"{ranks} ranks (--tp x --dp) need at least {ranks} CPU cores; this "
                         f"machine has {cores}")
    per, extra = divmod(cores, ranks)
    groups, start = [], 0
    for r in range(ranks):
        n = per + (1 if r < extra else 0)
        groups.append(str(start) if n == 1 else f"{start}-{start + n - 1}")
        start += n
    return "|".join(groups)

