"""The target's sampling distribution per verify slot, as SGLang 0.5.23's sampler computes it.

Target distribution (``target_probs``) follows SGLang 0.5.23: SamplingParams maps temperature < 1e-6
to (temperature 1, top_k 1) and top_k -1 to TOP_K_ALL = 1 << 30; the sampler divides the logits by
the per-request temperature, takes the softmax, then filters: ``order="joint"`` is
``top_k_top_p_min_p_sampling_from_probs_torch`` in ``sglang/srt/layers/sampler.py`` (pytorch
backend) and FlashInfer's ``top_k_top_p_sampling_from_probs(filter_apply_order="joint")`` (the
default CUDA path without min_p): top-k and top-p are both measured on the un-truncated sorted
probabilities (keep rank j when j < top_k and the mass strictly before j is <= top_p), then min-p
drops tokens below min_p * max (see target_probs for the batch-wide filter decision).
``order="sequential"`` is the FlashInfer path used when some request
has min_p > 0, and the one SGLang's EAGLE tree verification uses: top_k_renorm_prob, then
top_p_renorm_prob on the renormalised probabilities, then min-p. The result is renormalised.
"""

from __future__ import annotations

from typing import Optional

import torch

TOP_K_ALL = 1 << 30  # SGLang's encoding of "no top-k" (sampling_params.TOP_K_ALL)
SAMPLING_EPS = 1e-6  # SGLang's _SAMPLING_EPS: temperature below it means greedy
_TOPP_CANDIDATES = 1024  # top-p first tries the 1024 most likely tokens instead of a full sort


# --------------------------------------------------------------------------------------------
# Target distribution
# --------------------------------------------------------------------------------------------

def row_param(x, rows: int, repeats, dtype, device) -> torch.Tensor:
    """Scalar, [rows], or per-request [bs] (expanded with ``repeats``) -> [rows] tensor."""
    t = torch.as_tensor(x, dtype=dtype, device=device).reshape(-1)
    if t.numel() == 1:
        return t.expand(rows)
    if t.numel() == rows:
        return t
    if repeats is not None:
        rep = torch.as_tensor(repeats, dtype=torch.long, device=device).reshape(-1)
        if rep.numel() == t.numel():
            out = torch.repeat_interleave(t, rep)
            if out.numel() == rows:
                return out
    raise ValueError(f"sampling parameter of {t.numel()} values does not fit {rows} rows")


def _filter_sorted_rows(pr: torch.Tensor, k: torch.Tensor, p: torch.Tensor, m: torch.Tensor,
                        order: str, dense: bool = True):
    """top-k / top-p / min-p on rows that need the sorted filter: renormalised dense rows, or with
    dense=False the pair (probabilities [rows, K], token ids [rows, K]) over the sorted candidates.

    k is already clamped to [1, V]. Only the K most likely tokens are sorted when that is provably
    the same as a full sort: every token beyond the K-th is cut by top-k or by top-p.
    """
    rows, vocab = pr.shape
    no_k = k >= vocab
    if order == "joint":
        finite = k[~no_k]
        K = int(finite.max()) if finite.numel() else 0
        if bool(no_k.any()):
            K = max(K, _TOPP_CANDIDATES)
        K = min(max(K, 1), vocab)
    else:  # rows without top-k keep (or renormalise over) the whole vocabulary
        K = vocab if bool(no_k.any()) else min(max(int(k.max()), 1), vocab)
    while True:
        if K < vocab:
            vals, ids = torch.topk(pr, K, dim=-1, largest=True, sorted=True)
        else:
            vals, ids = pr.sort(dim=-1, descending=True)
        keep = torch.arange(K, device=pr.device).unsqueeze(0) < k.unsqueeze(1)
        if order == "joint":
            # top_k_top_p_min_p_sampling_from_probs_torch: the cumulative sum is taken BEFORE the
            # top-k cut, and the top-p test is applied to every row (also top_p == 1, where float32
            # rounding of the running sum can drop a far tail: reproduced for exactness).
            cums = vals.cumsum(dim=-1)
            if K < vocab and not bool(((k <= K) | (cums[:, -1] > p)).all()):
                K = vocab
                continue
            keep &= (cums - vals) <= p.unsqueeze(1)
        else:
            vk = vals.masked_fill(~keep, 0.0)
            vk = vk / vk.sum(dim=-1, keepdim=True)
            cums = vk.cumsum(dim=-1)
            keep &= ((cums - vk) <= p.unsqueeze(1)) | (p >= 1.0).unsqueeze(1)
        break
    if bool((m > 0).any()):
        keep &= vals >= vals[:, :1] * m.unsqueeze(1)
    f = vals.masked_fill(~keep, 0.0)
    f = f / f.sum(dim=-1, keepdim=True)
    if not dense:
        return f, ids
    return torch.zeros_like(pr).scatter_(1, ids, f)


def target_probs(logits: torch.Tensor, temperature=1.0, top_k=TOP_K_ALL, top_p=1.0, min_p=0.0,
                 *, repeats=None, order: str = "joint", batch_wide: bool = False) -> torch.Tensor:
    """Target next-token probabilities with SGLang 0.5.23's sampling semantics.

    logits: [R, V] (any float dtype; computed in float32). temperature / top_k / top_p / min_p:
    Python scalars or tensors of shape [R], or of shape [bs] together with ``repeats`` ([bs] slot
    counts, expanded with repeat_interleave; SGLang's [bs, 1] temperatures are accepted).
    SGLang's encodings: temperature < 1e-6 is greedy (temperature 1, top_k 1); top_k -1 or
    TOP_K_ALL (or anything >= V) is no top-k; top_p 1 no top-p; min_p 0 no min-p.

    Each row gets what SGLang's sampler computes for a batch holding only that request (a row
    without top-k / top-p / min-p is the plain softmax; one with any of them goes through the
    sorted filter). SGLang decides "filter or not" for the whole batch (need_top_k_sampling etc.);
    ``batch_wide=True`` reproduces that too, so that the result is bit-for-bit what SGLang's
    pytorch backend samples from for this batch. The difference is confined to the far tail: a
    row with top_p == 1 sent through the filter loses tokens whose float32 running sum rounds above
    1 (mass < 1e-6). Returns float32 [R, V] rows summing to 1.
    """
    x, t, k, p, m, filt = _prepare_params(logits, temperature, top_k, top_p, min_p, repeats,
                                          order, batch_wide)
    probs = torch.softmax(x / t.unsqueeze(1), dim=-1)
    if not bool(filt.any()):
        return probs
    if bool(filt.all()):
        return _filter_sorted_rows(probs, k, p, m, order)
    idx = filt.nonzero().squeeze(1)
    probs.index_copy_(0, idx, _filter_sorted_rows(probs.index_select(0, idx), k[idx], p[idx],
                                                  m[idx], order))
    return probs


def _prepare_params(logits, temperature, top_k, top_p, min_p, repeats, order, batch_wide):
    """-> (float32 logits, t, k clamped to [1, V], p, m, rows that take the sorted filter)."""
    if order not in ("joint", "sequential"):
        raise ValueError(f"order must be 'joint' or 'sequential', got {order!r}")
    if logits.dim() != 2:
        raise ValueError(f"logits must be [rows, vocab], got {tuple(logits.shape)}")
    x = logits if logits.dtype == torch.float32 else logits.float()
    rows, vocab = x.shape
    dev = x.device
    t = row_param(temperature, rows, repeats, torch.float32, dev)
    k = row_param(top_k, rows, repeats, torch.long, dev)
    p = row_param(top_p, rows, repeats, torch.float32, dev)
    m = row_param(min_p, rows, repeats, torch.float32, dev)
    # SamplingParams.__post_init__: greedy -> (temperature 1, top_k 1); top_k -1 -> TOP_K_ALL
    greedy = t < SAMPLING_EPS
    t = torch.where(greedy, torch.ones_like(t), t)
    k = torch.where(greedy, torch.ones_like(k), k)
    k = torch.where(k == -1, torch.full_like(k, TOP_K_ALL), k)
    # SamplingBatchInfo's need_top_k / need_top_p / need_min_p, per row
    filt = (k != TOP_K_ALL) | (p != 1.0) | (m > 0)
    k = torch.where((k <= 0) | (k > vocab), torch.full_like(k, vocab), k)
    if batch_wide and bool(filt.any()):
        filt = torch.ones_like(filt)
    return x, t, k, p, m, filt


def sample_target(logits, temperature, top_k, top_p, min_p, repeats, order, batch_wide,
                   generator, uniforms=None) -> torch.Tensor:
    """One token per row from target_probs(...), without materialising the dense filtered rows
    (filtered rows are sampled over their sorted candidates)."""
    x, t, k, p, m, filt = _prepare_params(logits, temperature, top_k, top_p, min_p, repeats,
                                          order, batch_wide)
    probs = torch.softmax(x / t.unsqueeze(1), dim=-1)

    def filtered(rows_probs, kk, pp, mm, uu):
        f, ids = _filter_sorted_rows(rows_probs, kk, pp, mm, order, dense=False)
        return ids.gather(1, sample_rows(f, generator, uu).unsqueeze(1)).squeeze(1)

    def sub(idx):
        return None if uniforms is None else uniforms.index_select(0, idx.to(uniforms.device))

    if not bool(filt.any()):
        return sample_rows(probs, generator, uniforms)
    if bool(filt.all()):
        return filtered(probs, k, p, m, uniforms)
    y = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    idx = filt.nonzero().squeeze(1)
    rest = (~filt).nonzero().squeeze(1)
    y[idx] = filtered(probs.index_select(0, idx), k[idx], p[idx], m[idx], sub(idx))
    y[rest] = sample_rows(probs.index_select(0, rest), generator, sub(rest))
    return y


def greedy_rows(temperature, top_k, rows, repeats, device) -> torch.Tensor:
    """Rows SGLang samples greedily: temperature below SAMPLING_EPS or top_k 1."""
    t = row_param(temperature, rows, repeats, torch.float32, device)
    k = row_param(top_k, rows, repeats, torch.long, device)
    return (t < SAMPLING_EPS) | (k == 1)


def sample_rows(probs: torch.Tensor, generator: Optional[torch.Generator],
                 uniforms: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One index per row, P(i) = probs[r, i] / sum(probs[r]) (rows need not be normalised).

    Two-level inverse-CDF sampling: a block (1024 tokens for large vocabularies, 128 otherwise)
    is chosen from the float64 prefix sums of the block masses, then the token inside the block
    from its float64 prefix sums. The cost is about one pass over the row, and tiny probabilities
    are not lost to the rounding of a long float32 running sum (each token's share is exact up to
    ~1e-7 relative). About 20x faster than torch.multinomial on CPU at V = 32k. A zero-probability
    index is never returned (a draw that float rounding pushes past the last positive token is
    moved back to it; probability ~1e-16).
    """
    rows, vocab = probs.shape
    dev = probs.device
    probs = probs.contiguous()
    B = min(vocab, 1024 if vocab >= 16384 else 128)
    nfull = vocab // B
    main = probs.as_strided((rows, nfull, B), (probs.stride(0), B, 1))
    mass = main.sum(dim=-1)  # float32 block sums (a float64 reduction is ~20x slower on CPU)
    if vocab % B:
        mass = torch.cat([mass, probs[:, nfull * B:].sum(dim=-1, keepdim=True)], 1)
    cb = mass.double().cumsum(dim=-1)
    u = torch.rand(rows, 1, generator=generator, device=dev, dtype=torch.float64)
    if uniforms is not None:  # rows with a given uniform (NaN: draw one)
        fixed = uniforms.to(dev, torch.float64).view(rows, 1)
        u = torch.where(torch.isnan(fixed), u, fixed)
    target = u * cb[:, -1:]
    blk = torch.searchsorted(cb, target, right=True).clamp(max=mass.shape[1] - 1)
    prev = torch.where(blk > 0, cb.gather(1, (blk - 1).clamp(min=0)), torch.zeros_like(target))
    cols = blk * B + torch.arange(B, device=dev).unsqueeze(0)
    vals = probs.gather(1, cols.clamp(max=vocab - 1)).double() * (cols < vocab)
    tok = blk * B + torch.searchsorted(vals.cumsum(dim=-1), target - prev, right=True)
    tok = tok.clamp(max=vocab - 1)
    bad = probs.gather(1, tok) <= 0
    if bool(bad.any()):
        tok = torch.where(bad, _last_positive(probs), tok)
    return tok.squeeze(1)


def _last_positive(vals: torch.Tensor) -> torch.Tensor:
    pos = torch.arange(vals.shape[-1], device=vals.device)
    return torch.where(vals > 0, pos, torch.full_like(pos, -1)).max(dim=-1, keepdim=True).values
