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

Models the hybrid path cannot serve exactly (sliding windows, soft-capping, FP8 KV, translated
slot ids, ...: attention/hybrid_support.py) verify through SGLang's dense custom mask instead, with
one logged reason. A verify step plans once, in init_forward_metadata, from host-side lengths and
pool rows (no read-back from the device); each layer then only writes its KV and runs. Requests
whose cached prefixes share a radix-cache run of at least GPU_CASCADE_MIN_SHARED slots read it once
per step (the cascade's shared level, grouped from the tree's paths: attention/cascade.py).

On CI (no GPU): this class runs on CPU under SGLang's own FlashInferAttnBackend.__init__, KV pool
and runtime context, its verify steps checked against dense attention
(tests/test_gpu_backend_glue.py); the wrapper's FlashInfer and Triton branches plan and run on the
meta device without read-backs (tests/test_gpu_backend.py); the kernels are tested against the
reference under the Triton interpreter (tests/test_attention_triton.py), their CUDA configurations
by the compiler (tests/test_kernel_resources.py). Only a GPU shows FlashInfer's and the kernels'
numbers and timings on CUDA (scripts/gpu_check.sh).
"""

from __future__ import annotations

import logging
import os
from typing import Sequence

import torch

from flashinfer_ext.wrapper import host_to_device
from sgl_longspec.adapter import sglang_compat
from sgl_longspec.attention.cascade import MinShared, SharedGroup, shared_path_groups
from sgl_longspec.attention.hybrid_support import attention_layers, hybrid_refusal, hybrid_shape
from sgl_longspec.verify.layout import VerifyLayout

logger = logging.getLogger("sgl_longspec")

BACKEND_NAME = "longspec_flashinfer"  # its name in SGLang's attention registry

# Shortest radix-shared run worth the cascade's shared level on a GPU. NOT MEASURED: no GPU has
# been lent to this project. The level adds one FlashInfer pass and one merge per layer and saves
# (group size - 1) reads of the run; a GPU reads KV two orders of magnitude faster than the CPU
# whose crossovers attention/cpu_hybrid.py uses, while a pass costs microseconds, so those do not
# carry over. 1024 slots (one 8B-model layer's run is then 4 MiB of bf16 KV per extra reader)
# until scripts/gpu_check.sh's shared-prefix table says otherwise; LONGSPEC_CASCADE_MIN_SHARED=N
# sets it (0 turns the level off), as on the CPU.
_MIN_SHARED_ENV = os.environ.get("LONGSPEC_CASCADE_MIN_SHARED")
GPU_CASCADE_MIN_SHARED = MinShared.fixed(int(_MIN_SHARED_ENV) if _MIN_SHARED_ENV else 1024)


def hybrid_verify_plan_args(layout: VerifyLayout, pool_rows: list[int],
                            req_to_token: torch.Tensor,
                            groups: Sequence[SharedGroup] = ()) -> dict:
    """The index metadata of HybridTreeVerifyWrapper.plan for one ragged verify batch: each
    request's committed prefix (paged, no mask) and its verify slots (under its tree mask); with
    `groups` (requests whose first `length` slots are the same), the cascade's shared level too.

    Built from host-side lengths and rows without reading anything back from the device: the
    index pointers stay host lists (FlashInfer's plan wants them on the host), the slot ids are
    slices of req_to_token gathered on its device, the masks go up through pinned memory."""
    dev = req_to_token.device
    tree = layout.tree_slots(req_to_token, pool_rows)
    cut = [0] * len(pool_rows)
    for g in groups:
        for i in g.members:
            cut[i] = g.length
    own = [s - c for s, c in zip(layout.prefix_lens, cut)]
    prefix = [req_to_token[r, c:s] for r, c, s in zip(pool_rows, cut, layout.prefix_lens)]
    empty = torch.zeros(0, dtype=torch.int32, device=dev)
    args = dict(
        qo_indptr=running_sum(layout.q_lens),
        prefix_kv_indptr=running_sum(own),
        prefix_kv_indices=torch.cat(prefix).to(torch.int32) if prefix else empty,
        tree_kv_indices=torch.cat(tree).to(torch.int32) if tree else empty,
        tree_mask_flat=host_to_device(layout.flat_tree_mask(), dev),
        tree_mask_indptr=running_sum([q * q for q in layout.q_lens]),
    )
    if groups:
        args.update(_shared_level(layout.q_lens, pool_rows, req_to_token, groups))
    return args


def _shared_level(q_lens: list[int], pool_rows: list[int], req_to_token: torch.Tensor,
                  groups: Sequence[SharedGroup]) -> dict:
    """The wrapper's shared level: row segments of consecutive requests of one group (batch
    order; a group whose members are not adjacent reads its run once per segment), each with the
    group's shared slots (its first member's row); requests in no group get empty segments."""
    group_of = {i: g for g in groups for i in g.members}
    rows, kv, idx = [0], [0], []
    prev = object()
    for i, q in enumerate(q_lens):
        g = group_of.get(i)
        if g is not None and g is prev:
            rows[-1] += q
            continue
        rows.append(rows[-1] + q)
        n = g.length if g is not None else 0
        kv.append(kv[-1] + n)
        if n:
            idx.append(req_to_token[pool_rows[g.members[0]], :n])
        prev = g
    empty = torch.zeros(0, dtype=torch.int32, device=req_to_token.device)
    return dict(shared_qo_indptr=rows, shared_kv_indptr=kv,
                shared_kv_indices=torch.cat(idx).to(torch.int32) if idx else empty)


def running_sum(lengths) -> list[int]:
    out = [0]
    for n in lengths:
        out.append(out[-1] + int(n))
    return out


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
            layers = attention_layers(model_runner.model)
            self.hybrid_refusal = hybrid_refusal(model_runner, layers)
            self._hybrid = self._shape = None
            if self.hybrid_refusal is not None:
                logger.warning("%s: LONGSPEC verifies through FlashInfer's dense custom mask, not "
                               "the hybrid path, for this model: %s", BACKEND_NAME,
                               self.hybrid_refusal)
            else:
                self._shape = hybrid_shape(model_runner, layers)
                # SGLang's FlashInfer workspace (sized before the KV pool), not a second one: a
                # hybrid verify step runs none of SGLang's own wrappers.
                self._hybrid = HybridTreeVerifyWrapper(self.workspace_buffer,
                                                       device=model_runner.device)
            self._hybrid_planned = False  # whether the current forward takes the hybrid path

        def init_forward_metadata(self, forward_batch):
            spec = forward_batch.spec_info
            if (self._hybrid is not None and forward_batch.forward_mode.is_target_verify()
                    and isinstance(getattr(spec, "layout", None), VerifyLayout)):
                m = self._shape
                # Requests whose cached prefixes share a radix-cache run read it once (the
                # cascade's shared level), grouped from the tree's paths on the host.
                paths = getattr(spec, "radix_paths", None)
                groups = shared_path_groups(paths, GPU_CASCADE_MIN_SHARED) if paths else ()
                self._hybrid.plan(
                    **hybrid_verify_plan_args(spec.layout, spec.pool_rows,
                                              self.req_to_token_pool.req_to_token, groups),
                    num_qo_heads=m.num_qo_heads, num_kv_heads=m.num_kv_heads,
                    head_dim=m.head_dim, sm_scale=m.sm_scale, q_data_type=m.q_dtype,
                    kv_data_type=m.kv_dtype)
                self._hybrid_planned = True
                return
            self._hybrid_planned = False
            super().init_forward_metadata(forward_batch)

        def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True):
            if not self._hybrid_planned:
                return super().forward_extend(q, k, v, layer, forward_batch, save_kv_cache)
            if save_kv_cache and k is not None and v is not None:
                self.token_to_kv_pool.set_kv_buffer(
                    layer, KVWriteLoc.for_layer(forward_batch, layer, swa_loc=None), k, v)
            m = self._shape
            out = self._hybrid.run(
                q.reshape(-1, m.num_qo_heads, m.head_dim),
                (self.token_to_kv_pool.get_key_buffer(layer.layer_id),
                 self.token_to_kv_pool.get_value_buffer(layer.layer_id)))
            return out.reshape(-1, m.num_qo_heads * m.v_head_dim)

    return LongSpecFlashInferAttnBackend
