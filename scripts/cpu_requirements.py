"""Print sglang's own requirements minus those that only work with CUDA.

Run inside the target environment after `pip install --no-deps sglang`. Reading the installed
metadata (instead of keeping a copied list) keeps this right when sglang's pins move.
"""
import importlib.metadata as md
import sys

from packaging.requirements import Requirement

# Packages that need CUDA at import or install time, or that sglang's CPU path never imports and
# that would drag in a CUDA torch build (torchaudio, torchcodec, timm pin CUDA torch releases).
CUDA_ONLY_PREFIXES = (
    "sglang-kernel", "sgl-kernel", "flashinfer", "flash-attn", "cuda-python", "nvidia-",
    "nvshmem", "sgl-deep-ep", "sgl-deep-gemm", "sgl-flash-mla", "tilelang", "quack-kernels",
    "humming-kernels", "torch-memory-saver", "torch_memory_saver", "torchaudio", "torchcodec",
    "timm", "deepseek-recipe",
)
# Installed separately with CPU-compatible versions.
SEPARATE = {"torch", "torchvision"}


def main() -> int:
    for raw in md.requires("sglang") or []:
        req = Requirement(raw)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = req.name.lower().replace("_", "-")
        if name in SEPARATE or name.startswith(CUDA_ONLY_PREFIXES):
            continue
        req.marker = None
        print(str(req))
    return 0


if __name__ == "__main__":
    sys.exit(main())
