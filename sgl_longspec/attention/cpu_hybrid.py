"""CPU attention backend with speculative-verify support (hybrid tree attention).

SGLang's torch_native backend cannot verify drafts (it has no TARGET_VERIFY / custom-mask path)
and its extend path recomputes attention for every cached prefix token. This subclass adds both,
registered under its own name `longspec_cpu` (sgl_longspec.attention.registration):

- decode: one query per request over its committed KV (a zero-copy slice when the request's KV
  slots are contiguous, which they usually are);
- extend and TARGET_VERIFY: queries of the new tokens attend to the committed prefix WITHOUT a mask
  and to the new tokens under a small [n, n] mask (causal for prefill chunks, the draft tree mask
  for verify); the two partial results are merged by their log-sum-exps. This is the hybrid tree
  attention of LongSpec; the math lives in flashinfer_ext.reference, which the GPU kernels match.
  A short verify request (VERIFY_SINGLE_PASS_MAX_KEYS) instead takes one call over its whole KV
  under an additive mask: on a small model and a short context the split's fixed cost dominates.

Cascade over radix-shared prefixes (sgl_longspec.attention.cascade): requests whose committed KV starts with
the same run long enough for the group's size (CASCADE_MIN_SHARED) form a group; each layer attends all query rows
of the group to ONE copy of that run (one batched product: its KV is read, or gathered, once per
step instead of once per request), each request to the rest of its own prefix and its new tokens,
and the partial results are merged by their log-sum-exps. Equal to the two-level path within
float32 rounding.

Per-batch bookkeeping (request lengths, KV slot lists, shared groups) is computed once in
init_forward_metadata, not once per layer.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch.nn.functional import scaled_dot_product_attention

from flashinfer_ext.reference import attention_with_lse, hybrid_tree_attention, merge_attention_states
from sgl_longspec.adapter.sglang_compat import (AttentionType, ForwardMode, KVWriteLoc,
                                                TorchNativeAttnBackend)
from sgl_longspec.attention.cascade import MinShared, shared_prefix_groups
from sgl_longspec.verify.layout import VerifyLayout

# Shortest shared run of KV slots worth a cascade level, by group size: the level costs a fixed
# amount per request (an extra attention call and an LSE merge), so short runs lose, and the
# crossover measured on this 2-core CPU falls with the group's size: ~3K slots for 2 requests, ~2K
# for 4, ~1.5K for 8, ~1K for 16 (benchmarks/results/cascade_cpu/); each step is set at the
# measured crossover of its smallest group. LONGSPEC_CASCADE_MIN_SHARED=N sets one threshold for
# every size (0 turns the shared level off).
CASCADE_MIN_SHARED_BY_SIZE = MinShared(((2, 3072), (4, 2048), (8, 1536), (16, 1024)))
CASCADE_MIN_SHARED = (MinShared.fixed(int(os.environ["LONGSPEC_CASCADE_MIN_SHARED"]))
                      if os.environ.get("LONGSPEC_CASCADE_MIN_SHARED") else CASCADE_MIN_SHARED_BY_SIZE)
# Most keys (committed prefix + draft) for which a verify request takes ONE attention call over
# its whole KV under an additive [n, P + n] mask instead of the split path (unmasked prefix, masked
# tree, LSE merge: three kernels and ~20 small ops). On short contexts the split path's fixed
# cost dominates: on this 2-core CPU, one layer of a 135M model (Hq 9, Hkv 3, D 64, n = 2-8, one
# thread), one call takes 0.22-0.27x the split path's CPU time at 256 keys, 0.5x at 1K, 0.7-0.8x
# at 2-2.5K, and 0.94-1.31x from 3K on, where the split path's packed prefix kernel wins
# (benchmarks/results/verify_attention_cpu/small_model/). LONGSPEC_VERIFY_SINGLE_PASS_MAX_KEYS=N
# overrides it (0 turns it off).
VERIFY_SINGLE_PASS_MAX_KEYS = int(os.environ.get("LONGSPEC_VERIFY_SINGLE_PASS_MAX_KEYS", "2560"))


@dataclass
class _ReqKV:
    """Where one request's committed KV lives: a contiguous slot range or an index tensor."""

    start: int
    length: int
    index: Optional[torch.Tensor]  # None when slots are start .. start + length - 1

    def gather(self, cache: torch.Tensor) -> torch.Tensor:
        if self.index is None:
            return cache[self.start : self.start + self.length]
        return cache.index_select(0, self.index)

    def keys_values(self, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Its K and V, in the queries' dtype (a copy only where the cache's dtype differs)."""
        k, v = self.gather(k_cache), self.gather(v_cache)
        if k.dtype != dtype:
            k, v = k.to(dtype), v.to(dtype)
        return k, v


def _req_kv(slots: torch.Tensor) -> _ReqKV:
    n = slots.numel()
    if n == 0:
        return _ReqKV(0, 0, None)
    first, last = int(slots[0]), int(slots[-1])
    if last - first + 1 == n and (n < 3 or bool((slots[1:] - slots[:-1] == 1).all())):
        return _ReqKV(first, n, None)
    return _ReqKV(first, n, slots.to(torch.int64))


@dataclass
class _SharedLevel:
    """One cascade group: its members' query rows attend to `kv` once."""

    members: tuple[int, ...]
    kv: _ReqKV
    rows: torch.Tensor  # the members' query rows, in member order (int64)


@dataclass
class _SinglePass:
    """One verify request attended in one call over its whole KV."""

    kv: _ReqKV
    bias: torch.Tensor  # float32 [n, P + n]: 0 where a query may attend, -inf elsewhere
    _cast: dict = field(default_factory=dict)  # bias in other dtypes, made once per step

    def bias_as(self, dtype: torch.dtype) -> torch.Tensor:
        if dtype == self.bias.dtype:
            return self.bias
        if dtype not in self._cast:
            self._cast[dtype] = self.bias.to(dtype)
        return self._cast[dtype]


@dataclass
class _BatchPlan:
    mode: str  # "decode", "extend", "verify"
    q_lens: list[int]  # new tokens (queries) per request
    prefix: list[_ReqKV]  # committed KV attended without a mask (after the shared level, if any)
    masks: list[Optional[torch.Tensor]]  # [n, n] bool over the new tokens; None = causal
    shared: list[_SharedLevel] = field(default_factory=list)
    # verify requests attended in one call (see VERIFY_SINGLE_PASS_MAX_KEYS): request -> its
    # whole KV (prefix and draft slots) and the additive [n, P + n] mask over it
    single_pass: dict[int, _SinglePass] = field(default_factory=dict)


def _plan(mode: str, q_lens: list[int], prefixes: list[torch.Tensor],
          masks: list[Optional[torch.Tensor]], min_shared: MinShared | int) -> _BatchPlan:
    """The batch's attention plan; requests that share a run of KV slots get a shared level and
    keep only the rest of their prefix."""
    groups = shared_prefix_groups(prefixes, min_shared)
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    cut = [0] * len(prefixes)
    shared = []
    for g in groups:
        for i in g.members:
            cut[i] = g.length
        rows = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in g.members])
        shared.append(_SharedLevel(g.members, _req_kv(prefixes[g.members[0]][: g.length]), rows))
        CASCADE_COUNTS[f"{mode}_groups"] += 1
        CASCADE_COUNTS[f"{mode}_group_requests"] += len(g.members)
        CASCADE_COUNTS[f"{mode}_shared_tokens"] += g.length
    CASCADE_COUNTS[f"{mode}_batches"] += 1
    rest = [_req_kv(p[c:]) for p, c in zip(prefixes, cut)]
    return _BatchPlan(mode, q_lens, rest, masks, shared)


def _single_pass_plan(plan: _BatchPlan, rows: list[int], req_to_token: torch.Tensor,
                      seq_lens: list[int], out_cache_loc: Optional[torch.Tensor]) -> None:
    """Mark the verify requests of `plan` that take one attention call over their whole KV: short
    enough (VERIFY_SINGLE_PASS_MAX_KEYS), in no shared level, and whose draft KV went to the slots
    that follow their prefix in their req_to_token row (checked against out_cache_loc, so a verify
    input that writes elsewhere keeps the split path)."""
    if out_cache_loc is None or VERIFY_SINGLE_PASS_MAX_KEYS <= 0:
        VERIFY_PATH_COUNTS["split"] += len(plan.q_lens)
        return
    in_shared = {i for level in plan.shared for i in level.members}
    loc = out_cache_loc.to(torch.int64)
    start = 0
    for i, (r, s, n, mask) in enumerate(zip(rows, seq_lens, plan.q_lens, plan.masks)):
        end = start + n
        if (i not in in_shared and mask is not None and 0 < n and s + n <= VERIFY_SINGLE_PASS_MAX_KEYS):
            slots = req_to_token[r, : s + n].to(torch.int64)
            if torch.equal(slots[s:], loc[start:end]):
                bias = torch.zeros(n, s + n, dtype=torch.float32)
                bias[:, s:].masked_fill_(~mask.to(torch.bool), float("-inf"))
                plan.single_pass[i] = _SinglePass(_req_kv(slots), bias)
        start = end
    VERIFY_PATH_COUNTS["single_pass"] += len(plan.single_pass)
    VERIFY_PATH_COUNTS["split"] += len(plan.q_lens) - len(plan.single_pass)


# Wall time spent inside this backend's attention, per plan mode ("decode", "verify", "extend"),
# in ms: the LONGSPEC worker reports it in its stats so that a verify step's profile can separate
# attention from the rest of the forward (benchmarks/profile_verify_step.py).
ATTENTION_MS: dict[str, float] = {"decode": 0.0, "verify": 0.0, "extend": 0.0}
# Cascade counters per plan mode (per planned batch, not per layer): batches planned, shared
# groups formed, requests in them, shared slots; tests read them to see that the shared level ran.
CASCADE_COUNTS: dict[str, int] = {f"{mode}_{what}": 0 for mode in ("decode", "verify", "extend")
                                  for what in ("batches", "groups", "group_requests", "shared_tokens")}
# Verify requests (per planned batch) attended in one call or by the split path; tests read them.
VERIFY_PATH_COUNTS: dict[str, int] = {"single_pass": 0, "split": 0}


class LongSpecCPUAttnBackend(TorchNativeAttnBackend):
    def init_forward_metadata(self, forward_batch):
        super().init_forward_metadata(forward_batch)
        self.plan = None
        mode = forward_batch.forward_mode
        if forward_batch.encoder_lens is not None or self.use_sliding_window_kv_pool:
            return  # rare layouts: defer to the parent implementation
        req_to_token = self.req_to_token_pool.req_to_token
        rows = forward_batch.req_pool_indices.tolist()
        seq_lens = forward_batch.seq_lens_cpu
        seq_lens = (seq_lens if seq_lens is not None else forward_batch.seq_lens).tolist()
        if mode.is_decode_or_idle():
            prefixes = [req_to_token[r, :s] for r, s in zip(rows, seq_lens)]
            self.plan = _plan("decode", [1] * len(rows), prefixes, [None] * len(rows),
                              CASCADE_MIN_SHARED)
        elif mode.is_target_verify():
            q_lens, masks = _verify_layout(forward_batch.spec_info, seq_lens)
            prefixes = [req_to_token[r, :s] for r, s in zip(rows, seq_lens)]
            self.plan = _plan("verify", q_lens, prefixes, masks, CASCADE_MIN_SHARED)
            _single_pass_plan(self.plan, rows, req_to_token, seq_lens,
                              getattr(forward_batch, "out_cache_loc", None))
        elif mode in (ForwardMode.EXTEND, ForwardMode.MIXED):
            pre = forward_batch.extend_prefix_lens_cpu
            ext = forward_batch.extend_seq_lens_cpu
            if pre is None or ext is None:
                return
            prefixes = [req_to_token[r, :p] for r, p in zip(rows, pre)]
            self.plan = _plan("extend", list(ext), prefixes, [None] * len(rows), CASCADE_MIN_SHARED)

    def _shared_states(self, q_, layer) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """The shared level of every group: request -> (out, lse) of its query rows against the
        group's shared KV, computed for all members at once."""
        if not self.plan.shared:
            return {}
        k_cache = self.token_to_kv_pool.get_key_buffer(layer.layer_id)
        v_cache = self.token_to_kv_pool.get_value_buffer(layer.layer_id)
        states = {}
        for level in self.plan.shared:
            ks, vs = level.kv.keys_values(k_cache, v_cache, q_.dtype)
            o, lse = attention_with_lse(q_.index_select(0, level.rows), ks, vs, layer.scaling)
            start = 0
            for i in level.members:
                n = self.plan.q_lens[i]
                states[i] = (o[start:start + n], lse[start:start + n])
                start += n
        return states

    def _plain_layer(self, layer) -> bool:
        return (
            self.plan is not None
            and not layer.is_cross_attention
            and layer.attn_type != AttentionType.ENCODER_ONLY
            and (layer.sliding_window_size is None or layer.sliding_window_size < 0)
            and not getattr(layer, "logit_cap", 0)
            and layer.qk_head_dim == layer.v_head_dim
        )

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        if not self._plain_layer(layer) or self.plan.mode == "decode":
            return super().forward_extend(q, k, v, layer, forward_batch, save_kv_cache)
        if save_kv_cache and k is not None and v is not None:
            self.token_to_kv_pool.set_kv_buffer(
                layer, KVWriteLoc(forward_batch.out_cache_loc, self.swa_out_cache_loc), k, v
            )
        t0 = time.perf_counter()
        hq, hkv, d = layer.tp_q_head_num, layer.tp_k_head_num, layer.qk_head_dim
        q_ = q.reshape(-1, hq, d)
        k_new = k.reshape(-1, hkv, d)
        v_new = v.reshape(-1, hkv, d)
        k_cache = self.token_to_kv_pool.get_key_buffer(layer.layer_id)
        v_cache = self.token_to_kv_pool.get_value_buffer(layer.layer_id)
        out = torch.empty_like(q_)
        shared = self._shared_states(q_, layer)
        start = 0
        for i, (n, pre, mask) in enumerate(zip(self.plan.q_lens, self.plan.prefix, self.plan.masks)):
            end = start + n
            kn, vn = k_new[start:end], v_new[start:end]
            single = self.plan.single_pass.get(i) if save_kv_cache else None
            if single is not None:
                ks, vs = single.kv.keys_values(k_cache, v_cache, q_.dtype)
                out[start:end] = _sdpa(q_[start:end], ks, vs, layer.scaling, causal=False,
                                       bias=single.bias_as(q_.dtype))
            elif pre.length == 0 and mask is None and i not in shared:
                out[start:end] = _sdpa(q_[start:end], kn, vn, layer.scaling, causal=True)
            else:
                kp, vp = pre.keys_values(k_cache, v_cache, q_.dtype)
                tree_mask = mask if mask is not None else _causal(n, q_.device)
                o, lse = hybrid_tree_attention(q_[start:end], kp, vp, kn, vn, tree_mask,
                                               layer.scaling, return_lse=True)
                if i in shared:
                    o, lse = merge_attention_states(o, lse, *shared[i])
                out[start:end] = o
            start = end
        ATTENTION_MS[self.plan.mode] += 1e3 * (time.perf_counter() - t0)
        return out.reshape(q.shape[0], hq * d)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        if not self._plain_layer(layer) or self.plan.mode != "decode":
            return super().forward_decode(q, k, v, layer, forward_batch, save_kv_cache)
        if save_kv_cache and k is not None and v is not None:
            self.token_to_kv_pool.set_kv_buffer(
                layer, KVWriteLoc(forward_batch.out_cache_loc, self.swa_out_cache_loc), k, v
            )
        t0 = time.perf_counter()
        hq, d = layer.tp_q_head_num, layer.qk_head_dim
        q_ = q.reshape(-1, hq, d)
        k_cache = self.token_to_kv_pool.get_key_buffer(layer.layer_id)
        v_cache = self.token_to_kv_pool.get_value_buffer(layer.layer_id)
        out = torch.empty_like(q_)
        shared = self._shared_states(q_, layer)
        for i, pre in enumerate(self.plan.prefix):
            kp, vp = pre.keys_values(k_cache, v_cache, q_.dtype)
            if i in shared:
                o, lse = attention_with_lse(q_[i : i + 1], kp, vp, layer.scaling)
                out[i : i + 1] = merge_attention_states(o, lse, *shared[i])[0]
            else:
                out[i : i + 1] = _sdpa(q_[i : i + 1], kp, vp, layer.scaling, causal=False)
        ATTENTION_MS["decode"] += 1e3 * (time.perf_counter() - t0)
        return out.reshape(q.shape[0], hq * d)


def _sdpa(q, k, v, scale, causal, bias=None):
    """q [n, Hq, D], k/v [m, Hkv, D] -> [n, Hq, D] (top-left causal only when n == m; bias: an
    additive [n, m] mask)."""
    o = scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0),
        k.transpose(0, 1).unsqueeze(0),
        v.transpose(0, 1).unsqueeze(0),
        attn_mask=bias,
        is_causal=causal,
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )
    return o.squeeze(0).transpose(0, 1)


_CAUSAL_CACHE: dict[tuple[int, str], torch.Tensor] = {}


def _causal(n: int, device) -> torch.Tensor:
    key = (n, str(device))
    m = _CAUSAL_CACHE.get(key)
    if m is None:
        m = torch.ones(n, n, dtype=torch.bool, device=device).tril_()
        if n <= 4096:
            _CAUSAL_CACHE[key] = m
    return m


def _verify_layout(spec, seq_lens: list[int]):
    """Per-request draft sizes and [n, n] tree masks of a TARGET_VERIFY batch.

    LONGSPEC's verify input carries the step's VerifyLayout (ragged sizes, compact per-request masks).
    SGLang's NGRAM input carries a flat custom_mask: on CPU [bs, n, n] (tree part only); in the
    GPU FULL_MASK layout one [n, seq_len + n] block per request whose prefix columns are all true,
    of which only the last n columns are read (the prefix needs no mask).
    """
    layout = getattr(spec, "layout", None)
    if isinstance(layout, VerifyLayout):
        return layout.q_lens, list(layout.tree_masks)
    n = int(spec.draft_token_num)
    bs = len(seq_lens)
    flat = spec.custom_mask.reshape(-1)
    if flat.numel() == bs * n * n:
        return [n] * bs, list(flat.view(bs, n, n).to(torch.bool).unbind(0))
    out, offset = [], 0
    cols = torch.arange(n)
    for s in seq_lens:
        width = s + n
        rows = flat[offset : offset + n * width].view(n, width)
        out.append(rows[:, s + cols].to(torch.bool))
        offset += n * width
    return [n] * bs, out
