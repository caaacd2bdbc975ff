"""OWL checkpoints: the folder format (config.json, the drafter's safetensors, an optional draft
vocabulary), reading and checking it, loading a drafter onto a target's embedding and LM head, and
the target fingerprint that keeps a checkpoint off a target it was not trained for."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sgl_longspec.drafters.owl.model import (CONFIG_NAME, VOCAB_NAME, WEIGHTS_NAME, OwlConfig,
                                             OwlModel, _weight_of)

# Embedding rows probed for the target fingerprint (taken modulo the vocab size).
_PROBE_IDS = (0, 1, 2, 7, 100, 1000, 4096, 9999, 12345, 30000, 40000, 49151)


def target_fingerprint(embedding: Any) -> dict:
    """A small, dtype-tolerant fingerprint of the target's embedding: shape and a few row norms."""
    w = _weight_of(embedding)
    v, h = w.shape
    ids = sorted({i % v for i in _PROBE_IDS})
    with torch.no_grad():
        norms = w[torch.tensor(ids, device=w.device)].float().norm(dim=-1).cpu().tolist()
    return {"vocab": int(v), "hidden": int(h), "probe_ids": ids,
            "probe_norms": [round(float(x), 5) for x in norms]}


def verify_fingerprint(expected: dict, embedding: Any, rtol: float = 0.03) -> None:
    if not expected:
        return
    got = target_fingerprint(embedding)
    if expected.get("probe_ids") != got["probe_ids"] or not expected.get("probe_norms"):
        return  # different probe set (older format): shapes were already checked
    a = np.asarray(expected["probe_norms"], dtype=np.float64)
    b = np.asarray(got["probe_norms"], dtype=np.float64)
    if a.shape != b.shape or not np.allclose(a, b, rtol=rtol, atol=1e-4):
        raise ValueError(
            "drafter checkpoint was trained for a different target model: embedding fingerprint "
            f"mismatch (expected row norms {a.round(4).tolist()}, got {b.round(4).tolist()}); pass "
            "check_fingerprint=False to override")


def build_drafter(target_embedding: Any, target_lm_head: Any, n_predict: int = 4,
                  proj_dim: int = 512, target_model: str = "") -> OwlModel:
    """A freshly initialised drafter for a target (shapes and fingerprint taken from it)."""
    w = _weight_of(target_embedding)
    cfg = OwlConfig(hidden_size=int(w.shape[1]), vocab_size=int(w.shape[0]), n_predict=n_predict,
                    proj_dim=proj_dim, target_model=target_model,
                    target_fingerprint=target_fingerprint(target_embedding))
    return OwlModel(cfg, target_embedding, target_lm_head)


def read_config(path: str | os.PathLike) -> OwlConfig:
    path = Path(path)
    cfg_file = path / CONFIG_NAME
    if not path.is_dir():
        raise ValueError(f"drafter checkpoint {path} is not a directory")
    if not cfg_file.is_file():
        raise ValueError(f"drafter checkpoint {path} has no {CONFIG_NAME}")
    try:
        d = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"drafter checkpoint {cfg_file} is not valid JSON: {e}") from e
    return OwlConfig.from_dict(d)


def check_checkpoint_files(path: str | os.PathLike) -> OwlConfig:
    """The checkpoint's files alone (no target needed, no tensor loaded): config.json valid, and
    every safetensors file present with a readable header that its size covers (a truncated
    download fails here). Raises ``ValueError`` naming the file."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    cfg = read_config(path)
    for name, required in ((WEIGHTS_NAME, True), (VOCAB_NAME, False)):
        f = path / name
        if not f.is_file():
            if required:
                raise ValueError(f"drafter checkpoint {path} has no {name}")
            continue
        try:
            with safe_open(str(f), "pt") as st:
                st.keys()
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise ValueError(f"drafter checkpoint {f} is corrupt: {e}") from e
    return cfg


def load_drafter(path: str | os.PathLike, target_embedding: Any, target_lm_head: Any,
                 device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                 check_fingerprint: bool = True) -> OwlModel:
    """Load a drafter checkpoint folder and attach it to the target's embedding and LM head
    (tensors [vocab, hidden] or modules with such a ``.weight``; held by reference). Raises
    ``ValueError`` naming the problem for a corrupt or mismatched checkpoint."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    cfg = check_checkpoint_files(path)
    emb = _weight_of(target_embedding)
    head = _weight_of(target_lm_head)
    if emb.shape[1] != cfg.hidden_size or head.shape[1] != cfg.hidden_size:
        raise ValueError(
            f"drafter checkpoint {path} has hidden size {cfg.hidden_size} but the target's is "
            f"{emb.shape[1]} (embedding) / {head.shape[1]} (LM head)")
    if emb.shape[0] != cfg.vocab_size or head.shape[0] != cfg.vocab_size:
        raise ValueError(
            f"drafter checkpoint {path} has vocab size {cfg.vocab_size} but the target's is "
            f"{emb.shape[0]} (embedding) / {head.shape[0]} (LM head)")
    fp = cfg.target_fingerprint or {}
    if fp and (fp.get("vocab", cfg.vocab_size) != cfg.vocab_size
               or fp.get("hidden", cfg.hidden_size) != cfg.hidden_size):
        raise ValueError(f"drafter checkpoint {path}: config.json fingerprint disagrees with its "
                         "hidden/vocab size")
    if check_fingerprint:
        try:
            verify_fingerprint(fp, emb)
        except ValueError as e:
            raise ValueError(f"drafter checkpoint {path}: {e}") from None
    wfile = path / WEIGHTS_NAME
    try:
        state = load_file(str(wfile))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise ValueError(f"drafter checkpoint {wfile} is corrupt: {e}") from e
    model = OwlModel(cfg, target_embedding, target_lm_head)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise ValueError(f"drafter checkpoint {wfile} is missing tensor(s): {', '.join(missing)}")
    if unexpected:
        raise ValueError(f"drafter checkpoint {wfile} has unexpected tensor(s): {', '.join(unexpected)}")
    bad = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
           if tuple(state[k].shape) != tuple(v.shape)]
    if bad:
        raise ValueError(f"drafter checkpoint {wfile} has tensor(s) of the wrong shape: {'; '.join(bad)}")
    nonfinite = [k for k, v in state.items() if not torch.isfinite(v).all()]
    if nonfinite:
        raise ValueError(f"drafter checkpoint {wfile} has non-finite values in: {', '.join(nonfinite)}")
    model.load_state_dict(state)
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    vfile = path / VOCAB_NAME
    if vfile.is_file():
        try:
            ids = load_file(str(vfile))["ids"]
        except (SafetensorError, OSError, RuntimeError, ValueError, KeyError) as e:
            raise ValueError(f"drafter checkpoint {vfile} is corrupt: {e}") from e
        try:
            model.set_draft_vocab(ids)
        except ValueError as e:
            raise ValueError(f"drafter checkpoint {vfile}: {e}") from e
    return model.eval()


def load_drafter_for_model(path: str | os.PathLike, model: nn.Module, **kw) -> OwlModel:
    """Convenience for a Hugging Face causal LM: shares ``get_input_embeddings()`` and
    ``get_output_embeddings()``."""
    return load_drafter(path, model.get_input_embeddings(), model.get_output_embeddings(), **kw)


def fingerprint_digest(fp: dict) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]
