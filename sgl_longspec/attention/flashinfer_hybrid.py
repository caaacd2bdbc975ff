"""GPU attention for LONGSPEC's verify pass: SGLang's FlashInfer backend + hybrid tree attention.

Everything (prefill, decode, other algorithms' verify) goes to SGLang's own FlashInfer backend.
Only a LONGSPEC TARGET_VERIFY step (a spec_info carrying the step's VerifyLayout) takes the hybrid path
of `flashinfer_ext.HybridTreeVerifyWrapper`: each request's committed prefix through FlashInfer's
paged kernel without a mask, its draft tree through the Triton tree kernel under the tree mask,
merged by log-sum-exp (the same math as the CPU backend, `flashinfer_ext.reference`).

Registered as `longspec_flashinfer` (sgl_longspec.attention.registration), which a LONGSPEC server on
CUDA selects by default; SGLang's own `flashinfer` entry is untouched. `--attention-backend
flashinfer` keeps the stock backend for LONGSPEC: it verifies the drafts through the dense custom
mask of LongSpecVerifyInput.generate_attn_arg_prefill (the baseline of the benchmark).

Not run on CI (no GPU there): the kernels are tested against the reference under the Triton
interpreter (tests/test_attention_triton.py); this glue needs a GPU session (issue 7).
"""

from __future__ import annotations

import logging

import torch

from sgl_longspec.adapter import sglang_compat
from sgl_longspec.verify.layout import VerifyLayout, indptr

logger = logging.getLogger("sgl_longspec")

BACKEND_NAME = "longspec_flashinfer"  # its name in SGLang's attention registry


def hybrid_verify_plan_args(layout: VerifyLayout, req_pool_indices: list[int],
                            req_to_token: torch.Tensor) -> dict:
    """The index metadata of HybridTreeVerifyWrapper.plan for one ragged verify batch: each
    request's committed prefix (paged, no mask) and its verify slots (under its tree mask)."""
    dev = req_to_token.device
    tree = layout.tree_slots(req_to_token, req_pool_indices)
    prefix = [req_to_token[r, :s] for r, s in zip(req_pool_indices, layout.prefix_lens)]
    empty = torch.zeros(0, dtype=torch.int32, device=dev)
    return dict(
        qo_indptr=layout.qo_indptr(dev),
        prefix_kv_indptr=indptr(layout.prefix_lens, dev),
        prefix_kv_indices=torch.cat(prefix).to(torch.int32) if prefix else empty,
        tree_kv_indices=torch.cat(tree).to(torch.int32) if tree else empty,
        tree_mask_flat=layout.flat_tree_mask(dev),
        tree_mask_indptr=indptr([q * q for q in layout.q_lens], dev),
    )


def create_backend(runner):
    """The `longspec_flashinfer` backend for this runner (registered by attention_backends).
    MLA models keep SGLang's FlashInfer MLA backend (the hybrid verify path is for MHA/GQA)."""
    if runner.use_mla_backend:
        return sglang_compat.name("FlashInferMLAAttnBackend")(runner)
    return _backend_class()(runner, init_new_workspace=runner.init_new_workspace)


def _backend_class():
    FlashInferAttnBackend = sglang_compat.name("FlashInferAttnBackend")
    KVWriteLoc = sglang_compat.name("KVWriteLoc")

    from flashinfer_ext.wrapper import HybridTreeVerifyWrapper

    class LongSpecFlashInferAttnBackend(FlashInferAttnBackend):
        def __init__(self, model_runner, **kw):
            super().__init__(model_runner, **kw)
            self._hybrid = HybridTreeVerifyWrapper(device=model_runner.device)
            self._hybrid_args = None  # plan metadata of the current LONGSPEC verify step
            self._hybrid_key = None  # (heads, kv heads, dim, scale, dtype) it was planned for

        def init_forward_metadata(self, forward_batch):
            spec = forward_batch.spec_info
            if (forward_batch.forward_mode.is_target_verify()
                    and isinstance(getattr(spec, "layout", None), VerifyLayout)
                    and not self.use_sliding_window_kv_pool):
                self._hybrid_args = hybrid_verify_plan_args(
                    spec.layout, forward_batch.req_pool_indices.tolist(),
                    self.req_to_token_pool.req_to_token)
                self._hybrid_key = None
                return
            self._hybrid_args = None
            super().init_forward_metadata(forward_batch)

        def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True):
            if self._hybrid_args is None:
                return super().forward_extend(q, k, v, layer, forward_batch, save_kv_cache)
            if layer.logit_cap or layer.is_cross_attention:
                raise NotImplementedError(f"{BACKEND_NAME}: logit soft-capping / cross-attention "
                                          "layers are not supported in the hybrid verify path")
            if save_kv_cache and k is not None and v is not None:
                self.token_to_kv_pool.set_kv_buffer(
                    layer, KVWriteLoc.for_layer(forward_batch, layer, swa_loc=None), k, v)
            hq, hkv, d = layer.tp_q_head_num, layer.tp_k_head_num, layer.qk_head_dim
            key = (hq, hkv, d, float(layer.scaling), q.dtype)
            if key != self._hybrid_key:  # once per step (all layers share the key in practice)
                kv_dtype = self.token_to_kv_pool.get_key_buffer(layer.layer_id).dtype
                self._hybrid.plan(**self._hybrid_args, num_qo_heads=hq, num_kv_heads=hkv,
                                  head_dim=d, sm_scale=layer.scaling, q_data_type=q.dtype,
                                  kv_data_type=kv_dtype)
                self._hybrid_key = key
            out = self._hybrid.run(
                q.reshape(-1, hq, d),
                (self.token_to_kv_pool.get_key_buffer(layer.layer_id),
                 self.token_to_kv_pool.get_value_buffer(layer.layer_id)))
            return out.reshape(-1, hq * layer.v_head_dim)

    return LongSpecFlashInferAttnBackend
