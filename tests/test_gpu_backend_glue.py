"""The `longspec_flashinfer` backend class itself on this CPU (issue 28): SGLang's real
FlashInferAttnBackend.__init__ under a real SGLang runtime context (ServerArgs resolved for the
embedded model), SGLang's real token KV pool (MHATokenToKVPool) and write location (KVWriteLoc), a
real LongSpecVerifyInput; only FlashInfer's wrapper classes, which SGLang's __init__ constructs and
this path never plans, are stand-ins bound to FlashInfer's constructor signatures.

On a CPU device the hybrid wrapper computes through the reference (flashinfer_ext.reference), so
a verify step's output is checked against dense tree-verify attention request by request, with and
without the cascade's shared level. The FlashInfer and Triton branches of the wrapper, with zero
read-backs, are checked on the meta device in tests/test_gpu_backend.py; their numbers on CUDA need
a GPU (scripts/gpu_check.sh).
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List, Optional

import pytest
import torch

sglang = pytest.importorskip("sglang", reason="the backend class subclasses SGLang's")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_gpu_backend import _FlashInferPrefillStandIn  # noqa: E402

from flashinfer_ext import reference as ref  # noqa: E402
from sgl_longspec.adapter import sglang_compat  # noqa: E402
from sgl_longspec.adapter.verify_input import verify_input_cls  # noqa: E402
from sgl_longspec.attention import flashinfer_hybrid as H  # noqa: E402
from sgl_longspec.attention.cascade import MinShared  # noqa: E402
from sgl_longspec.drafters.draft import Draft  # noqa: E402
from sgl_longspec.verify.layout import VerifyLayout  # noqa: E402

HQ, HKV, D, LAYERS = 8, 2, 64, 3
SLOTS = 256


class _DecodeWrapperStandIn:
    """flashinfer.BatchDecodeWithPagedKVCacheWrapper's constructor (0.6.12)."""

    def __init__(self, float_workspace_buffer: torch.Tensor, kv_layout: str = "NHD",
                 use_cuda_graph: bool = False, use_tensor_cores: bool = False,
                 paged_kv_indptr_buffer: Optional[torch.Tensor] = None,
                 paged_kv_indices_buffer: Optional[torch.Tensor] = None,
                 paged_kv_last_page_len_buffer: Optional[torch.Tensor] = None,
                 backend: str = "auto", jit_args: Optional[List[Any]] = None) -> None:
        self.workspace = float_workspace_buffer


class _RaggedPrefillWrapperStandIn:
    """flashinfer.BatchPrefillWithRaggedKVCacheWrapper's constructor (0.6.12)."""

    def __init__(self, float_workspace_buffer: torch.Tensor, kv_layout: str = "NHD",
                 use_cuda_graph: bool = False, qo_indptr_buf: Optional[torch.Tensor] = None,
                 kv_indptr_buf: Optional[torch.Tensor] = None,
                 custom_mask_buf: Optional[torch.Tensor] = None,
                 mask_indptr_buf: Optional[torch.Tensor] = None, backend: str = "auto",
                 jit_args: Optional[List[Any]] = None,
                 jit_kwargs: Optional[Dict[str, Any]] = None) -> None:
        self.workspace = float_workspace_buffer


@pytest.fixture
def sglang_runtime(monkeypatch):
    """SGLang's runtime context for the embedded model on CPU (what a scheduler publishes), and
    FlashInfer's wrapper classes where SGLang's backend module would have imported them."""
    from sglang.srt import runtime_context
    from sglang.srt.server_args import ServerArgs

    from sgl_longspec.tools.models import ensure_embedded_model

    fb = inspect.getmodule(sglang_compat.name("FlashInferAttnBackend"))
    monkeypatch.setattr(fb, "BatchDecodeWithPagedKVCacheWrapper", _DecodeWrapperStandIn, raising=False)
    monkeypatch.setattr(fb, "BatchPrefillWithRaggedKVCacheWrapper", _RaggedPrefillWrapperStandIn,
                        raising=False)
    monkeypatch.setattr(fb, "BatchPrefillWithPagedKVCacheWrapper", _FlashInferPrefillStandIn,
                        raising=False)
    saved_env = dict(os.environ)  # SGLang's resolution sets its defaults in the environment
    try:
        args = ServerArgs(model_path=str(ensure_embedded_model()), device="cpu")
        args.resolve_once()
        with runtime_context.use_context(runtime_context.create_context(args, role="test")):
            yield
    finally:
        os.environ.clear()
        os.environ.update(saved_env)


def _model(sliding_window: bool = False):
    RadixAttention = sglang_compat.name("RadixAttention")
    m = torch.nn.Module()
    m.layers = torch.nn.ModuleList(
        RadixAttention(num_heads=HQ, head_dim=D, scaling=D ** -0.5, num_kv_heads=HKV, layer_id=i,
                       sliding_window_size=8 if (sliding_window and i == 1) else -1)
        for i in range(LAYERS))
    return m


def _runner(model, req_to_token_pool, kv_pool):
    """The ModelRunner attributes SGLang's FlashInferAttnBackend.__init__ and LONGSPEC's glue read."""
    config = SimpleNamespace(
        is_encoder_decoder=False, num_attention_heads=HQ, get_num_kv_heads=lambda *a: HKV,
        get_max_num_attention_heads=lambda: HQ, num_key_value_heads=HKV, context_len=64,
        is_multimodal=False, head_dim=D, v_head_dim=D,
        hf_config=SimpleNamespace(architectures=["LlamaForCausalLM"]))
    return SimpleNamespace(
        model=model, model_config=config, sliding_window_size=None, dtype=torch.float32,
        kv_cache_dtype=torch.float32, req_to_token_pool=req_to_token_pool,
        token_to_kv_pool=kv_pool, token_to_kv_pool_allocator=SimpleNamespace(get_kvcache=lambda: kv_pool),
        kv_index_translator=SimpleNamespace(reads_are_translated=False, needs_read_translate=False),
        is_draft_worker=False, server_args=SimpleNamespace(dllm_algorithm=None),
        prefill_attention_backend_str=H.BACKEND_NAME, decode_attention_backend_str=H.BACKEND_NAME,
        page_size=1, device="cpu", use_mla_backend=False, init_new_workspace=False)


def _pools():
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool

    kv = MHATokenToKVPool(size=SLOTS, page_size=1, dtype=torch.float32, head_num=HKV, head_dim=D,
                          layer_num=LAYERS, device="cpu", enable_memory_saver=False)
    return ReqToTokenPool(size=4, max_context_len=64, device="cpu", enable_memory_saver=False), kv


def _verify_step(req_to_token_pool, kv_pool, shared: bool):
    """Three requests (prefixes of 9, 0 and 12 committed tokens; trees of 3, 1 and 4 nodes with the
    root), their prefixes' KV already in the pool. With `shared`, requests 0 and 2 hold the same
    first 6 slots (a radix-cache run), as their radix paths say."""
    g = torch.Generator().manual_seed(0)
    drafts = [Draft.chain([1, 2]), Draft.empty(), Draft([4, 5, 6], [-1, -1, 1])]
    masks = [torch.from_numpy(d.tree_mask(include_root=True)) for d in drafts]
    prefix_lens, rows = [9, 0, 12], [2, 0, 1]
    layout = VerifyLayout(masks, prefix_lens)
    free = (torch.randperm(SLOTS - 1, generator=g) + 1).tolist()  # slot 0 is SGLang's padding slot
    r2t = req_to_token_pool.req_to_token
    tree_slots = []
    for i, (row, p, m) in enumerate(zip(rows, prefix_lens, masks)):
        n = p + m.shape[0]
        slots = [free.pop() for _ in range(n)]
        if shared and i == 2:
            slots[:6] = r2t[rows[0], :6].tolist()
        r2t[row, :n] = torch.tensor(slots, dtype=r2t.dtype)
        tree_slots += slots[p:]
    for layer in range(LAYERS):  # committed prefixes' KV (and noise in every other slot)
        kv_pool.get_key_buffer(layer).copy_(torch.randn(kv_pool.get_key_buffer(layer).shape, generator=g))
        kv_pool.get_value_buffer(layer).copy_(torch.randn(kv_pool.get_value_buffer(layer).shape, generator=g))
    paths = ([((1, 6), (2, 9)), (), ((1, 6), (3, 12))] if shared
             else [((1, 9),), (), ((3, 12),)])
    spec = verify_input_cls()(layout, torch.zeros(sum(layout.q_lens), dtype=torch.int64),
                              max(m.shape[0] for m in masks), rows, radix_paths=paths)
    ForwardMode = sglang_compat.name("ForwardMode")
    batch = SimpleNamespace(forward_mode=ForwardMode.TARGET_VERIFY, spec_info=spec,
                            out_cache_loc=torch.tensor(tree_slots, dtype=torch.int64),
                            out_cache_loc_is_physical=False)
    return batch, layout, rows


def _expected(kv_pool, layer, q, k, v, layout, rows, r2t):
    """Dense tree-verify attention, request by request, over the pool with the tree's K/V in."""
    kc, vc = kv_pool.get_key_buffer(layer).clone(), kv_pool.get_value_buffer(layer).clone()
    out, start = [], 0
    for i, (row, p) in enumerate(zip(rows, layout.prefix_lens)):
        n = layout.q_lens[i]
        slots = r2t[row, :p + n].long()
        kc[slots[p:]], vc[slots[p:]] = k[start:start + n], v[start:start + n]
        out.append(ref.dense_tree_verify_attention(
            q[start:start + n], kc[slots[:p]], vc[slots[:p]], kc[slots[p:]], vc[slots[p:]],
            layout.tree_masks[i].bool(), D ** -0.5))
        start += n
    return torch.cat(out)


@pytest.mark.parametrize("shared", [False, True])
def test_verify_step_plans_once_and_each_layer_equals_dense_attention(sglang_runtime, monkeypatch,
                                                                      shared):
    monkeypatch.setattr(H, "GPU_CASCADE_MIN_SHARED", MinShared.fixed(4))  # the test's 6-slot run
    r2t_pool, kv_pool = _pools()
    backend = H.create_backend(_runner(_model(), r2t_pool, kv_pool))
    assert backend.hybrid_refusal is None and backend._shape.num_qo_heads == HQ
    assert backend._hybrid.backend == "torch"  # a CPU device: the reference computes
    plans = []
    real_plan = backend._hybrid.plan
    monkeypatch.setattr(backend._hybrid, "plan", lambda **kw: (plans.append(kw), real_plan(**kw)))
    batch, layout, rows = _verify_step(r2t_pool, kv_pool, shared)
    backend.init_forward_metadata(batch)
    assert len(plans) == 1 and ("shared_kv_indices" in plans[0]) == shared
    g = torch.Generator().manual_seed(1)
    for layer in _model().layers:  # the per-layer path: write the tree's KV, run
        q = torch.randn(sum(layout.q_lens), HQ * D, generator=g)
        k, v = (torch.randn(sum(layout.q_lens), HKV, D, generator=g) for _ in range(2))
        want = _expected(kv_pool, layer.layer_id, q.view(-1, HQ, D), k, v, layout, rows,
                         r2t_pool.req_to_token)
        got = backend.forward_extend(q, k, v, layer, batch)
        assert got.shape == (sum(layout.q_lens), HQ * D)
        torch.testing.assert_close(got.view(-1, HQ, D), want, rtol=1e-5, atol=1e-5)
        assert torch.equal(kv_pool.get_key_buffer(layer.layer_id)[batch.out_cache_loc], k)
    assert len(plans) == 1


def test_other_steps_and_refused_models_go_to_sglangs_own_flashinfer_path(sglang_runtime,
                                                                          monkeypatch, caplog):
    FlashInferAttnBackend = sglang_compat.name("FlashInferAttnBackend")
    calls = []
    monkeypatch.setattr(FlashInferAttnBackend, "init_forward_metadata",
                        lambda self, fb: calls.append(("metadata", fb.forward_mode)))
    monkeypatch.setattr(FlashInferAttnBackend, "forward_extend",
                        lambda self, *a, **kw: calls.append(("extend",)) or "sglang's")
    r2t_pool, kv_pool = _pools()
    backend = H.create_backend(_runner(_model(), r2t_pool, kv_pool))
    batch, layout, _ = _verify_step(r2t_pool, kv_pool, shared=False)
    ForwardMode = sglang_compat.name("ForwardMode")
    decode = SimpleNamespace(forward_mode=ForwardMode.DECODE, spec_info=None)
    backend.init_forward_metadata(decode)  # a plain step
    assert backend.forward_extend(None, None, None, _model().layers[0], decode) == "sglang's"
    assert calls == [("metadata", ForwardMode.DECODE), ("extend",)]
    # A model with a sliding-window layer: refused once at start-up, with the reason logged;
    # its verify steps take SGLang's dense custom-mask path.
    calls.clear()
    with caplog.at_level(logging.WARNING, logger="sgl_longspec"):
        refused = H.create_backend(_runner(_model(sliding_window=True), r2t_pool, kv_pool))
    assert refused.hybrid_refusal and "sliding" in refused.hybrid_refusal
    assert refused._hybrid is None and "dense custom mask" in caplog.text
    refused.init_forward_metadata(batch)
    assert refused.forward_extend(None, None, None, _model().layers[0], batch) == "sglang's"
    assert calls == [("metadata", ForwardMode.TARGET_VERIFY), ("extend",)]


def test_mla_models_keep_sglangs_mla_backend(monkeypatch):
    made = []
    monkeypatch.setattr(sglang_compat, "name",
                        lambda n: (lambda runner: made.append((n, runner)) or n))
    runner = SimpleNamespace(use_mla_backend=True)
    assert H.create_backend(runner) == "FlashInferMLAAttnBackend" and made == [("FlashInferMLAAttnBackend", runner)]
