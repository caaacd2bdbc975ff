"""Pure-PyTorch attention for the verify pass: the CPU production path and the reference for kernels.

Layouts follow FlashInfer's ragged "NHD" convention:

- queries ``q`` are ``[nq, Hq, D]``; keys/values ``k``/``v`` are ``[nk, Hkv, D]`` with ``Hq % Hkv == 0``
  (grouped-query attention: query head ``h`` reads kv head ``h // (Hq // Hkv)``);
- every LSE returned here is float32 ``[nq, Hq]`` in the NATURAL log (FlashInfer's own kernels use
  base 2: see :func:`lse_to_base2` / :func:`lse_from_base2`);
- rows that may attend to nothing produce ``out = 0`` and ``lse = -inf`` (never NaN), so that an LSE
  merge with such a state is the identity.

Hybrid tree attention (LongSpec): the ``n`` draft-tree queries of one request attend to (a) the
committed prefix with NO mask and (b) the ``n`` tree slots under the ancestor-or-self tree mask; the
two partial states are merged by their LSEs.  This is exactly dense attention over
``concat(prefix, tree)`` with the mask ``[ones(n, P) | tree_mask]`` but it never builds an ``[n, P]``
mask, and the prefix part runs through PyTorch's blocked CPU flash-attention kernel (when present),
which never materialises the ``[n, P]`` score matrix either.

Performance notes (CPU): GQA is handled by packing the ``G = Hq // Hkv`` query heads that share a kv
head into the row dimension (``[Hkv, G * nq, D]``) instead of repeating K/V; all arithmetic
accumulates in float32 (or float64 for float64 inputs); K/V of a token-indexed pool are gathered
only when the slot indices are not a contiguous range.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

__all__ = [
    "attention_with_lse",
    "merge_attention_states",
    "merge_attention_states_many",
    "hybrid_tree_attention",
    "batch_hybrid_tree_attention",
    "dense_tree_verify_attention",
    "gather_kv",
    "lse_to_base2",
    "lse_from_base2",
    "LOG2E",
]

LOG2E = 1.4426950408889634  # 1 / ln(2)
_NEG_INF = float("-inf")

# Masked attention with at most this many score elements (Hq * nq * nk) is computed with explicit
# float32 math; larger masked problems go through the blocked CPU flash kernel with an additive mask.
_EXPLICIT_MAX_SCORES = 1 << 20
# Unmasked attention over at least this many keys packs GQA query heads into rows (measured on a
# 2-core x86 box, Hq 32 / Hkv 8 / D 128: packing wins from ~4K keys, loses at 1-2K).
_PACK_MIN_KEYS = 3072

try:  # private ATen op (torch >= 2.2): blocked CPU flash attention that also returns the LSE.
    _CPU_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
except (AttributeError, RuntimeError):  # pragma: no cover - depends on the torch build
    _CPU_FLASH = None
_CPU_FLASH_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_cpu_flash_ok = _CPU_FLASH is not None


def lse_to_base2(lse: Tensor) -> Tensor:
    """Natural-log LSE -> base-2 LSE (FlashInfer's convention). -inf stays -inf."""
    return lse * LOG2E


def lse_from_base2(lse2: Tensor) -> Tensor:
    """Base-2 LSE (FlashInfer) -> natural-log LSE. -inf stays -inf."""
    return lse2 / LOG2E


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_qkv(q: Tensor, k: Tensor, v: Tensor) -> tuple[int, int, int, int, int]:
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"expected q [nq,Hq,D], k/v [nk,Hkv,D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    nq, hq, d = q.shape
    nk, hkv, dk = k.shape
    if k.shape != v.shape or dk != d:
        raise ValueError(f"k/v shapes {tuple(k.shape)} / {tuple(v.shape)} do not match q head dim {d}")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"Hq={hq} must be a multiple of Hkv={hkv}")
    return nq, hq, hkv, nk, d


def _pack_q(q: Tensor, hkv: int) -> Tensor:
    """[nq, Hq, D] -> [Hkv, G*nq, D] with packed row r = g * nq + i (a copy only when needed)."""
    nq, hq, d = q.shape
    g = hq // hkv
    return q.view(nq, hkv, g, d).permute(1, 2, 0, 3).reshape(hkv, g * nq, d)


def _unpack_o(o: Tensor, nq: int) -> Tensor:
    """[Hkv, G*nq, D] -> [nq, Hq, D]."""
    hkv, gn, d = o.shape
    g = gn // nq if nq else 0
    return o.view(hkv, g, nq, d).permute(2, 0, 1, 3).reshape(nq, hkv * g, d)


def _unpack_lse(lse: Tensor, nq: int) -> Tensor:
    """[Hkv, G*nq] -> [nq, Hq]."""
    hkv, gn = lse.shape
    g = gn // nq if nq else 0
    return lse.view(hkv, g, nq).permute(2, 0, 1).reshape(nq, hkv * g)


def _empty_state(nq: int, hq: int, d: int, dtype, device) -> tuple[Tensor, Tensor]:
    return (torch.zeros(nq, hq, d, dtype=dtype, device=device),
            torch.full((nq, hq), _NEG_INF, dtype=torch.float32, device=device))


def _use_cpu_flash(q: Tensor, k: Tensor, v: Tensor) -> bool:
    return (_cpu_flash_ok and q.device.type == "cpu" and q.dtype in _CPU_FLASH_DTYPES
            and k.dtype == q.dtype and v.dtype == q.dtype)


def _unmasked_attention(q: Tensor, k: Tensor, v: Tensor, sm_scale: float,
                        out_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor]:
    """Unmasked attention, nk >= 1. Returns (out [nq,Hq,D] in out_dtype or q.dtype, lse f32)."""
    global _cpu_flash_ok
    nq, hq, hkv, nk, d = _check_qkv(q, k, v)
    out_dtype = out_dtype or q.dtype
    if _use_cpu_flash(q, k, v):
        try:
            if nk >= _PACK_MIN_KEYS:
                # long KV: pack the G query heads of a kv head into rows, so each K/V block is
                # streamed once per kv head (1.3-1.5x less CPU time than per-query-head at 16K)
                qp = _pack_q(q, hkv).unsqueeze(0)  # [1, Hkv, G*nq, D]
                o, lse = _CPU_FLASH(qp, k.permute(1, 0, 2).unsqueeze(0),
                                    v.permute(1, 0, 2).unsqueeze(0), scale=float(sm_scale))
                return _unpack_o(o[0], nq).to(out_dtype), _unpack_lse(lse[0].float(), nq)
            # short KV: batch = kv head, heads = G with K/V broadcast (a stride-0 view, no copy)
            g = hq // hkv
            q4 = q.view(nq, hkv, g, d).permute(1, 2, 0, 3)
            k4 = k.permute(1, 0, 2).unsqueeze(1).expand(hkv, g, nk, d)
            v4 = v.permute(1, 0, 2).unsqueeze(1).expand(hkv, g, nk, d)
            o, lse = _CPU_FLASH(q4, k4, v4, scale=float(sm_scale))
            return (o.permute(2, 0, 1, 3).reshape(nq, hq, d).to(out_dtype),
                    lse.float().permute(2, 0, 1).reshape(nq, hq))
        except RuntimeError:  # pragma: no cover - unexpected build limitation: use explicit math
            _cpu_flash_ok = False
    return _explicit_attention(q, k, v, sm_scale, None, out_dtype)


def _explicit_attention(q: Tensor, k: Tensor, v: Tensor, sm_scale: float, mask: Optional[Tensor],
                        out_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor]:
    """Dense attention with explicit float32 (float64 for float64 inputs) math.

    mask: bool [nq, nk] or None. Query heads of one kv head are packed as rows: [Hkv, G*nq, D].
    """
    nq, hq, hkv, nk, d = _check_qkv(q, k, v)
    g = hq // hkv
    out_dtype = out_dtype or q.dtype
    acc = _acc_dtype(q.dtype)
    qp = _pack_q(q, hkv).to(acc)  # [Hkv, G*nq, D]
    kt = k.permute(1, 2, 0).to(acc)  # [Hkv, D, nk]
    s = torch.matmul(qp, kt)  # [Hkv, G*nq, nk]
    s.mul_(sm_scale)
    s4 = s.view(hkv, g, nq, nk)
    if mask is not None:
        s4.masked_fill_(~mask, _NEG_INF)
    m = s.amax(dim=-1, keepdim=True)  # [Hkv, G*nq, 1]
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # -inf rows: keep exp() finite (=0)
    s.sub_(m).exp_()
    den = s.sum(dim=-1, keepdim=True)
    o = torch.matmul(s, v.permute(1, 0, 2).to(acc))  # [Hkv, G*nq, D]
    o.div_(torch.where(den == 0, torch.ones_like(den), den))
    lse = (m + torch.log(den)).squeeze(-1)  # log(0) = -inf for empty rows
    return _unpack_o(o, nq).to(out_dtype), _unpack_lse(lse.float(), nq)


def _flash_masked_attention(q: Tensor, k: Tensor, v: Tensor, sm_scale: float, mask: Tensor,
                            out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Large masked problems on CPU: blocked flash kernel with an additive mask (no [H,nq,nk] scores).

    GQA without copies: q viewed as [Hkv, G, nq, D] (batch = kv head), K/V broadcast over G.
    """
    nq, hq, hkv, nk, d = _check_qkv(q, k, v)
    g = hq // hkv
    q4 = q.view(nq, hkv, g, d).permute(1, 2, 0, 3)
    k4 = k.permute(1, 0, 2).unsqueeze(1).expand(hkv, g, nk, d)
    v4 = v.permute(1, 0, 2).unsqueeze(1).expand(hkv, g, nk, d)
    add = torch.zeros(nq, nk, dtype=q.dtype, device=q.device).masked_fill_(~mask, _NEG_INF)
    o, lse = _CPU_FLASH(q4, k4, v4, attn_mask=add[None, None], scale=float(sm_scale))
    o = o.permute(2, 0, 1, 3).reshape(nq, hq, d)  # [nq, Hq, D]
    lse = lse.float().permute(2, 0, 1).reshape(nq, hq)
    empty = ~mask.any(dim=-1)  # rows attending nothing: out 0, lse -inf
    if bool(empty.any()):
        o = o.masked_fill(empty[:, None, None], 0)
        lse = lse.masked_fill(empty[:, None], _NEG_INF)
    return o.to(out_dtype), lse


def _causal_mask(nq: int, nk: int, device) -> Tensor:
    """Bottom-right aligned causal mask (FlashInfer): query i attends keys j <= i + (nk - nq)."""
    i = torch.arange(nq, device=device).unsqueeze(1)
    j = torch.arange(nk, device=device).unsqueeze(0)
    return j <= i + (nk - nq)


def _attention_state(q: Tensor, k: Tensor, v: Tensor, sm_scale: float, mask: Optional[Tensor],
                     causal: bool, out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    nq, hq, hkv, nk, d = _check_qkv(q, k, v)
    if mask is not None:
        if mask.shape != (nq, nk):
            raise ValueError(f"mask must be [nq={nq}, nk={nk}], got {tuple(mask.shape)}")
        mask = mask.to(device=q.device, dtype=torch.bool)
    if causal:
        cm = _causal_mask(nq, nk, q.device)
        mask = cm if mask is None else (mask & cm)
    if nq == 0 or nk == 0:
        return _empty_state(nq, hq, d, out_dtype, q.device)
    if mask is None:
        return _unmasked_attention(q, k, v, sm_scale, out_dtype)
    if hq * nq * nk > _EXPLICIT_MAX_SCORES and _use_cpu_flash(q, k, v):
        return _flash_masked_attention(q, k, v, sm_scale, mask, out_dtype)
    return _explicit_attention(q, k, v, sm_scale, mask, out_dtype)


def attention_with_lse(q: Tensor, k: Tensor, v: Tensor, sm_scale: Optional[float] = None,
                       mask: Optional[Tensor] = None, causal: bool = False) -> tuple[Tensor, Tensor]:
    """Attention that also returns the natural-log LSE of each (query, head) row.

    q [nq, Hq, D], k/v [nk, Hkv, D]; mask bool [nq, nk] (True = may attend) or None; causal=True is
    bottom-right aligned (query i attends keys j <= i + nk - nq) and is ANDed with mask.
    Returns (out [nq, Hq, D] in q.dtype, lse float32 [nq, Hq]); empty rows give out 0, lse -inf.
    sm_scale=None means 1/sqrt(D).
    """
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(q.shape[-1])
    return _attention_state(q, k, v, sm_scale, mask, causal, q.dtype)


def merge_attention_states(o_a: Tensor, lse_a: Tensor, o_b: Tensor,
                           lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Merge two partial attention states over disjoint key sets (natural-log LSEs).

    o_* [..., D], lse_* [...] (float32). out = w*o_a + (1-w)*o_b with w = sigmoid(lse_a - lse_b);
    lse = logaddexp(lse_a, lse_b). If both LSEs are -inf the result is out 0, lse -inf. Math in
    float32 (float64 for float64 inputs); out is returned in o_a.dtype.
    """
    acc = _acc_dtype(o_a.dtype)
    la = lse_a.to(acc)
    lb = lse_b.to(acc)
    m = torch.maximum(la, lb)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # both -inf (or +inf guard) -> 0
    wa = torch.exp(la - m)
    wb = torch.exp(lb - m)
    tot = wa + wb
    safe = torch.where(tot == 0, torch.ones_like(tot), tot)
    out = (o_a.to(acc) * (wa / safe).unsqueeze(-1)).add_(o_b.to(acc) * (wb / safe).unsqueeze(-1))
    lse = (m + torch.log(tot)).to(torch.float32)
    return out.to(o_a.dtype), lse


def merge_attention_states_many(o: Tensor, lse: Tensor) -> tuple[Tensor, Tensor]:
    """Merge S partial states stacked on dim 0: o [S, ..., D], lse [S, ...] -> ([..., D], [...])."""
    acc = _acc_dtype(o.dtype)
    lse = lse.to(acc)
    m = lse.amax(dim=0)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    w = torch.exp(lse - m.unsqueeze(0))
    tot = w.sum(dim=0)
    safe = torch.where(tot == 0, torch.ones_like(tot), tot)
    out = (o.to(acc) * (w / safe.unsqueeze(0)).unsqueeze(-1)).sum(dim=0)
    return out.to(o.dtype), (m + torch.log(tot)).to(torch.float32)


def _square_masked_state(q: Tensor, k: Tensor, v: Tensor, sm_scale: float,
                         mask: Tensor) -> tuple[Tensor, Tensor]:
    """Attention of n queries over the same n tokens under an [n, n] mask.

    Draft trees (small): explicit float32 math, float32 output kept for the LSE merge. Large n (a
    prefill chunk through the same entry point): the blocked CPU flash kernel, with is_causal when
    the mask is exactly lower-triangular (no mask tensor at all), else with an additive mask.
    """
    n, hq, _ = q.shape
    acc = _acc_dtype(q.dtype)
    if hq * n * n <= _EXPLICIT_MAX_SCORES or not _use_cpu_flash(q, k, v):
        return _explicit_attention(q, k, v, sm_scale, mask, acc)
    tril = torch.ones(n, n, dtype=torch.bool, device=q.device).tril_()
    if torch.equal(mask, tril):
        hkv = k.shape[1]
        g = hq // hkv
        d = q.shape[-1]
        q4 = q.view(n, hkv, g, d).permute(1, 2, 0, 3)
        k4 = k.permute(1, 0, 2).unsqueeze(1).expand(hkv, g, n, d)
        v4 = v.permute(1, 0, 2).unsqueeze(1).expand(hkv, g, n, d)
        o, lse = _CPU_FLASH(q4, k4, v4, is_causal=True, scale=float(sm_scale))
        return (o.permute(2, 0, 1, 3).reshape(n, hq, d).to(acc),
                lse.float().permute(2, 0, 1).reshape(n, hq))
    return _flash_masked_attention(q, k, v, sm_scale, mask, acc)


def _hybrid_state(q: Tensor, k_prefix: Tensor, v_prefix: Tensor, k_tree: Tensor, v_tree: Tensor,
                  tree_mask: Tensor, sm_scale: float) -> tuple[Tensor, Tensor]:
    """Hybrid tree attention for one request: (out in q.dtype, lse float32)."""
    n, hq, d = q.shape
    if k_tree.shape[0] != n or v_tree.shape[0] != n:
        raise ValueError(f"k_tree/v_tree must have n={n} rows, got {k_tree.shape[0]}/{v_tree.shape[0]}")
    if tree_mask.shape != (n, n):
        raise ValueError(f"tree_mask must be [n={n}, n={n}], got {tuple(tree_mask.shape)}")
    if n == 0:
        return _empty_state(0, hq, d, q.dtype, q.device)
    # (b) tree part under its [n, n] mask (small for draft trees; large n = a prefill chunk)
    o_t, lse_t = _square_masked_state(q, k_tree, v_tree, sm_scale,
                                      tree_mask.to(device=q.device, dtype=torch.bool))
    if k_prefix.shape[0] == 0:
        return o_t.to(q.dtype), lse_t
    # (a) prefix part: no mask at all
    o_p, lse_p = _unmasked_attention(q, k_prefix, v_prefix, sm_scale)
    out, lse = merge_attention_states(o_t, lse_t, o_p, lse_p)  # float32 merge
    return out.to(q.dtype), lse


def hybrid_tree_attention(q: Tensor, k_prefix: Tensor, v_prefix: Tensor, k_tree: Tensor,
                          v_tree: Tensor, tree_mask: Tensor, sm_scale: Optional[float] = None,
                          return_lse: bool = False):
    """LongSpec hybrid tree attention for the n draft-tree slots of ONE request.

    q [n, Hq, D]; k_prefix/v_prefix [P, Hkv, D] (P may be 0), attended without a mask;
    k_tree/v_tree [n, Hkv, D] attended under tree_mask bool [n, n] (ancestor-or-self).
    Equals dense attention over concat(prefix, tree) with mask [ones(n, P) | tree_mask].
    Returns out [n, Hq, D] in q.dtype (and the natural-log lse [n, Hq] if return_lse).
    """
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(q.shape[-1])
    out, lse = _hybrid_state(q, k_prefix, v_prefix, k_tree, v_tree, tree_mask, sm_scale)
    return (out, lse) if return_lse else out


def tree_mask_from_parents(parents) -> Tensor:
    """Ancestor-or-self bool mask [n, n] of a tree in parents-first order (parents[i] in [-1, i-1])."""
    n = len(parents)
    m = torch.zeros(n, n, dtype=torch.bool)
    for i, p in enumerate(parents):
        if p >= 0:
            m[i] = m[p]
        m[i, i] = True
    return m


def _as_list(x) -> list:
    if isinstance(x, Tensor):
        return x.tolist()
    return list(x)


def gather_kv(cache: Tensor, idx: Tensor) -> Tensor:
    """cache[idx] for a token-indexed pool; a zero-copy slice when idx is a contiguous range."""
    n = idx.numel()
    if n == 0:
        return cache[:0]
    if idx.device != cache.device:
        idx = idx.to(cache.device)
    first = int(idx[0])
    if n == 1:
        return cache[first:first + 1]
    last = int(idx[-1])
    if last - first + 1 == n and bool((idx[1:] - idx[:-1] == 1).all()):
        return cache[first:last + 1]
    return cache.index_select(0, idx)


def batch_hybrid_tree_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, qo_indptr,
                                prefix_kv_indices: Tensor, prefix_kv_indptr, tree_kv_indices: Tensor,
                                tree_mask_flat: Tensor, tree_mask_indptr, sm_scale: Optional[float] = None,
                                return_lse: bool = False):
    """Ragged-batch hybrid tree attention straight from a token-indexed KV pool.

    q [sum n_i, Hq, D]: the tree queries of every request, request i at rows qo_indptr[i]:qo_indptr[i+1].
    k_cache/v_cache [num_slots, Hkv, D]: the pool.
    prefix_kv_indices: slots of all committed prefixes; request i owns
      prefix_kv_indices[prefix_kv_indptr[i]:prefix_kv_indptr[i+1]] (may be empty).
    tree_kv_indices [sum n_i]: the slots of the tree tokens (already written to the pool), laid out
      like q (request i at qo_indptr[i]:qo_indptr[i+1], node order = query order).
    tree_mask_flat bool: request i's [n_i, n_i] row-major mask at
      tree_mask_flat[tree_mask_indptr[i]:tree_mask_indptr[i+1]] (n_i*n_i elements).
    Index pointers may be tensors (any device) or sequences of ints.
    Returns out [sum n_i, Hq, D] in q.dtype (and lse float32 [sum n_i, Hq] if return_lse).
    """
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(q.shape[-1])
    qo = _as_list(qo_indptr)
    pp = _as_list(prefix_kv_indptr)
    mp = _as_list(tree_mask_indptr)
    bs = len(qo) - 1
    if len(pp) != bs + 1 or len(mp) != bs + 1:
        raise ValueError(f"indptr lengths disagree: qo={len(qo)} prefix={len(pp)} mask={len(mp)}")
    total, hq, d = q.shape
    if qo[-1] != total or tree_kv_indices.numel() != total:
        raise ValueError(f"qo_indptr[-1]={qo[-1]} and len(tree_kv_indices)={tree_kv_indices.numel()} "
                         f"must equal the number of queries {total}")
    out = torch.empty_like(q)
    lse_all = torch.empty(total, hq, dtype=torch.float32, device=q.device) if return_lse else None
    mask_flat = tree_mask_flat.reshape(-1)
    for i in range(bs):
        s, e = qo[i], qo[i + 1]
        n = e - s
        if mp[i + 1] - mp[i] != n * n:
            raise ValueError(f"request {i}: tree mask has {mp[i + 1] - mp[i]} elements, expected {n * n}")
        if n == 0:
            continue
        t_idx = tree_kv_indices[s:e]
        p_idx = prefix_kv_indices[pp[i]:pp[i + 1]]
        o_i, lse_i = _hybrid_state(q[s:e], gather_kv(k_cache, p_idx), gather_kv(v_cache, p_idx),
                                   gather_kv(k_cache, t_idx), gather_kv(v_cache, t_idx),
                                   mask_flat[mp[i]:mp[i + 1]].view(n, n), sm_scale)
        out[s:e] = o_i
        if return_lse:
            lse_all[s:e] = lse_i
    return (out, lse_all) if return_lse else out


def dense_tree_verify_attention(q: Tensor, k_prefix: Tensor, v_prefix: Tensor, k_tree: Tensor,
                                v_tree: Tensor, tree_mask: Tensor,
                                sm_scale: Optional[float] = None) -> Tensor:
    """The baseline hybrid attention replaces: concat K/V and a dense [n, P + n] mask (one call)."""
    n = q.shape[0]
    p = k_prefix.shape[0]
    mask = torch.ones(n, p + n, dtype=torch.bool, device=q.device)
    mask[:, p:] = tree_mask
    out, _ = attention_with_lse(q, torch.cat([k_prefix, k_tree]), torch.cat([v_prefix, v_tree]),
                                sm_scale, mask=mask)
    return out
