"""LONGSPEC's spec input for a TARGET_VERIFY forward: SGLang's spec-input base (`SpecInput`) with
the step's VerifyLayout, which LONGSPEC's attention backends read, and the dense custom-mask
arguments for SGLang's stock FlashInfer backend (the baseline that verifies through a mask).

It is its own class, built from the base: the fields below are the ones SGLang 0.5.23 reads off a
verify input in a forward without CUDA graphs (ForwardBatch, the logits processor, the attention
backends' `generate_attn_arg_prefill`), each set by this constructor, so nothing depends on how
another algorithm's input is built inside.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from sgl_longspec.adapter import sglang_compat
from sgl_longspec.verify.layout import VerifyLayout


@functools.cache
def verify_input_cls():
    SpecInput = sglang_compat.name("SpecInput")
    SpecInputType = sglang_compat.name("SpecInputType")

    class LongSpecVerifyInput(SpecInput):
        """One verify forward's input: ragged per-request trees (`layout`) over the batch."""

        # Ragged widths: a fixed-shape CUDA graph cannot replay this step.
        cuda_graph_compatible = False

        def __init__(self, layout: VerifyLayout, positions: torch.Tensor, draft_token_num: int,
                     pool_rows: list[int], radix_paths: Optional[list] = None):
            # SGLang's phase guard (SpecInput.is_verify_input) knows its own algorithms' tags
            # only; NGRAM_VERIFY is the tag of a verify input whose draft tokens have no KV of
            # their own, which is what this is (no backend of SGLang's dispatches on it otherwise).
            super().__init__(SpecInputType.NGRAM_VERIFY)
            self.layout = layout  # the step's ragged trees, read by the attention backends
            # Each request's req_to_token row, host-side: the GPU plan indexes with them without
            # reading the batch's device copy back.
            self.pool_rows = pool_rows
            # Where each request's cached prefix sits in the radix cache (adapter.radix_paths),
            # for the GPU backend's shared level; None where the backend groups by slot ids.
            self.radix_paths = radix_paths
            self.positions = positions
            self.device = positions.device
            self.draft_token = None  # the forward's input_ids are set on the batch
            self.draft_token_num = draft_token_num  # the widest request's verify width
            self.num_tokens_per_req = draft_token_num
            self.num_tokens_for_logprob_per_req = draft_token_num
            # The masks are ragged, in the layout; the dense one is built on request below.
            self.custom_mask = torch.empty(0, dtype=torch.bool, device=self.device)
            # No tree-walk tensors: acceptance is LONGSPEC's (sgl_longspec.verify).
            self.retrieve_index = self.retrieve_next_token = self.retrieve_next_sibling = None

        @property
        def max_tree_depth(self) -> int:
            return self.draft_token_num

        @property
        def tree_topk(self) -> int:
            return -1  # irregular trees

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

        def filter_batch(self, new_indices, new_indices_cpu=None):
            raise RuntimeError("a verify input lives for one forward; the batch carries "
                               "NGRAM's draft input between steps")

        merge_batch = filter_batch

    return LongSpecVerifyInput
