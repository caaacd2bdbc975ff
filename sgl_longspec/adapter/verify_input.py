"""LONGSPEC's spec input for a TARGET_VERIFY forward: NGRAM's verify input (SGLang's spec input
for drafts that have no KV of their own) carrying the step's VerifyLayout, which LONGSPEC's
attention backends read, and the dense custom-mask arguments for SGLang's stock FlashInfer
backend (the baseline that verifies through a mask)."""

from __future__ import annotations

import functools

import torch

from sgl_longspec.adapter import sglang_compat
from sgl_longspec.verify.layout import VerifyLayout


@functools.cache
def verify_input_cls():
    NgramVerifyInput = sglang_compat.name("NgramVerifyInput")

    class LongSpecVerifyInput(NgramVerifyInput):
        """NGRAM's verify input plus ragged per-request trees for the attention backend."""

        def __init__(self, layout: VerifyLayout, positions, draft_token_num, **kw):
            # NGRAM's constructor reads the device off custom_mask; LONGSPEC's masks are ragged.
            super().__init__(custom_mask=torch.empty(0, dtype=torch.bool, device=positions.device),
                             positions=positions, draft_token_num=draft_token_num, **kw)
            self.layout = layout  # the step's ragged trees, read by the attention backends
            self.device = positions.device

        # Ragged widths: a fixed-shape CUDA graph cannot replay this step.
        cuda_graph_compatible = False

        def generate_attn_arg_prefill(self, *, req_pool_indices, paged_kernel_lens,
                                      paged_kernel_lens_sum, translator, plan, kind=None, **_):
            """FlashInfer's ragged custom-mask verify arguments (the GPU flashinfer backend calls
            this): request i verifies q_i = 1 + n_i tokens over its committed prefix plus those
            tokens, with the mask [ones(q_i, prefix_i) | tree_mask_i] packed row-major."""
            kv_indices, kv_indptr, qo_indptr, mask = self.layout.dense_verify_args(
                paged_kernel_lens, self.device)
            fill = dict(plan=plan, req_pool_indices=req_pool_indices,
                        seq_lens=paged_kernel_lens + (qo_indptr[1:] - qo_indptr[:-1]),
                        indptr=kv_indptr, out=kv_indices)
            if kind is not None:
                fill["kind"] = kind
            translator.pack_read_stream(**fill)
            self.qo_indptr = qo_indptr
            return kv_indices, kv_indptr, qo_indptr, mask

    return LongSpecVerifyInput
