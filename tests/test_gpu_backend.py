"""The GPU backend's verify glue on a machine without a GPU (issue 28).

- Which models the hybrid path serves: hybrid_refusal over SGLang's real RadixAttention layers,
  every refused case with its reason, and the plan's shape for an accepted model.
- No read-back from the device: the plan arguments and HybridTreeVerifyWrapper's plan and
  per-layer run on the `meta` device, whose tensors have no data, so any .tolist(), .item(),
  .cpu() or host comparison of device data raises. The FlashInfer and Triton calls go to
  stand-ins bound to the real call signatures (flashinfer 0.7.x as pinned in
  requirements/cuda.lock; flashinfer_ext.triton_tree's own), which check what they are given.
- The same plan arguments on CPU give the reference's numbers (tests/test_longspec.py covers the
  torch path; here the all-Triton path's split of levels is checked for its arguments only).
What only a GPU can show: that the kernels and FlashInfer compute what the reference computes on
CUDA, and the timing (scripts/gpu_check.sh, which also runs this file there).
"""

from __future__ import annotations

import inspect
import sys
import types
from types import SimpleNamespace
from typing import Optional, Union

import pytest
import torch

from flashinfer_ext import wrapper as W
from sgl_longspec.adapter import sglang_compat
from sgl_longspec.attention.flashinfer_hybrid import hybrid_verify_plan_args
from sgl_longspec.attention.hybrid_support import (attention_layers, hybrid_refusal,
                                                   hybrid_shape)
from sgl_longspec.drafters.draft import Draft
from sgl_longspec.verify.layout import VerifyLayout

META = torch.device("meta")


# ---------------------------------------------------------------- which models the path serves
def _model(overrides=None, n_layers=3):
    """A module holding SGLang's own RadixAttention layers (the class the backend scans for);
    overrides: {layer id: constructor arguments}."""
    overrides = overrides or {}
    pytest.importorskip("sglang", reason="the GPU device check's machine has no SGLang")
    RadixAttention = sglang_compat.name("RadixAttention")
    m = torch.nn.Module()
    m.layers = torch.nn.ModuleList()
    for i in range(n_layers):
        kw = dict(num_heads=8, head_dim=64, scaling=0.125, num_kv_heads=2, layer_id=i)
        kw.update(overrides.get(i, {}))
        m.layers.append(RadixAttention(**kw))
    return m


def _runner(model, **kw):
    base = dict(model=model, model_config=SimpleNamespace(is_encoder_decoder=False),
                sliding_window_size=None, dtype=torch.bfloat16, kv_cache_dtype=torch.bfloat16,
                kv_index_translator=SimpleNamespace(reads_are_translated=False,
                                                    needs_read_translate=False))
    base.update(kw)
    return SimpleNamespace(**base)


def test_a_plain_model_takes_the_hybrid_path_with_its_shape():
    runner = _runner(_model())
    layers = attention_layers(runner.model)
    assert [l.layer_id for l in layers] == [0, 1, 2]
    assert hybrid_refusal(runner, layers) is None
    shape = hybrid_shape(runner, layers)
    assert (shape.num_qo_heads, shape.num_kv_heads, shape.head_dim, shape.v_head_dim) == (8, 2, 64, 64)
    assert shape.sm_scale == 0.125 and shape.q_dtype == shape.kv_dtype == torch.bfloat16


@pytest.mark.parametrize("case,reason", [
    ("window_layer", "sliding-window"),
    ("window_runner", "sliding-window"),
    ("soft_cap", "soft-capping"),
    ("cross", "cross-attention"),
    ("encoder_decoder", "cross-attention"),
    ("fp8_kv", "KV cache"),
    ("translated", "translated"),
    ("dcp", "translated"),
    ("scales", "different softmax scales"),
    ("heads", "different softmax scales or head shapes"),
    ("no_layers", "no RadixAttention"),
])
def test_models_the_hybrid_path_cannot_serve_are_refused_with_a_reason(case, reason):
    model, kw = _model(), {}
    if case == "window_layer":
        model = _model({1: dict(sliding_window_size=4096)})
    elif case == "window_runner":
        kw["sliding_window_size"] = 4096
    elif case == "soft_cap":
        model = _model({0: dict(logit_cap=30.0)})
    elif case == "cross":
        model = _model({2: dict(is_cross_attention=True)})
    elif case == "encoder_decoder":
        kw["model_config"] = SimpleNamespace(is_encoder_decoder=True)
    elif case == "fp8_kv":
        kw["kv_cache_dtype"] = torch.float8_e4m3fn
    elif case == "translated":
        kw["kv_index_translator"] = SimpleNamespace(reads_are_translated=True, needs_read_translate=True)
    elif case == "dcp":
        kw["kv_index_translator"] = SimpleNamespace(reads_are_translated=False, needs_read_translate=True)
    elif case == "scales":
        model = _model({1: dict(scaling=0.1)})
    elif case == "heads":
        model = _model({2: dict(num_heads=4)})
    elif case == "no_layers":
        model = torch.nn.Linear(2, 2)
    runner = _runner(model, **kw)
    got = hybrid_refusal(runner, attention_layers(runner.model))
    assert got is not None and reason in got


# ---------------------------------------------------------------- stand-ins bound to real signatures
class _FlashInferPrefillStandIn:
    """flashinfer.BatchPrefillWithPagedKVCacheWrapper (0.7.x): the constructor, plan and run
    signatures of the real class; records what it was given and returns empty outputs."""

    calls: list = []

    def __init__(self, float_workspace_buffer: torch.Tensor, kv_layout: str = "NHD",
                 use_cuda_graph: bool = False, qo_indptr_buf: Optional[torch.Tensor] = None,
                 paged_kv_indptr_buf: Optional[torch.Tensor] = None,
                 paged_kv_indices_buf: Optional[torch.Tensor] = None,
                 paged_kv_last_page_len_buf: Optional[torch.Tensor] = None,
                 custom_mask_buf: Optional[torch.Tensor] = None,
                 mask_indptr_buf: Optional[torch.Tensor] = None, backend: str = "auto",
                 jit_args=None, jit_kwargs=None) -> None:
        self.device = float_workspace_buffer.device

    def plan(self, qo_indptr: torch.Tensor, paged_kv_indptr: torch.Tensor,
             paged_kv_indices: torch.Tensor, paged_kv_last_page_len: torch.Tensor,
             num_qo_heads: int, num_kv_heads: int, head_dim_qk: int, page_size: int,
             head_dim_vo: Optional[int] = None, custom_mask: Optional[torch.Tensor] = None,
             packed_custom_mask: Optional[torch.Tensor] = None, causal: bool = False,
             pos_encoding_mode: str = "NONE", use_fp16_qk_reduction: bool = False,
             sm_scale: Optional[float] = None, window_left: int = -1,
             logits_soft_cap: Optional[float] = None, rope_scale: Optional[float] = None,
             rope_theta: Optional[float] = None,
             q_data_type: Union[str, torch.dtype] = "float16",
             kv_data_type: Optional[Union[str, torch.dtype]] = None,
             o_data_type: Optional[Union[str, torch.dtype]] = None, non_blocking: bool = True,
             prefix_len_ptr=None, token_pos_in_items_ptr=None, token_pos_in_items_len: int = 0,
             max_item_len_ptr=None, seq_lens=None, seq_lens_q=None, block_tables=None,
             max_token_per_sequence: Optional[int] = None,
             max_sequence_kv: Optional[int] = None, fixed_split_size: Optional[int] = None,
             disable_split_kv: bool = False) -> None:
        # FlashInfer reads these three on the host: a device tensor there is a read-back.
        for t in (qo_indptr, paged_kv_indptr, paged_kv_last_page_len):
            assert t.device.type == "cpu" and t.dtype == torch.int32
        assert paged_kv_indices.device == self.device and paged_kv_indices.dtype == torch.int32
        assert len(paged_kv_last_page_len) == len(qo_indptr) - 1 and page_size == 1
        assert not causal
        self.rows = int(qo_indptr[-1])
        self.num_qo_heads, self.head_dim = num_qo_heads, head_dim_qk
        type(self).calls.append("plan")

    def run(self, q: torch.Tensor, paged_kv_cache, *args, q_scale=None, k_scale=None,
            v_scale=None, out=None, lse=None, return_lse: bool = False, enable_pdl=None,
            window_left=None, sinks=None):
        assert q.shape == (self.rows, self.num_qo_heads, self.head_dim)
        k, v = paged_kv_cache
        assert k.dim() == 4 and k.shape[1] == 1  # [slots, page_size 1, Hkv, D]
        type(self).calls.append("run")
        o = torch.empty_like(q)
        s = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
        return (o, s) if return_lse else o


def _merge_state_in_place(v: torch.Tensor, s: torch.Tensor, v_other: torch.Tensor,
                          s_other: torch.Tensor, mask: Optional[torch.Tensor] = None) -> None:
    assert v.shape == v_other.shape and s.shape == s_other.shape
    _FlashInferPrefillStandIn.calls.append("merge")


@pytest.fixture
def flashinfer_stand_in(monkeypatch):
    mod = types.ModuleType("flashinfer")
    mod.BatchPrefillWithPagedKVCacheWrapper = _FlashInferPrefillStandIn
    mod.merge_state_in_place = _merge_state_in_place
    monkeypatch.setitem(sys.modules, "flashinfer", mod)
    monkeypatch.setattr(W, "flashinfer_available", lambda: True)
    _FlashInferPrefillStandIn.calls = []
    return _FlashInferPrefillStandIn


@pytest.fixture
def triton_stand_in(monkeypatch):
    """flashinfer_ext.triton_tree.ragged_attention_with_lse, bound to its real signature: checks
    that every launch gets its maximum lengths from the plan (else it would read them back)."""
    from flashinfer_ext import triton_tree

    real = inspect.signature(triton_tree.ragged_attention_with_lse)
    calls = []

    def stand_in(*args, **kwargs):
        bound = real.bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        assert a["max_qo_len"] is not None and a["max_kv_len"] is not None
        for name in ("qo_indptr", "kv_indptr", "kv_indices"):
            assert a[name].device == a["q"].device
        calls.append(a)
        q = a["q"]
        out = torch.empty(q.shape, dtype=a["out_dtype"] or q.dtype, device=q.device)
        return out, torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)

    monkeypatch.setattr(triton_tree, "ragged_attention_with_lse", stand_in)
    return calls


# ---------------------------------------------------------------- no read-back from the device
def _step(device):
    drafts = [Draft.chain([1, 2]), Draft.empty(), Draft([4, 5, 6], [-1, -1, 1]), Draft.chain([7])]
    masks = [torch.from_numpy(d.tree_mask(include_root=True)) for d in drafts]
    prefix_lens, rows = [7, 3, 12, 0], [2, 0, 1, 3]
    req_to_token = torch.arange(4 * 20, dtype=torch.int32).view(4, 20).to(device)
    return VerifyLayout(masks, prefix_lens), rows, req_to_token


def test_plan_arguments_read_nothing_back_from_the_device():
    layout, rows, req_to_token = _step(META)
    args = hybrid_verify_plan_args(layout, rows, req_to_token)
    assert args["qo_indptr"] == [0, 3, 4, 8, 10]
    assert args["prefix_kv_indptr"] == [0, 7, 10, 22, 22]
    assert args["tree_mask_indptr"] == [0, 9, 10, 26, 30]
    for name in ("prefix_kv_indices", "tree_kv_indices", "tree_mask_flat"):
        assert args[name].device == META
    assert args["prefix_kv_indices"].numel() == 22 and args["tree_kv_indices"].numel() == 10
    # the same arguments on CPU hold the rows' slots
    cpu = hybrid_verify_plan_args(*_step("cpu"))
    assert cpu["tree_kv_indices"].tolist() == [47, 48, 49, 3, 32, 33, 34, 35, 60, 61]
    assert cpu["prefix_kv_indices"][:7].tolist() == list(range(40, 47))


@pytest.mark.parametrize("shared", [False, True])
def test_flashinfer_levels_plan_and_run_without_read_back(flashinfer_stand_in, triton_stand_in,
                                                          shared):
    layout, rows, req_to_token = _step(META)
    args = hybrid_verify_plan_args(layout, rows, req_to_token)
    if shared:  # requests 0-1 and 2-3 each read a shared run of slots first
        args.update(shared_qo_indptr=[0, 4, 10], shared_kv_indptr=[0, 5, 9],
                    shared_kv_indices=torch.zeros(9, dtype=torch.int32, device=META))
    hq, hkv, d = 8, 2, 64
    w = W.HybridTreeVerifyWrapper(torch.empty(1 << 20, dtype=torch.uint8, device=META),
                                  backend="flashinfer", device=META)
    w.plan(**args, num_qo_heads=hq, num_kv_heads=hkv, head_dim=d, q_data_type=torch.bfloat16)
    levels = 2 if shared else 1
    assert flashinfer_stand_in.calls == ["plan"] * levels
    k = torch.empty(80, hkv, d, dtype=torch.bfloat16, device=META)
    for _layer in range(3):  # the per-layer path: run only
        out = w.run(torch.empty(10, hq, d, dtype=torch.bfloat16, device=META), (k, k))
        assert out.shape == (10, hq, d) and out.device == META
    assert flashinfer_stand_in.calls == ["plan"] * levels + ["run", "merge"] * levels * 3
    assert len(triton_stand_in) == 3  # the tree level, once per layer
    assert all(c["mask"] is not None and c["lse_base2"] for c in triton_stand_in)


def test_all_triton_levels_plan_and_run_without_read_back(triton_stand_in):
    layout, rows, req_to_token = _step(META)
    args = hybrid_verify_plan_args(layout, rows, req_to_token)
    args.update(shared_qo_indptr=[0, 4, 10], shared_kv_indptr=[0, 5, 9],
                shared_kv_indices=torch.zeros(9, dtype=torch.int32, device=META))
    w = W.HybridTreeVerifyWrapper(backend="triton", device=META)
    w.plan(**args, num_qo_heads=4, num_kv_heads=2, head_dim=32, q_data_type=torch.float16)
    k = torch.empty(80, 2, 32, dtype=torch.float16, device=META)
    for _layer in range(2):
        out, lse = w.run(torch.empty(10, 4, 32, dtype=torch.float16, device=META), (k, k),
                         return_lse=True)
        assert out.dtype == torch.float16 and lse.shape == (10, 4)
    # tree, prefix, shared per layer; the prefix and shared levels carry no mask
    assert [c["mask"] is None for c in triton_stand_in] == [False, True, True] * 2
    assert [c["max_kv_len"] for c in triton_stand_in[:3]] == [4, 12, 5]


def test_host_to_device_keeps_values_and_dtype():
    t = W.host_to_device([3, 1, 2], "cpu", torch.int32)
    assert t.tolist() == [3, 1, 2] and t.dtype == torch.int32
    assert W.host_to_device(torch.tensor([True, False]), META).device == META


def test_bfloat16_under_the_triton_interpreter_is_refused():
    """The interpreter computes bf16 through numpy, which has none: refused, not wrong numbers."""
    from flashinfer_ext.triton_tree import ragged_attention_with_lse

    q = torch.zeros(2, 2, 16, dtype=torch.bfloat16)
    k = torch.zeros(4, 1, 16, dtype=torch.bfloat16)
    ind = torch.tensor([0, 2], dtype=torch.int32)
    with pytest.raises(ValueError, match="does not compute bfloat16"):
        ragged_attention_with_lse(q, k, k, ind, ind, torch.arange(2, dtype=torch.int32))


def test_the_shared_level_plan_computes_what_the_two_level_plan_does():
    """Requests 0, 1 and 3 share their first 30 slots (request 2 does not, and splits the group
    into two row segments): the plan with the shared level gives the two-level plan's output."""
    from sgl_longspec.attention.cascade import SharedGroup

    g = torch.Generator().manual_seed(3)
    perm = torch.randperm(400, generator=g).to(torch.int32)
    shared, own = perm[:30], perm[30:398].view(4, 92)  # 4 rows of 92 own slots
    table = torch.stack([torch.cat([shared, own[r]]) if r != 2 else own[r].repeat(2)[:122]
                         for r in range(4)])
    drafts = [Draft.chain([1, 2]), Draft.empty(), Draft([4, 5, 6], [-1, -1, 1]), Draft.chain([7])]
    masks = [torch.from_numpy(d.tree_mask(include_root=True)) for d in drafts]
    layout, rows = VerifyLayout(masks, [35, 40, 10, 31]), [0, 1, 2, 3]
    group = SharedGroup((0, 1, 3), 30)
    grouped = hybrid_verify_plan_args(layout, rows, table, [group])
    assert grouped["shared_qo_indptr"] == [0, 4, 8, 10]
    assert grouped["shared_kv_indptr"] == [0, 30, 30, 60]
    assert grouped["prefix_kv_indptr"] == [0, 5, 15, 25, 26]  # each keeps what follows the run
    plain = hybrid_verify_plan_args(layout, rows, table)
    hq, hkv, d = 4, 2, 16
    k = torch.randn(400, hkv, d, generator=g)
    v = torch.randn(400, hkv, d, generator=g)
    q = torch.randn(10, hq, d, generator=g)
    outs = []
    for args in (plain, grouped):
        w = W.HybridTreeVerifyWrapper()
        w.plan(**args, num_qo_heads=hq, num_kv_heads=hkv, head_dim=d, q_data_type=torch.float32)
        outs.append(w.run(q, (k, v)))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
