"""Which models the GPU backend's hybrid verify path serves exactly: decided once, at start-up.

The hybrid path (attention/flashinfer_hybrid.py) computes plain softmax attention with one scale
for every layer, from K/V in the query's dtype, over the slot ids that req_to_token holds. A model
outside that verifies through SGLang's own FlashInfer path instead (the dense custom mask of the
LONGSPEC verify input, which handles each of these cases), with one logged reason, rather than
giving wrong numbers or raising in the middle of a forward:
- sliding-window layers (the hybrid path would attend the whole prefix);
- logit soft-capping (the kernels have no cap);
- cross-attention (encoder-decoder models);
- a KV cache in another dtype than the queries (FP8 KV: the tree kernel reads K/V in the query's
  dtype and has no scales);
- a pool whose slot ids need translation (SGLang's KVIndexTranslator maps req_to_token's virtual
  ids to physical ones; the dense path reads through it);
- layers that differ in softmax scale or head shape (the plan is made once per step, before the
  first layer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from sgl_longspec.adapter import sglang_compat


@dataclass(frozen=True)
class HybridShape:
    """What one verify step's plan needs of the model's attention (per tensor-parallel rank)."""

    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    v_head_dim: int
    sm_scale: float
    q_dtype: torch.dtype
    kv_dtype: torch.dtype


def attention_layers(model: torch.nn.Module) -> list:
    """The model's RadixAttention layers, in layer order."""
    RadixAttention = sglang_compat.name("RadixAttention")
    layers = [m for m in model.modules() if isinstance(m, RadixAttention)]
    return sorted(layers, key=lambda m: m.layer_id)


def hybrid_refusal(model_runner, layers: list) -> Optional[str]:
    """Why the hybrid verify path cannot serve this model exactly; None when it can."""
    if not layers:
        return "no RadixAttention layers found in the model"
    if model_runner.model_config.is_encoder_decoder or any(l.is_cross_attention for l in layers):
        return "cross-attention layers (encoder-decoder model)"
    windows = sorted({l.sliding_window_size for l in layers if l.sliding_window_size > 0})
    if model_runner.sliding_window_size is not None or windows:
        return f"sliding-window attention layers (window {windows or model_runner.sliding_window_size})"
    caps = sorted({float(l.logit_cap) for l in layers if l.logit_cap and l.logit_cap > 0})
    if caps:
        return f"logit soft-capping (logit_cap {caps})"
    if model_runner.kv_cache_dtype != model_runner.dtype:
        return (f"a {model_runner.kv_cache_dtype} KV cache for {model_runner.dtype} queries "
                f"(--kv-cache-dtype): the tree kernel reads K/V in the query's dtype, unscaled")
    translator = getattr(model_runner, "kv_index_translator", None)
    if translator is not None and (getattr(translator, "reads_are_translated", False)
                                   or getattr(translator, "needs_read_translate", False)):
        return "a KV pool whose slot ids are translated (SGLang's KVIndexTranslator)"
    shapes = {_shape_key(l) for l in layers}
    if len(shapes) > 1:
        return f"layers with different softmax scales or head shapes: {sorted(shapes)}"
    return None


def _shape_key(layer) -> tuple:
    return (layer.tp_q_head_num, layer.tp_k_head_num, layer.qk_head_dim, layer.v_head_dim,
            float(layer.scaling))


def hybrid_shape(model_runner, layers: list) -> HybridShape:
    """The plan's shape, for a model hybrid_refusal accepted (every layer has this one)."""
    hq, hkv, d, dv, scale = _shape_key(layers[0])
    return HybridShape(hq, hkv, d, dv, scale, model_runner.dtype, model_runner.kv_cache_dtype)
