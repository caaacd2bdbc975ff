"""Pure-PyTorch versions of the `sgl_kernel` CPU ops that SGLang's plain and speculative paths call.

SGLang's CPU engine (SGLANG_USE_CPU_ENGINE=1) imports these from `sgl_kernel`, whose CPU build
exists only as C++ source (AVX-512/AMX, libnuma); PyPI has none. Each function here has the same
signature and in-place contract as the op it stands for (semantics read from SGLang's Triton/CUDA
twins of each op) and is tested against a plain-loop reference in tests/test_cpu_ops.py.
The shim package `sgl_kernel` (sgl_longspec/cpu/_shim) re-exports them; it is put on the path
only on machines without CUDA (see sgl_longspec.cpu.prepare_environment).
"""

from __future__ import annotations

import ctypes

import numpy as np
import torch


def _segment_offsets(lengths: torch.Tensor) -> torch.Tensor:
    """Exclusive prefix sum: where each request's slice starts in a packed array."""
    out = torch.zeros_like(lengths)
    if lengths.numel() > 1:
        out[1:] = torch.cumsum(lengths[:-1], 0)
    return out


def _ragged_positions(start: torch.Tensor, end: torch.Tensor):
    """For segments [start_i, end_i): (segment id, position in the row) of every element."""
    lengths = (end - start).to(torch.int64)
    seg = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths)
    within = torch.arange(int(lengths.sum()), device=lengths.device) - _segment_offsets(lengths)[seg]
    return seg, start.to(torch.int64)[seg] + within


def _check_row_ranges(op: str, req_to_token, start_offset, end_offset) -> None:
    """Every [start_i, end_i) inside a req_to_token row, checked before anything is touched.

    The Triton twins of these ops do pointer arithmetic without a row bound: a range past the
    row reads or overwrites the next request's row. Indexing here would raise halfway through
    a write. A range that does not fit is refused whole, naming it (issue 34: a decode-step
    reservation past the row at the end of the context)."""
    if end_offset.numel() == 0:
        return
    width = req_to_token.shape[1]
    start, end = start_offset.to(torch.int64), end_offset.to(torch.int64)
    bad = (start < 0) | (end < start) | (end > width)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise IndexError(f"{op}: slot range [{int(start[i])}, {int(end[i])}) of batch row {i} "
                         f"does not fit a req_to_token row of {width} slots")


def assign_req_to_token_pool_cpu(req_pool_indices, req_to_token, start_offset, end_offset,
                                 out_cache_loc, pool_len):
    """req_to_token[req_pool_indices[i], start_i:end_i] = the i-th packed slice of out_cache_loc."""
    _check_row_ranges("assign_req_to_token_pool", req_to_token, start_offset, end_offset)
    seg, cols = _ragged_positions(start_offset, end_offset)
    if seg.numel() == 0:
        return
    rows = req_pool_indices.to(torch.int64)[seg]
    req_to_token[rows, cols] = out_cache_loc[: seg.numel()].to(req_to_token.dtype)


def assign_extend_cache_locs_cpu(req_pool_indices, req_to_token, start_offset, end_offset,
                                 out_cache_loc, pool_len):
    """out_cache_loc (packed) = req_to_token[req_pool_indices[i], start_i:end_i] for each i."""
    _check_row_ranges("assign_extend_cache_locs", req_to_token, start_offset, end_offset)
    seg, cols = _ragged_positions(start_offset, end_offset)
    if seg.numel() == 0:
        return
    rows = req_pool_indices.to(torch.int64)[seg]
    out_cache_loc[: seg.numel()] = req_to_token[rows, cols].to(out_cache_loc.dtype)


def fill_accept_out_cache_loc_cpu(accept_index, out_cache_loc, accept_out_cache_loc):
    """Pack out_cache_loc[accept_index[j]] for every accept_index[j] != -1, in order."""
    flat = accept_index.reshape(-1)
    kept = flat[flat != -1].to(torch.int64)
    accept_out_cache_loc[: kept.numel()] = out_cache_loc[kept].to(accept_out_cache_loc.dtype)


def fill_bonus_tokens_cpu(accept_tokens, accept_lens, bonus_tokens, accept_stride):
    """bonus_tokens[i] = accept_tokens.flat[i * stride + accept_lens[i] - 1] (the last accepted)."""
    bs = accept_lens.numel()
    idx = torch.arange(bs, device=accept_lens.device) * accept_stride + accept_lens.to(torch.int64) - 1
    bonus_tokens[:bs] = accept_tokens.reshape(-1)[idx].to(bonus_tokens.dtype)


def verify_tree_greedy_cpu(predicts, accept_index, accept_token_num, candidates, retrive_index,
                           retrive_next_token, retrive_next_sibling, target_predict):
    """Greedy tree verification in SGLang's retrieve-link layout (same contract as the CUDA op).

    Per request: walk from the root following first-child / next-sibling links; accept the child
    whose candidate token equals the target's prediction at the last accepted node.
    """
    bs, num_draft = candidates.shape
    num_spec = accept_index.shape[1]
    cand = candidates.tolist()
    r_index = retrive_index.tolist()
    r_next = retrive_next_token.tolist()
    r_sib = retrive_next_sibling.tolist()
    tgt_flat = target_predict.reshape(-1).tolist()
    pred_updates: dict[int, int] = {}
    for b in range(bs):
        last = r_index[b][0]
        accept_index[b, 0] = last
        accepted = 0
        cur = 0
        for _ in range(1, num_spec):
            cur = r_next[b][cur]
            while cur != -1:
                target_tok = tgt_flat[last]
                if cand[b][cur] == target_tok:
                    pred_updates[last] = target_tok
                    accepted += 1
                    accept_index[b, accepted] = r_index[b][cur]
                    last = r_index[b][cur]
                    break
                cur = r_sib[b][cur]
            if cur == -1:
                break
        accept_token_num[b] = accepted
        pred_updates[last] = tgt_flat[last]
    if pred_updates:
        idx = torch.tensor(list(pred_updates.keys()), dtype=torch.int64)
        val = torch.tensor(list(pred_updates.values()), dtype=predicts.dtype)
        predicts[idx] = val


def reconstruct_indices_from_tree_mask(tree_mask, verified_seq_len, positions, retrive_index,
                                       retrive_next_token, retrive_next_sibling, batch_size,
                                       draft_token_num):
    """Positions and first-child / next-sibling links from per-request [n, n] ancestor masks."""
    n = draft_token_num
    if batch_size == 0:
        return
    m = tree_mask.reshape(-1)[: batch_size * n * n].view(batch_size, n, n).to(torch.bool)
    idx = torch.arange(n, device=m.device)
    ancestors = m & (idx[None, None, :] < idx[None, :, None])  # [b, i, j]: j strict ancestor of i
    depth = ancestors.sum(-1)
    positions.view(batch_size, n)[:] = depth + verified_seq_len.view(-1, 1).to(torch.int64)
    parent = torch.where(ancestors, idx.view(1, 1, n), -1).amax(-1)  # deepest ancestor = parent
    # first child of t: smallest k > t whose ancestors include t
    child_cand = torch.where(ancestors, idx.view(1, n, 1), n).amin(1)  # [b, t]
    next_token = torch.where(child_cand < n, child_cand, -1)
    same_parent = (parent[:, :, None] == parent[:, None, :]) & (idx.view(1, n, 1) > idx.view(1, 1, n))
    sib_cand = torch.where(same_parent, idx.view(1, n, 1), n).amin(1)  # [b, t]
    next_sibling = torch.where((parent >= 0) & (sib_cand < n), sib_cand, -1)
    retrive_index.view(batch_size, n)[:] = (
        torch.arange(batch_size, device=m.device).view(-1, 1) * n + idx.view(1, n)
    )
    retrive_next_token.view(batch_size, n)[:] = next_token
    retrive_next_sibling.view(batch_size, n)[:] = next_sibling


def copy_all_layer_kv_cache_cpu(data_ptrs, strides, tgt_loc, src_loc):
    """For every KV buffer (one raw pointer each, rows of strides[i] bytes): row tgt <- row src.

    SGLang hands over raw data pointers (its GPU kernel does pointer arithmetic); numpy views of
    the same memory give a vectorised row copy without knowing the owning tensors.
    """
    if tgt_loc.numel() == 0:
        return
    tgt = tgt_loc.to(torch.int64).numpy()
    src = src_loc.to(torch.int64).numpy()
    nrows = int(max(tgt.max(), src.max())) + 1
    for ptr, stride in zip(data_ptrs.tolist(), strides.tolist()):
        buf = (ctypes.c_uint8 * (nrows * stride)).from_address(ptr)
        rows = np.frombuffer(buf, dtype=np.uint8).reshape(nrows, stride)
        rows[tgt] = rows[src]  # fancy indexing reads all sources before writing: in-place safe


def _unsupported(name: str):
    def op(*args, **kwargs):
        raise NotImplementedError(
            f"sgl_kernel.{name} has no pure-PyTorch CPU implementation in sgl-longspec; this "
            "SGLang feature (EAGLE-style drafting) is not supported on the CPU engine"
        )

    op.__name__ = name
    return op


# EAGLE-only ops: imported at module level by SGLang on CPU, never called by NGRAM / LONGSPEC.
build_tree_kernel_efficient_cpu = _unsupported("build_tree_kernel_efficient_cpu")
assign_draft_cache_locs_contiguous_cpu = _unsupported("assign_draft_cache_locs_contiguous_cpu")
rotate_input_ids_cpu = _unsupported("rotate_input_ids_cpu")
