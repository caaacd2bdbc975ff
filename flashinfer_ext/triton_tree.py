"""Triton kernel: ragged-batch attention over a token-indexed KV pool, optional per-request mask, with LSE.

One kernel serves both halves of hybrid tree attention:

- the draft-tree part: queries = the n_i tree tokens of request i, keys = the same n_i tokens (their
  pool slots), per-request [n_i, n_i] tree mask (``tree_attention_with_lse``);
- a mask-free part over long KV (the committed prefix) with split-KV for parallelism
  (``ragged_attention_with_lse(..., num_splits>1)``): the fallback for the prefix when FlashInfer is
  not installed.

Kernel layout: program (row block, kv head, kv split). GQA is handled by packing the G = Hq / Hkv
query heads that share one kv head into the row dimension (row r -> query r // G, head kvh*G + r % G),
so each K/V tile is loaded once per kv head, not once per query head. Scores use exp2 with
sm_scale*log2(e) folded in; the LSE is returned in natural log (default) or base 2 (FlashInfer's
convention, ``lse_base2=True``). Rows that attend to nothing give out 0 and lse -inf.

CPU tensors run through the Triton interpreter, which (triton 3.x) needs TRITON_INTERPRET=1 in the
environment before triton is first imported, because triton.language's own helpers (tl.zeros, ...)
are decorated at import; see :func:`interpreter_ready`. CUDA tensors use the compiled kernel.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from flashinfer_ext.kernel_config import cuda_launch_config

__all__ = [
    "ragged_attention_with_lse",
    "tree_attention_with_lse",
    "triton_batch_hybrid_tree_attention",
    "choose_num_splits",
    "triton_available",
    "interpreter_ready",
]

_LOG2E = 1.4426950408889634

try:
    import triton
    import triton.language as tl

    _TRITON_IMPORT_ERROR: Optional[BaseException] = None
except Exception as e:  # pragma: no cover - triton missing
    triton = None
    tl = None
    _TRITON_IMPORT_ERROR = e


def triton_available() -> bool:
    return triton is not None


if triton is not None:

    def _ragged_attn_fwd(
        Q, K, V, O, LSE,
        QO_INDPTR, KV_INDPTR, KV_INDICES, MASK, MASK_INDPTR,
        qk_scale_log2, kv_chunk, m_blocks,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
        stride_os, stride_ot, stride_oh, stride_ls, stride_lt,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        HAS_MASK: tl.constexpr, LSE_BASE2: tl.constexpr, IEEE_FP32: tl.constexpr,
    ):
        pid = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        b = pid // m_blocks
        mb = pid % m_blocks
        q_start = tl.load(QO_INDPTR + b)
        n_q = tl.load(QO_INDPTR + b + 1) - q_start
        if mb * BLOCK_M >= n_q * GROUP:
            return
        kv_start = tl.load(KV_INDPTR + b)
        kv_len = tl.load(KV_INDPTR + b + 1) - kv_start
        lo = split * kv_chunk
        hi = tl.minimum(lo + kv_chunk, kv_len)

        rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        qi = rows // GROUP
        head = kvh * GROUP + rows % GROUP
        row_ok = qi < n_q
        tok = (q_start + qi).to(tl.int64)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        q = tl.load(Q + tok[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        mask_base = 0
        if HAS_MASK:
            mask_base = tl.load(MASK_INDPTR + b).to(tl.int64)
        for start in range(lo, hi, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            col_ok = cols < hi
            slot = tl.load(KV_INDICES + kv_start + cols, mask=col_ok, other=0).to(tl.int64)
            kt = tl.load(K + slot[None, :] * stride_kt + kvh * stride_kh + d[:, None],
                         mask=col_ok[None, :] & d_ok[:, None], other=0.0)  # [BLOCK_D, BLOCK_N]
            if IEEE_FP32:
                s = tl.dot(q, kt, input_precision="ieee")
            else:
                s = tl.dot(q, kt)
            s = s * qk_scale_log2
            ok = row_ok[:, None] & col_ok[None, :]
            if HAS_MASK:
                mv = tl.load(MASK + mask_base + qi[:, None].to(tl.int64) * kv_len + cols[None, :],
                             mask=ok, other=0)
                ok = ok & (mv != 0)
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: keep exp2 finite
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + slot[:, None] * stride_vt + kvh * stride_vh + d[None, :],
                        mask=col_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
            if IEEE_FP32:
                pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        has = l_i > 0.0
        l_safe = tl.where(has, l_i, 1.0)
        out = acc / l_safe[:, None]
        lse = tl.where(has, m_i + tl.log2(l_safe), float("-inf"))
        if not LSE_BASE2:
            lse = lse * 0.6931471805599453
        o_ptrs = O + split * stride_os + tok[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
        tl.store(LSE + split * stride_ls + tok * stride_lt + head, lse, mask=row_ok)

    _KERNEL = None

    def _kernel(device_type: str):
        global _KERNEL
        if device_type == "cpu" and not interpreter_ready():
            raise RuntimeError(
                "Triton kernels on CPU tensors run in the Triton interpreter, which needs "
                "TRITON_INTERPRET=1 in the environment BEFORE triton is first imported "
                "(e.g. `TRITON_INTERPRET=1 python -m pytest tests/test_attention_triton.py`)")
        if _KERNEL is None:
            # with TRITON_INTERPRET=1 this is an InterpretedFunction, otherwise a compiled JITFunction
            _KERNEL = triton.jit(_ragged_attn_fwd)
        return _KERNEL


def interpreter_ready() -> bool:
    """True when triton was imported in interpreter mode (TRITON_INTERPRET=1 set before import):
    only then do its own @jit helpers (tl.zeros, tl.max, ...) run on CPU tensors."""
    if triton is None:
        return False
    return type(tl.zeros).__name__ == "InterpretedFunction"


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _host_ints(x) -> list:
    if isinstance(x, Tensor):
        return x.detach().to("cpu").tolist()
    return [int(v) for v in x]


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def choose_num_splits(num_programs: int, max_kv_len: int, num_sms: int, block_n: int = 64,
                      min_keys_per_split: int = 512, max_splits: int = 64) -> int:
    """Split the KV range so that the grid fills the GPU (about two programs per SM), but never
    below min_keys_per_split keys per split (the partial-state merge is not free)."""
    if max_kv_len <= min_keys_per_split or num_programs >= 2 * num_sms:
        return 1
    want = -(-2 * num_sms // max(num_programs, 1))
    cap = max(1, max_kv_len // min_keys_per_split)
    return int(max(1, min(want, cap, max_splits)))


def ragged_attention_with_lse(q: Tensor, k_cache: Tensor, v_cache: Tensor, qo_indptr: Tensor,
                              kv_indptr: Tensor, kv_indices: Tensor, mask: Optional[Tensor] = None,
                              mask_indptr: Optional[Tensor] = None, sm_scale: Optional[float] = None,
                              *, max_qo_len: Optional[int] = None, max_kv_len: Optional[int] = None,
                              num_splits: int = 1, lse_base2: bool = False,
                              block_m: Optional[int] = None, block_n: Optional[int] = None,
                              num_warps: Optional[int] = None,
                              num_stages: Optional[int] = None,
                              out_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor]:
    """Ragged attention from a token-indexed pool. Returns (out [T, Hq, D] q.dtype, lse f32 [T, Hq]).

    q [T, Hq, D] (request i at qo_indptr[i]:qo_indptr[i+1]); k_cache/v_cache [S, Hkv, D];
    request i attends the slots kv_indices[kv_indptr[i]:kv_indptr[i+1]] in that order; mask (bool or
    uint8, flattened) holds request i's row-major [n_i, kv_len_i] mask at mask_indptr[i]
    (None = no mask). qo_indptr/kv_indptr/kv_indices/mask_indptr must be int32 or int64 on q's
    device. max_qo_len / max_kv_len avoid a device->host read when given (plan() passes them).
    num_splits > 1 splits every request's KV range into that many chunks (partial states merged by
    LSE afterwards). lse_base2 returns FlashInfer's base-2 LSE instead of the natural log.
    out_dtype: dtype of out (default q.dtype; float32 keeps partial states exact for a later merge).
    """
    if triton is None:  # pragma: no cover
        raise RuntimeError(f"triton is not importable: {_TRITON_IMPORT_ERROR}")
    total, hq, d = q.shape
    _, hkv, dk = k_cache.shape
    if dk != d or v_cache.shape != k_cache.shape or hq % hkv:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k_cache.shape)}, "
                         f"v {tuple(v_cache.shape)}")
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        # The interpreter runs tl.dot on bf16 through numpy, which has no bf16: it returned
        # wrong numbers without an error. Refused rather than silently wrong.
        raise ValueError("the Triton interpreter (CPU tensors) does not compute bfloat16 "
                         "correctly; use float16 or float32 on CPU, or a CUDA device")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"q/k/v dtypes must match, got {q.dtype}/{k_cache.dtype}/{v_cache.dtype}")
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(d)
    group = hq // hkv
    dev = q.device
    out = torch.empty(total, hq, d, dtype=out_dtype or q.dtype, device=q.device)
    lse = torch.empty(total, hq, dtype=torch.float32, device=dev)
    bs = qo_indptr.numel() - 1
    if total == 0 or bs <= 0:
        return out, lse
    if max_qo_len is None or max_kv_len is None:
        qo_h, kv_h = _host_ints(qo_indptr), _host_ints(kv_indptr)
        max_qo_len = max(b - a for a, b in zip(qo_h[:-1], qo_h[1:]))
        max_kv_len = max(b - a for a, b in zip(kv_h[:-1], kv_h[1:]))
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache/v_cache must be contiguous in the head dimension")

    rows = max_qo_len * group
    if dev.type == "cuda":
        # blocks and warps that compile for sm_90a without spills (flashinfer_ext.kernel_config)
        cfg = cuda_launch_config(q.dtype, d, rows)
        bm, bn = block_m or cfg.block_m, block_n or cfg.block_n
        num_warps, num_stages = num_warps or cfg.num_warps, num_stages or cfg.num_stages
    else:
        bm = block_m or (16 if rows <= 16 else 32 if rows <= 32 else 64)
        bn = block_n or max(16, min(64, _next_pow2(max_kv_len)))
    bd = max(16, _next_pow2(d))
    m_blocks = max(1, -(-rows // bm))
    num_splits = max(1, int(num_splits))
    if max_kv_len <= 0:
        num_splits = 1
    kv_chunk = -(-max(max_kv_len, 1) // num_splits)
    kv_chunk = -(-kv_chunk // bn) * bn
    num_splits = max(1, -(-max(max_kv_len, 1) // kv_chunk))

    if num_splits == 1:
        o_buf, l_buf = out.unsqueeze(0), lse.unsqueeze(0)
    else:
        o_buf = torch.empty(num_splits, total, hq, d, dtype=torch.float32, device=dev)
        l_buf = torch.empty(num_splits, total, hq, dtype=torch.float32, device=dev)
    has_mask = mask is not None
    if has_mask:
        if mask_indptr is None:
            raise ValueError("mask_indptr is required with a mask")
        mask_arg = mask.reshape(-1)
        if mask_arg.dtype == torch.bool:
            mask_arg = mask_arg.view(torch.uint8)
        mask_indptr_arg = mask_indptr
    else:
        mask_arg, mask_indptr_arg = kv_indices, kv_indptr  # unused placeholders

    grid = (bs * m_blocks, hkv, num_splits)
    launch = dict(GROUP=group, HEAD_DIM=d, BLOCK_D=bd, BLOCK_M=bm, BLOCK_N=bn, HAS_MASK=has_mask,
                  LSE_BASE2=bool(lse_base2 and num_splits == 1),
                  IEEE_FP32=(q.dtype == torch.float32))
    if dev.type == "cuda":
        launch.update(num_warps=num_warps, num_stages=num_stages)
    _kernel(dev.type)[grid](
        q, k_cache, v_cache, o_buf, l_buf,
        qo_indptr, kv_indptr, kv_indices, mask_arg, mask_indptr_arg,
        float(sm_scale) * _LOG2E, kv_chunk, m_blocks,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1),
        o_buf.stride(0), o_buf.stride(1), o_buf.stride(2), l_buf.stride(0), l_buf.stride(1),
        **launch,
    )
    if num_splits > 1:
        from flashinfer_ext.reference import merge_attention_states_many

        # a split past a request's KV length runs an empty loop and writes out 0 / lse -inf
        o_m, l_m = merge_attention_states_many(o_buf, l_buf)
        out.copy_(o_m)
        lse.copy_(l_m * _LOG2E if lse_base2 else l_m)
    return out, lse


def tree_attention_with_lse(q: Tensor, k_cache: Tensor, v_cache: Tensor, qo_indptr: Tensor,
                            tree_kv_indices: Tensor, tree_mask_flat: Tensor, tree_mask_indptr: Tensor,
                            sm_scale: Optional[float] = None, *, max_tree_len: Optional[int] = None,
                            lse_base2: bool = False, **kw) -> tuple[Tensor, Tensor]:
    """Draft-tree part: request i's n_i queries attend its n_i tree slots under its [n_i, n_i] mask."""
    return ragged_attention_with_lse(q, k_cache, v_cache, qo_indptr, qo_indptr, tree_kv_indices,
                                     tree_mask_flat, tree_mask_indptr, sm_scale,
                                     max_qo_len=max_tree_len, max_kv_len=max_tree_len,
                                     num_splits=1, lse_base2=lse_base2, **kw)


def triton_batch_hybrid_tree_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, qo_indptr: Tensor,
                                       prefix_kv_indices: Tensor, prefix_kv_indptr: Tensor,
                                       tree_kv_indices: Tensor, tree_mask_flat: Tensor,
                                       tree_mask_indptr: Tensor, sm_scale: Optional[float] = None,
                                       return_lse: bool = False, num_splits: Optional[int] = None):
    """Same contract as reference.batch_hybrid_tree_attention, all in Triton (prefix with split-KV,
    tree with mask) plus an LSE merge. Used where FlashInfer is unavailable, and in tests."""
    from flashinfer_ext.reference import merge_attention_states

    qo_h = _host_ints(qo_indptr)
    pp_h = _host_ints(prefix_kv_indptr)
    max_n = max([b - a for a, b in zip(qo_h[:-1], qo_h[1:])] + [0])
    max_p = max([b - a for a, b in zip(pp_h[:-1], pp_h[1:])] + [0])
    dev = q.device
    idx = dict(dtype=torch.int32, device=dev)
    qo_t = torch.as_tensor(qo_h, **idx)
    o_t, l_t = tree_attention_with_lse(q, k_cache, v_cache, qo_t, tree_kv_indices.to(dev),
                                       tree_mask_flat.to(dev),
                                       torch.as_tensor(_host_ints(tree_mask_indptr), **idx).to(torch.int64),
                                       sm_scale, max_tree_len=max_n, out_dtype=torch.float32)
    if max_p == 0:
        o_t = o_t.to(q.dtype)
        return (o_t, l_t) if return_lse else o_t
    group = q.shape[1] // k_cache.shape[1]
    if num_splits is None:
        programs = (len(qo_h) - 1) * max(1, -(-max_n * group // 64)) * k_cache.shape[1]
        num_splits = choose_num_splits(programs, max_p, _num_sms(dev))
    o_p, l_p = ragged_attention_with_lse(q, k_cache, v_cache, qo_t, torch.as_tensor(pp_h, **idx),
                                         prefix_kv_indices.to(dev), None, None, sm_scale,
                                         max_qo_len=max_n, max_kv_len=max_p, num_splits=num_splits,
                                         out_dtype=torch.float32)
    out, lse = merge_attention_states(o_t, l_t, o_p, l_p)
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out
