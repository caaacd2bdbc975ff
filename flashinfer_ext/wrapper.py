"""``HybridTreeVerifyWrapper``: plan once per verify step, run once per layer (FlashInfer style).

Semantics (identical on every backend, and equal to :func:`flashinfer_ext.reference.batch_hybrid_tree_attention`
when no shared prefix is planned): the tree queries of request i attend

1. optionally a SHARED prefix (cascade level 0): rows ``shared_qo_indptr[g]:shared_qo_indptr[g+1]`` (a
   group of consecutive requests) attend ``shared_kv_indices[shared_kv_indptr[g]:shared_kv_indptr[g+1]]``
   without a mask; the KV of a prefix that many agent requests share is then read once per group,
   not once per request;
2. its own committed prefix ``prefix_kv_indices[prefix_kv_indptr[i]:prefix_kv_indptr[i+1]]`` without a
   mask;
3. its n_i tree slots ``tree_kv_indices[qo_indptr[i]:qo_indptr[i+1]]`` under its [n_i, n_i] tree mask;

and the partial states are merged by LSE. Equivalent to dense attention over
``concat(shared, prefix, tree)`` with mask ``[ones | ones | tree_mask]``.

Backends:
- ``"torch"``: :mod:`flashinfer_ext.reference` (the CPU production path; any device);
- ``"flashinfer"`` (CUDA): prefix levels through ``BatchPrefillWithPagedKVCacheWrapper`` (page size 1
  over the token-indexed pool, ``causal=False``, ``return_lse=True``), tree part through the Triton
  kernel with base-2 LSE, merged with ``flashinfer.merge_state`` (base-2 LSE throughout);
- ``"triton"`` (CUDA, or CPU under TRITON_INTERPRET=1): everything in the Triton kernel (prefix with
  split-KV), merged in PyTorch;
- ``"auto"``: CPU -> torch; CUDA -> flashinfer when importable, else triton.

The KV cache passed to :meth:`run` is ``(k_cache, v_cache)``, each ``[num_slots, Hkv, D]`` (SGLang's
token-indexed pool layout), or one tensor ``[num_slots, 2, Hkv, D]``.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

from flashinfer_ext import reference as ref

__all__ = ["HybridTreeVerifyWrapper", "flashinfer_available", "host_to_device"]

_LOG2E = 1.4426950408889634


def flashinfer_available() -> bool:
    """True when flashinfer imports (never imported on a machine without CUDA)."""
    if not torch.cuda.is_available():
        return False
    try:
        import flashinfer  # noqa: F401
    except Exception:
        return False
    return True


def host_to_device(values, device, dtype: Optional[torch.dtype] = None) -> Tensor:
    """A host list or CPU tensor on `device` without waiting for the device: on CUDA through
    pinned memory, copied asynchronously on the current stream (a copy from pageable memory
    would synchronise). The pinned staging buffer is kept alive by PyTorch's host allocator until
    the copy has run."""
    t = values if isinstance(values, Tensor) else torch.tensor(values, dtype=dtype)
    if dtype is not None:
        t = t.to(dtype)
    device = torch.device(device)
    if device.type != "cuda" or t.device.type == "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _ints(x) -> list:
    if x is None:
        return None
    if isinstance(x, Tensor):
        return x.detach().to("cpu").tolist()
    return [int(v) for v in x]


def _lens(indptr: list) -> list:
    return [b - a for a, b in zip(indptr[:-1], indptr[1:])]


class HybridTreeVerifyWrapper:
    """Plan/run wrapper for hybrid tree attention in the verify pass.

    >>> w = HybridTreeVerifyWrapper()                       # CPU: torch reference
    >>> w.plan(qo_indptr, prefix_kv_indptr, prefix_kv_indices, tree_kv_indices,
    ...        tree_mask_flat, tree_mask_indptr, num_qo_heads=32, num_kv_heads=8, head_dim=128)
    >>> out = w.run(q, (k_cache, v_cache))                   # once per layer
    """

    def __init__(self, float_workspace_buffer: Optional[Tensor] = None, kv_layout: str = "NHD",
                 backend: str = "auto", device: Union[str, torch.device, None] = None):
        if kv_layout != "NHD":
            raise ValueError("only the NHD token-pool layout ([num_slots, Hkv, D]) is supported")
        if backend not in ("auto", "torch", "triton", "flashinfer"):
            raise ValueError(f"unknown backend {backend!r}")
        self._workspace = float_workspace_buffer
        if device is None:
            device = float_workspace_buffer.device if float_workspace_buffer is not None else "cpu"
        self.device = torch.device(device)
        self._requested_backend = backend
        self.backend = self._resolve_backend(backend)
        self._planned = False
        self._fi_levels: list = []
        self._fi_wrappers: dict = {}

    # ------------------------------------------------------------------------------------ plan
    def _resolve_backend(self, backend: str) -> str:
        if backend != "auto":
            if backend == "flashinfer" and not flashinfer_available():
                raise RuntimeError("backend='flashinfer' needs CUDA and the flashinfer package")
            return backend
        if self.device.type != "cuda":
            return "torch"
        return "flashinfer" if flashinfer_available() else "triton"

    def plan(self, qo_indptr, prefix_kv_indptr, prefix_kv_indices: Tensor, tree_kv_indices: Tensor,
             tree_mask_flat: Tensor, tree_mask_indptr, num_qo_heads: int, num_kv_heads: int,
             head_dim: int, sm_scale: Optional[float] = None,
             q_data_type: torch.dtype = torch.bfloat16, kv_data_type: Optional[torch.dtype] = None,
             shared_qo_indptr=None, shared_kv_indptr=None, shared_kv_indices: Optional[Tensor] = None,
             num_splits: Optional[int] = None) -> None:
        """Index metadata for one verify step (host-side work happens here, not in run()).

        qo_indptr [B+1]: tree query rows per request; prefix_kv_indptr [B+1] / prefix_kv_indices: each
        request's committed prefix slots; tree_kv_indices [sum n_i]: slots of the tree tokens (node
        order = query order); tree_mask_flat bool with request i's row-major [n_i, n_i] mask at
        tree_mask_indptr[i]. Optional shared level: shared_qo_indptr [G+1] (row ranges, covering all
        rows: shared_qo_indptr[0] == 0 and shared_qo_indptr[-1] == qo_indptr[-1]; a group may have no
        shared KV), shared_kv_indptr [G+1], shared_kv_indices.
        """
        if num_qo_heads % num_kv_heads:
            raise ValueError(f"num_qo_heads={num_qo_heads} must be a multiple of num_kv_heads={num_kv_heads}")
        qo = _ints(qo_indptr)
        pp = _ints(prefix_kv_indptr)
        mp = _ints(tree_mask_indptr)
        bs = len(qo) - 1
        if len(pp) != bs + 1 or len(mp) != bs + 1:
            raise ValueError("qo_indptr, prefix_kv_indptr and tree_mask_indptr must have the same length")
        ns = _lens(qo)
        if any(n < 0 for n in ns) or any(p < 0 for p in _lens(pp)):
            raise ValueError("index pointers must be non-decreasing")
        if any(mp[i + 1] - mp[i] != ns[i] * ns[i] for i in range(bs)):
            raise ValueError("tree_mask_indptr must give n_i * n_i mask elements per request")
        if tree_kv_indices.numel() != qo[-1]:
            raise ValueError(f"tree_kv_indices has {tree_kv_indices.numel()} slots, expected {qo[-1]}")
        self.total_q = qo[-1]
        self.num_qo_heads, self.num_kv_heads, self.head_dim = num_qo_heads, num_kv_heads, head_dim
        self.sm_scale = float(sm_scale) if sm_scale is not None else 1.0 / math.sqrt(head_dim)
        self.q_data_type = q_data_type
        self.kv_data_type = kv_data_type or q_data_type
        self._qo, self._pp, self._mp = qo, pp, mp
        self.max_n = max(ns + [0])
        self.max_prefix = max(_lens(pp) + [0])
        dev = self.device
        self._prefix_idx = prefix_kv_indices.to(dev)
        self._tree_idx = tree_kv_indices.to(dev)
        self._tree_mask = tree_mask_flat.reshape(-1).to(dev)
        # optional shared level
        self._shared = None
        if shared_kv_indices is not None:
            sq, sk = _ints(shared_qo_indptr), _ints(shared_kv_indptr)
            if sq is None or sk is None or len(sq) != len(sk):
                raise ValueError("shared_qo_indptr and shared_kv_indptr are required, same length")
            if sq[0] != 0 or sq[-1] != self.total_q or any(b < a for a, b in zip(sq[:-1], sq[1:])):
                raise ValueError("shared_qo_indptr must run from 0 to qo_indptr[-1], non-decreasing")
            _group_of_requests(qo, sq)  # raises if a request straddles two groups
            self._shared = dict(qo=sq, kv=sk, idx=shared_kv_indices.to(dev),
                                max_q=max(_lens(sq) + [0]), max_kv=max(_lens(sk) + [0]))
        self._num_splits = num_splits
        # FlashInfer's prefill kernels take fp16/bf16 only: float32 on CUDA runs all-Triton
        self._run_backend = self.backend
        if self.backend == "flashinfer" and q_data_type == torch.float32:
            self._run_backend = "triton"
        if self.backend in ("flashinfer", "triton"):
            self._plan_device(dev)
        self._planned = True

    def _plan_device(self, dev: torch.device) -> None:
        i32 = torch.int32
        self._qo_t = host_to_device(self._qo, dev, i32)
        self._pp_t = host_to_device(self._pp, dev, i32)
        self._mp_t = host_to_device(self._mp, dev, torch.int64)
        self._prefix_idx32 = self._prefix_idx.to(torch.int32)
        self._tree_idx32 = self._tree_idx.to(torch.int32)
        self._tree_mask_u8 = self._tree_mask.to(torch.bool).view(torch.uint8)
        empty_rows = []
        for i, p in enumerate(_lens(self._pp)):
            if p == 0:
                empty_rows.extend(range(self._qo[i], self._qo[i + 1]))
        self._empty_prefix_rows = host_to_device(empty_rows, dev, torch.int64) if empty_rows else None
        if self._shared is not None:
            sh = self._shared
            sh["qo_t"] = host_to_device(sh["qo"], dev, i32)
            sh["kv_t"] = host_to_device(sh["kv"], dev, i32)
            sh["idx32"] = sh["idx"].to(torch.int32)
            rows = []
            for g, k in enumerate(_lens(sh["kv"])):
                if k == 0:
                    rows.extend(range(sh["qo"][g], sh["qo"][g + 1]))
            sh["empty_rows"] = host_to_device(rows, dev, torch.int64) if rows else None
        # split-KV plan for the all-Triton path (also the fp32 path of backend='flashinfer')
        from flashinfer_ext.triton_tree import _num_sms, choose_num_splits

        group = self.num_qo_heads // self.num_kv_heads

        def splits(bs, max_q, max_kv):
            if self._num_splits is not None:
                return self._num_splits
            programs = bs * max(1, -(-max_q * group // 64)) * self.num_kv_heads
            return choose_num_splits(programs, max_kv, _num_sms(dev))

        self._prefix_splits = splits(len(self._qo) - 1, self.max_n, self.max_prefix)
        if self._shared is not None:
            sh = self._shared
            sh["splits"] = splits(len(sh["qo"]) - 1, sh["max_q"], sh["max_kv"])
        if self._run_backend == "flashinfer":
            self._plan_flashinfer(dev)

    def _plan_flashinfer(self, dev: torch.device) -> None:
        import flashinfer

        if self._workspace is None:
            self._workspace = torch.empty(128 * 1024 * 1024, dtype=torch.uint8, device=dev)
        self._fi_levels = []
        levels = []
        if self._shared is not None and self._shared["max_kv"] > 0:
            sh = self._shared
            levels.append(("shared", sh["qo"], sh["kv"], sh["idx32"], sh["empty_rows"]))
        if self.max_prefix > 0:
            levels.append(("prefix", self._qo, self._pp, self._prefix_idx32, self._empty_prefix_rows))
        for name, qo_host, kv_host, idx, empty_rows in levels:
            # one FlashInfer wrapper per level, created once (each holds pinned host buffers) and
            # re-planned every verify step; levels run one after another on the same stream, so
            # they can share the float workspace
            w = self._fi_wrappers.get(name)
            if w is None:
                w = self._fi_wrappers[name] = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
                    self._workspace, "NHD")
            # Page size 1 over the token pool: a request with no KV has 0 pages and last_page_len
            # 0. The index pointers and page lengths go in as host tensors: FlashInfer's plan
            # reads them on the host (a device tensor there is read back, a sync per level).
            host = dict(dtype=torch.int32)
            last = torch.tensor([1 if n > 0 else 0 for n in _lens(kv_host)], **host)
            w.plan(qo_indptr=torch.tensor(qo_host, **host),
                   paged_kv_indptr=torch.tensor(kv_host, **host), paged_kv_indices=idx,
                   paged_kv_last_page_len=last, num_qo_heads=self.num_qo_heads,
                   num_kv_heads=self.num_kv_heads, head_dim_qk=self.head_dim, page_size=1,
                   causal=False, sm_scale=self.sm_scale, q_data_type=self.q_data_type,
                   kv_data_type=self.kv_data_type)
            self._fi_levels.append((name, w, empty_rows))

    # ------------------------------------------------------------------------------------- run
    @staticmethod
    def _split_kv(kv_cache) -> tuple[Tensor, Tensor]:
        if isinstance(kv_cache, (tuple, list)):
            return kv_cache[0], kv_cache[1]
        if kv_cache.dim() == 4 and kv_cache.shape[1] == 2:
            return kv_cache[:, 0], kv_cache[:, 1]
        raise ValueError("kv_cache must be (k_cache, v_cache) or a [num_slots, 2, Hkv, D] tensor")

    def run(self, q: Tensor, kv_cache, return_lse: bool = False):
        """Attention output [sum n_i, Hq, D] in q.dtype (and natural-log lse [sum n_i, Hq] if asked)."""
        if not self._planned:
            raise RuntimeError("call plan() before run()")
        if q.shape != (self.total_q, self.num_qo_heads, self.head_dim):
            raise ValueError(f"q has shape {tuple(q.shape)}, planned "
                             f"{(self.total_q, self.num_qo_heads, self.head_dim)}")
        k_cache, v_cache = self._split_kv(kv_cache)
        if self._run_backend == "torch" or (q.device.type == "cpu" and self._run_backend != "triton"):
            out, lse = self._run_torch(q, k_cache, v_cache)
        elif self._run_backend == "triton":
            out, lse = self._run_triton(q, k_cache, v_cache)
        else:
            out, lse = self._run_flashinfer(q, k_cache, v_cache)
        return (out, lse) if return_lse else out

    def _run_torch(self, q, k_cache, v_cache):
        out, lse = ref.batch_hybrid_tree_attention(
            q, k_cache, v_cache, self._qo, self._prefix_idx, self._pp, self._tree_idx,
            self._tree_mask, self._mp, self.sm_scale, return_lse=True)
        if self._shared is None:
            return out, lse
        sh = self._shared
        for g in range(len(sh["qo"]) - 1):
            s, e = sh["qo"][g], sh["qo"][g + 1]
            ks, ke = sh["kv"][g], sh["kv"][g + 1]
            if e == s or ke == ks:
                continue
            idx = sh["idx"][ks:ke]
            # all rows of the group attend the shared prefix in ONE call (cascade level 0)
            o_s, l_s = ref.attention_with_lse(q[s:e], ref.gather_kv(k_cache, idx),
                                              ref.gather_kv(v_cache, idx), self.sm_scale)
            o_m, l_m = ref.merge_attention_states(o_s.float(), l_s, out[s:e].float(), lse[s:e])
            out[s:e] = o_m.to(out.dtype)
            lse[s:e] = l_m
        return out, lse

    def _run_triton(self, q, k_cache, v_cache):
        from flashinfer_ext.triton_tree import ragged_attention_with_lse

        f32 = torch.float32
        out, lse = ragged_attention_with_lse(
            q, k_cache, v_cache, self._qo_t, self._qo_t, self._tree_idx32, self._tree_mask_u8,
            self._mp_t, self.sm_scale, max_qo_len=self.max_n, max_kv_len=self.max_n, out_dtype=f32)
        if self.max_prefix > 0:
            o_p, l_p = ragged_attention_with_lse(
                q, k_cache, v_cache, self._qo_t, self._pp_t, self._prefix_idx32, None, None,
                self.sm_scale, max_qo_len=self.max_n, max_kv_len=self.max_prefix,
                num_splits=self._prefix_splits, out_dtype=f32)
            out, lse = ref.merge_attention_states(out, lse, o_p, l_p)
        sh = self._shared
        if sh is not None and sh["max_kv"] > 0:
            o_s, l_s = ragged_attention_with_lse(
                q, k_cache, v_cache, sh["qo_t"], sh["kv_t"], sh["idx32"], None, None, self.sm_scale,
                max_qo_len=sh["max_q"], max_kv_len=sh["max_kv"], num_splits=sh["splits"], out_dtype=f32)
            out, lse = ref.merge_attention_states(out, lse, o_s, l_s)
        return out.to(q.dtype), lse

    def _run_flashinfer(self, q, k_cache, v_cache):
        import flashinfer
        from flashinfer_ext.triton_tree import ragged_attention_with_lse

        # tree part: Triton, base-2 LSE (FlashInfer's convention), output in q.dtype for merge_state
        out, lse2 = ragged_attention_with_lse(
            q, k_cache, v_cache, self._qo_t, self._qo_t, self._tree_idx32, self._tree_mask_u8,
            self._mp_t, self.sm_scale, max_qo_len=self.max_n, max_kv_len=self.max_n, lse_base2=True)
        paged = (k_cache.unsqueeze(1), v_cache.unsqueeze(1))  # [num_slots, page_size=1, Hkv, D]
        for _name, w, empty_rows in self._fi_levels:
            o_l, l_l = w.run(q, paged, return_lse=True)
            if empty_rows is not None:  # rows with no KV at this level: make them exact identities
                o_l.index_fill_(0, empty_rows, 0)
                l_l.index_fill_(0, empty_rows, float("-inf"))
            flashinfer.merge_state_in_place(out, lse2, o_l, l_l)
        return out, lse2 / _LOG2E


def _group_of_requests(qo: list, sq: list) -> list:
    """Group index of every request (its rows must lie inside one group); -1 for empty requests."""
    import bisect

    out = []
    for i in range(len(qo) - 1):
        a, b = qo[i], qo[i + 1]
        if b == a:
            out.append(-1)
            continue
        g = bisect.bisect_right(sq, a) - 1
        if g < 0 or g >= len(sq) - 1 or b > sq[g + 1]:
            raise ValueError(f"request {i} (rows {a}:{b}) straddles shared-prefix groups {sq}")
        out.append(g)
    return out


def reference_with_shared_prefix(q, k_cache, v_cache, qo_indptr, prefix_kv_indices, prefix_kv_indptr,
                                 tree_kv_indices, tree_mask_flat, tree_mask_indptr, sm_scale,
                                 shared_qo_indptr, shared_kv_indptr, shared_kv_indices) -> Tensor:
    """Oracle for the shared-prefix semantics: per request, put its group's shared slots in front of
    its own prefix and call the single-level reference (no cascade sharing)."""
    qo, pp = _ints(qo_indptr), _ints(prefix_kv_indptr)
    sq, sk = _ints(shared_qo_indptr), _ints(shared_kv_indptr)
    new_idx, new_ptr = [], [0]
    for i, g in enumerate(_group_of_requests(qo, sq)):
        parts = [shared_kv_indices[sk[g]:sk[g + 1]]] if g >= 0 else []
        parts.append(prefix_kv_indices[pp[i]:pp[i + 1]])
        cat = torch.cat(parts)
        new_idx.append(cat)
        new_ptr.append(new_ptr[-1] + cat.numel())
    return ref.batch_hybrid_tree_attention(q, k_cache, v_cache, qo, torch.cat(new_idx), new_ptr,
                                           tree_kv_indices, tree_mask_flat, tree_mask_indptr, sm_scale)
