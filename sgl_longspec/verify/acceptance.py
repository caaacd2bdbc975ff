"""Engine-independent verification of draft trees: greedy and lossless sampling.

Layout (see ``sgl_longspec.drafters.draft``): a request's draft has n nodes; in the verify pass its root (the
last committed token) is slot 0 and node i is slot i + 1. The target scores every slot, and the
logits of slot s are for the token that FOLLOWS slot s. Logits come either flat, ``[sum(n_b + 1), V]``
with the requests' slots back to back in batch order, or padded, ``[bs, S, V]`` with S >= n_b + 1.

Everything here is torch and runs on CPU or CUDA tensors. The tree walk is vectorised over the
whole batch (an ancestor matrix built by pointer doubling, no per-request Python loop); only the
construction of the padded batch from ``Draft`` objects and ``VerifyResult.requests()`` touch
Python per request.

Verification rules
------------------
* Greedy (``verify_greedy``): y_s = argmax(logits_s) for every slot. A node is acceptable when
  every node on its root path carries the argmax of its parent's slot; the accepted path is the
  deepest acceptable node's path (ties: the smallest node index, i.e. draft order). The accepted
  tokens are therefore exactly the tokens plain greedy decoding emits; with duplicated sibling
  tokens the duplicate whose subtree goes deeper wins (the emitted tokens are the same either way).
  The bonus is the argmax at the last accepted slot.
* Sampling, deterministic drafts (``verify_sampling``): the rule of the brief is "at the current
  node with target distribution p, visit the children in draft order, accept child token x with
  probability p(x) (p renormalised), on rejection set p(x) = 0 and renormalise, try the next
  sibling; when every child fails, sample the bonus from what is left of p". That procedure has the
  same output law as: draw ONE token y ~ p at the current node; if some child carries y, move to the
  FIRST such child (later duplicates can never be accepted: their p is 0 after the first one is
  rejected), otherwise emit y as the bonus. Proof: with distinct tokens x_1..x_m, child j is
  accepted with probability prod_{i<j}(1 - p_i / R_{i-1}) * p_j / R_{j-1} with
  R_i = 1 - p_1 - ... - p_i, which telescopes to p_j; and given that every child failed the bonus
  is p restricted to the non-child tokens, renormalised -- the law of y given y not in the
  children. So one categorical draw per slot (all slots of the batch at once) followed by the same
  vectorised walk as greedy is an exact implementation. The first-match rule for duplicates is
  essential here: following the duplicate whose subtree matches would bias the output.
* Sampling with a drafter distribution q (``verify_sampling_draft_probs``, chains only): accept
  draft token x_i with probability min(1, p_i(x_i) / q_i(x_i)); at the first rejection sample the
  bonus from max(p_i - q_i, 0) renormalised; when all are accepted, from p at the last slot.

Cost: the tree logic is a few dozen small tensor ops for the whole batch (pointer doubling over
[bs, N, N] bool tensors, log2(N) steps); the vocabulary-sized work is one argmax (greedy) or one
softmax + one categorical draw per slot (sampling; filtered rows are sampled over their sorted
candidates, top-p first tries the 1024 most likely tokens and falls back to a full sort only when
they do not cover top_p). Host syncs: a handful of ``bool(tensor)`` checks and the data-dependent
sizes of the flat result tensors.

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

from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import numpy as np
import torch

from sgl_longspec.drafters.draft import Draft

TOP_K_ALL = 1 << 30  # SGLang's encoding of "no top-k" (sampling_params.TOP_K_ALL)
SAMPLING_EPS = 1e-6  # SGLang's _SAMPLING_EPS: temperature below it means greedy
_TOPP_CANDIDATES = 1024  # top-p first tries the 1024 most likely tokens instead of a full sort

__all__ = [
    "TOP_K_ALL",
    "SAMPLING_EPS",
    "TreeBatch",
    "RequestVerifyResult",
    "VerifyResult",
    "target_probs",
    "verify_greedy",
    "verify_sampling",
    "verify_sampling_draft_probs",
    "seeded_uniforms",
]


# --------------------------------------------------------------------------------------------
# Target distribution
# --------------------------------------------------------------------------------------------

def _row_param(x, rows: int, repeats, dtype, device) -> torch.Tensor:
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
    t = _row_param(temperature, rows, repeats, torch.float32, dev)
    k = _row_param(top_k, rows, repeats, torch.long, dev)
    p = _row_param(top_p, rows, repeats, torch.float32, dev)
    m = _row_param(min_p, rows, repeats, torch.float32, dev)
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


def _sample_target(logits, temperature, top_k, top_p, min_p, repeats, order, batch_wide,
                   generator, uniforms=None) -> torch.Tensor:
    """One token per row from target_probs(...), without materialising the dense filtered rows
    (filtered rows are sampled over their sorted candidates)."""
    x, t, k, p, m, filt = _prepare_params(logits, temperature, top_k, top_p, min_p, repeats,
                                          order, batch_wide)
    probs = torch.softmax(x / t.unsqueeze(1), dim=-1)

    def filtered(rows_probs, kk, pp, mm, uu):
        f, ids = _filter_sorted_rows(rows_probs, kk, pp, mm, order, dense=False)
        return ids.gather(1, _sample_rows(f, generator, uu).unsqueeze(1)).squeeze(1)

    def sub(idx):
        return None if uniforms is None else uniforms.index_select(0, idx.to(uniforms.device))

    if not bool(filt.any()):
        return _sample_rows(probs, generator, uniforms)
    if bool(filt.all()):
        return filtered(probs, k, p, m, uniforms)
    y = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    idx = filt.nonzero().squeeze(1)
    rest = (~filt).nonzero().squeeze(1)
    y[idx] = filtered(probs.index_select(0, idx), k[idx], p[idx], m[idx], sub(idx))
    y[rest] = _sample_rows(probs.index_select(0, rest), generator, sub(rest))
    return y


# --------------------------------------------------------------------------------------------
# Batched draft trees
# --------------------------------------------------------------------------------------------

@dataclass
class TreeBatch:
    """A batch of draft trees, padded to N = max(1, max n_b) nodes, on one device.

    tokens / parents: int64 [bs, N] (padding: token -1, parent -1); num_nodes: int64 [bs];
    slot_offsets: int64 [bs], the row of each request's slot 0 in the flat verify logits.
    """

    tokens: torch.Tensor
    parents: torch.Tensor
    num_nodes: torch.Tensor
    slot_offsets: torch.Tensor
    _anc: Optional[torch.Tensor] = None

    @classmethod
    def from_drafts(cls, drafts: Sequence[Draft], device=None) -> "TreeBatch":
        bs = len(drafts)
        sizes = np.fromiter((len(d) for d in drafts), dtype=np.int64, count=bs)
        n_max = max(1, int(sizes.max()) if bs else 1)
        tok = np.full((bs, n_max), -1, dtype=np.int64)
        par = np.full((bs, n_max), -1, dtype=np.int64)
        for b, d in enumerate(drafts):
            n = sizes[b]
            if n:
                tok[b, :n] = d.token_ids
                par[b, :n] = d.parents
        offs = np.zeros(bs, dtype=np.int64)
        if bs > 1:
            np.cumsum(sizes[:-1] + 1, out=offs[1:])
        as_t = (lambda a: torch.from_numpy(a).to(device)) if device is not None else torch.from_numpy
        return cls(as_t(tok), as_t(par), as_t(sizes), as_t(offs))

    @classmethod
    def from_tensors(cls, tokens: torch.Tensor, parents: torch.Tensor,
                     num_nodes: Optional[torch.Tensor] = None,
                     slot_offsets: Optional[torch.Tensor] = None) -> "TreeBatch":
        """Padded [bs, N] tensors; parents must be -1 or an earlier index. Offsets default to the
        flat layout (sum of n_b + 1)."""
        tokens = tokens.long()
        bs, n_max = tokens.shape
        parents = parents.long().to(tokens.device)
        if num_nodes is None:
            num_nodes = torch.full((bs,), n_max, dtype=torch.long, device=tokens.device)
        num_nodes = torch.as_tensor(num_nodes, dtype=torch.long, device=tokens.device)
        if n_max == 0:
            tokens = torch.full((bs, 1), -1, dtype=torch.long, device=tokens.device)
            parents = torch.full((bs, 1), -1, dtype=torch.long, device=tokens.device)
            n_max = 1
        valid = torch.arange(n_max, device=tokens.device).unsqueeze(0) < num_nodes.unsqueeze(1)
        tokens = tokens.masked_fill(~valid, -1)
        parents = parents.masked_fill(~valid, -1)
        if slot_offsets is None:
            slot_offsets = torch.cumsum(num_nodes + 1, 0) - (num_nodes + 1)
        return cls(tokens, parents, num_nodes, torch.as_tensor(slot_offsets, dtype=torch.long,
                                                               device=tokens.device))

    @classmethod
    def chains(cls, tokens: Union[torch.Tensor, Sequence], num_nodes=None, device=None) -> "TreeBatch":
        """Chain drafts from a padded [bs, N] tensor (or a list of token sequences)."""
        if not isinstance(tokens, torch.Tensor):
            return cls.from_drafts([Draft.chain(np.asarray(t, dtype=np.int64)) for t in tokens],
                                   device)
        bs, n_max = tokens.shape
        par = (torch.arange(n_max, device=tokens.device) - 1).unsqueeze(0).expand(bs, n_max)
        return cls.from_tensors(tokens, par, num_nodes)

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def max_nodes(self) -> int:
        return self.tokens.shape[1]

    @property
    def device(self) -> torch.device:
        return self.tokens.device

    def node_valid(self) -> torch.Tensor:
        return torch.arange(self.max_nodes, device=self.device).unsqueeze(0) < self.num_nodes.unsqueeze(1)

    def ancestors(self) -> torch.Tensor:
        """bool [bs, N, N]: anc[b, i, j] = node j is node i or one of its ancestors (valid nodes)."""
        if self._anc is None:
            bs, n = self.tokens.shape
            ar = torch.arange(n, device=self.device)
            anc = (ar.unsqueeze(1) == ar.unsqueeze(0)).unsqueeze(0) & self.node_valid().unsqueeze(2)
            ptr = self.parents
            # Pointer doubling: after step s, anc[i] holds the ancestors at distance < 2^s and ptr[i]
            # the ancestor at distance 2^s (-1 past the root). Depth <= n needs ceil(log2 n) steps.
            for _ in range(max(n - 1, 0).bit_length()):
                has = ptr >= 0
                pc = ptr.clamp(min=0)
                up = torch.gather(anc, 1, pc.unsqueeze(2).expand(bs, n, n))
                anc = anc | (up & has.unsqueeze(2))
                ptr = torch.where(has, torch.gather(ptr, 1, pc), ptr)
            self._anc = anc
        return self._anc


def _as_batch(drafts, logits: torch.Tensor):
    """-> (TreeBatch with offsets matching the logits layout, flat [T, V] logits)."""
    if isinstance(drafts, TreeBatch):
        tb = drafts
        if tb.device != logits.device:
            tb = TreeBatch(tb.tokens.to(logits.device), tb.parents.to(logits.device),
                           tb.num_nodes.to(logits.device), tb.slot_offsets.to(logits.device))
    elif isinstance(drafts, Draft):
        tb = TreeBatch.from_drafts([drafts], logits.device)
    else:
        tb = TreeBatch.from_drafts(list(drafts), logits.device)
    if logits.dim() == 3:
        bs, s, v = logits.shape
        if bs != tb.batch_size:
            raise ValueError(f"padded logits hold {bs} requests, the drafts {tb.batch_size}")
        if bs and s < int(tb.num_nodes.max()) + 1:
            raise ValueError(f"padded logits have {s} slots, a draft needs more")
        offs = torch.arange(bs, device=logits.device, dtype=torch.long) * s
        tb = TreeBatch(tb.tokens, tb.parents, tb.num_nodes, offs, tb._anc)
        return tb, logits.reshape(bs * s, v), s
    if logits.dim() != 2:
        raise ValueError(f"logits must be [T, V] or [bs, S, V], got {tuple(logits.shape)}")
    return tb, logits, None


def _slots_per_request(tb: TreeBatch, padded_slots: Optional[int]) -> torch.Tensor:
    if padded_slots is not None:
        return torch.full_like(tb.num_nodes, padded_slots)
    return tb.num_nodes + 1


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------

@dataclass
class RequestVerifyResult:
    """One request's outcome (host side)."""

    accepted_nodes: List[int]  # draft node indices on the accepted path, root excluded, in order
    accepted_slots: List[int]  # verify slots whose KV is kept: [0] + [i + 1 for accepted nodes]
    accepted_tokens: List[int]  # draft tokens at the accepted nodes
    bonus_token: int  # the target's token after the last accepted slot

    @property
    def num_accepted(self) -> int:
        """Accepted draft tokens (bonus not counted)."""
        return len(self.accepted_nodes)

    @property
    def output_tokens(self) -> List[int]:
        """Tokens to append to the request: accepted tokens then the bonus."""
        return self.accepted_tokens + [self.bonus_token]


@dataclass
class VerifyResult:
    """Batch outcome, as tensors on the verify device.

    accept_lens: int64 [bs], accepted draft tokens per request (bonus not counted; tau = +1).
    bonus_tokens: int64 [bs].
    path_mask: bool [bs, N], accepted draft nodes.
    kept_mask: bool [bs, N + 1], kept verify slots (slot 0 always; slot i + 1 for accepted node i).
    out_lens: int64 [bs] = accept_lens + 1.
    flat_out_tokens: int64 [sum(out_lens)], per request the accepted tokens then the bonus.
    flat_kept_rows: int64 [sum(out_lens)], row in the flat verify batch (slot_offsets[b] + slot) of
        each kept slot, aligned with flat_out_tokens: the target's output at row flat_kept_rows[j]
        is the token flat_out_tokens[j] (the KV to keep, and the hidden states a drafter reads).
    """

    accept_lens: torch.Tensor
    bonus_tokens: torch.Tensor
    path_mask: torch.Tensor
    kept_mask: torch.Tensor
    out_lens: torch.Tensor
    flat_out_tokens: torch.Tensor
    flat_kept_rows: torch.Tensor

    def __len__(self) -> int:
        return self.accept_lens.shape[0]

    def requests(self) -> List[RequestVerifyResult]:
        """Per-request host results (one device-to-host copy for the batch)."""
        mask = self.path_mask.cpu().numpy()
        toks = self.flat_out_tokens.cpu().numpy()
        lens = self.out_lens.cpu().numpy()
        out = []
        start = 0
        for b in range(mask.shape[0]):
            nodes = np.flatnonzero(mask[b])
            n_out = int(lens[b])
            seg = toks[start:start + n_out].tolist()
            start += n_out
            out.append(RequestVerifyResult(nodes.tolist(), [0] + (nodes + 1).tolist(), seg[:-1],
                                           seg[-1]))
        return out

    def __getitem__(self, b: int) -> RequestVerifyResult:
        return self.requests()[b]


def _build_result(tb: TreeBatch, path_mask: torch.Tensor, bonus: torch.Tensor) -> VerifyResult:
    bs, n = path_mask.shape
    dev = path_mask.device
    accept_lens = path_mask.sum(dim=1)
    out_lens = accept_lens + 1
    kept_mask = torch.cat([torch.ones(bs, 1, dtype=torch.bool, device=dev), path_mask], dim=1)
    rows = tb.slot_offsets.unsqueeze(1) + torch.arange(n + 1, device=dev).unsqueeze(0)
    flat_kept_rows = rows[kept_mask]
    starts = torch.cumsum(out_lens, 0) - out_lens
    flat = torch.empty(flat_kept_rows.shape[0], dtype=torch.long, device=dev)
    pos = (starts.unsqueeze(1) + torch.cumsum(path_mask.long(), dim=1) - 1)[path_mask]
    flat[pos] = tb.tokens[path_mask]
    flat[starts + accept_lens] = bonus
    return VerifyResult(accept_lens, bonus, path_mask, kept_mask, out_lens, flat, flat_kept_rows)


# --------------------------------------------------------------------------------------------
# The walk shared by greedy and sampling
# --------------------------------------------------------------------------------------------

def _walk(tb: TreeBatch, y: torch.Tensor, first_match: Union[bool, torch.Tensor]):
    """Follow the per-slot target tokens y (flat [T]) through the trees.

    A node matches when its token equals y at its parent's slot; with ``first_match`` (bool or
    per-request bool [bs]) a node that repeats an earlier sibling's token never matches. The
    accepted path is the deepest node whose whole root path matches (first index on ties).
    Returns (path_mask bool [bs, N], bonus int64 [bs]).
    """
    bs, n = tb.tokens.shape
    dev = tb.device
    valid = tb.node_valid()
    parent_rows = tb.slot_offsets.unsqueeze(1) + tb.parents + 1
    match = (tb.tokens == y[parent_rows]) & valid
    fm = first_match if isinstance(first_match, torch.Tensor) else None
    if fm is not None or first_match:
        tri = torch.ones(n, n, dtype=torch.bool, device=dev).tril(-1)  # j < i
        dup = ((tb.parents.unsqueeze(2) == tb.parents.unsqueeze(1))
               & (tb.tokens.unsqueeze(2) == tb.tokens.unsqueeze(1)) & tri).any(dim=2)
        if fm is not None:
            dup &= fm.to(dev).unsqueeze(1)
        match &= ~dup
    anc = tb.ancestors()
    ok = ~(anc & ~match.unsqueeze(1)).any(dim=2) & valid
    depth = anc.sum(dim=2)
    score = torch.where(ok, depth, torch.zeros_like(depth))
    leaf = score.argmax(dim=1)  # first maximal index
    best = score.gather(1, leaf.unsqueeze(1)).squeeze(1)
    path_mask = anc[torch.arange(bs, device=dev), leaf] & (best > 0).unsqueeze(1)
    bonus_slot = torch.where(best > 0, leaf + 1, torch.zeros_like(leaf))
    bonus = y[tb.slot_offsets + bonus_slot]
    return path_mask, bonus


def _last_positive(vals: torch.Tensor) -> torch.Tensor:
    pos = torch.arange(vals.shape[-1], device=vals.device)
    return torch.where(vals > 0, pos, torch.full_like(pos, -1)).max(dim=-1, keepdim=True).values


def _sample_rows(probs: torch.Tensor, generator: Optional[torch.Generator],
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


# --------------------------------------------------------------------------------------------
# Public verification entry points
# --------------------------------------------------------------------------------------------

DraftsLike = Union[TreeBatch, Draft, Sequence[Draft]]


def verify_greedy(drafts: DraftsLike, target_logits: torch.Tensor) -> VerifyResult:
    """Greedy (T = 0) verification; identical tokens to plain greedy decoding.

    drafts: a TreeBatch, one Draft, or a sequence of Drafts (one per request).
    target_logits: flat [sum(n_b + 1), V] or padded [bs, S, V].
    """
    tb, logits, _ = _as_batch(drafts, target_logits)
    y = torch.argmax(logits, dim=-1)
    path_mask, bonus = _walk(tb, y, first_match=False)
    return _build_result(tb, path_mask, bonus)


def seeded_uniforms(seed: int, positions) -> torch.Tensor:
    """Uniforms in [0, 1) that depend only on (seed, position): a request's sampling_seed and the
    position of the token being drawn (splitmix64 of the pair, top 53 bits)."""
    pos = np.asarray(positions, dtype=np.uint64).reshape(-1)
    with np.errstate(over="ignore"):
        x = np.uint64(seed & 0xFFFFFFFFFFFFFFFF) * np.uint64(0x9E3779B97F4A7C15) + pos
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return torch.from_numpy((x >> np.uint64(11)).astype(np.float64) / float(1 << 53))


def _greedy_rows(temperature, top_k, rows, repeats, device) -> torch.Tensor:
    t = _row_param(temperature, rows, repeats, torch.float32, device)
    k = _row_param(top_k, rows, repeats, torch.long, device)
    return (t < SAMPLING_EPS) | (k == 1)


def verify_sampling(drafts: DraftsLike, target_logits: torch.Tensor, temperature=1.0,
                    top_k=TOP_K_ALL, top_p=1.0, min_p=0.0, *,
                    generator: Optional[torch.Generator] = None, order: str = "joint",
                    batch_wide: bool = False,
                    probs: Optional[torch.Tensor] = None,
                    uniforms: Optional[torch.Tensor] = None) -> VerifyResult:
    """Lossless verification of deterministic draft trees at T > 0 (see the module docstring).

    Sampling parameters: scalars or per-request tensors [bs] (or per-slot [T]); requests with
    temperature < 1e-6 or top_k == 1 are verified greedily (argmax of the logits, deepest path),
    as in ``verify_greedy``. ``probs`` ([T, V]) may be passed when the caller already has the
    target distribution; it is then used instead of target_probs(logits, ...). ``uniforms``
    ([T] float64, NaN = draw from ``generator``) fixes the uniform each slot's draw is made with
    (seeded requests: ``seeded_uniforms``, so their samples do not depend on the batch).
    """
    tb, logits, padded = _as_batch(drafts, target_logits)
    rows = logits.shape[0]
    reps = _slots_per_request(tb, padded)
    if probs is None:
        y = _sample_target(logits, temperature, top_k, top_p, min_p, reps, order, batch_wide,
                           generator, uniforms)
    else:
        y = _sample_rows(probs.reshape(rows, -1), generator, uniforms)
    greedy_rows = _greedy_rows(temperature, top_k, rows, reps, logits.device)
    if bool(greedy_rows.any()):
        y = torch.where(greedy_rows, torch.argmax(logits, dim=-1), y)
    greedy_req = greedy_rows[tb.slot_offsets]
    path_mask, bonus = _walk(tb, y, first_match=~greedy_req)
    return _build_result(tb, path_mask, bonus)


def verify_sampling_draft_probs(draft_tokens: Union[torch.Tensor, Sequence],
                                draft_probs: Union[torch.Tensor, Sequence[torch.Tensor]],
                                target_logits: torch.Tensor, temperature=1.0, top_k=TOP_K_ALL,
                                top_p=1.0, min_p=0.0, *, num_nodes=None,
                                generator: Optional[torch.Generator] = None,
                                order: str = "joint", batch_wide: bool = False,
                                probs: Optional[torch.Tensor] = None) -> VerifyResult:
    """Speculative sampling for CHAIN drafts sampled from the drafter's own distribution q.

    draft_tokens: padded int64 [bs, N] (with ``num_nodes`` [bs]) or a list of 1-D token sequences.
    draft_probs: q, padded [bs, N, V] or a list of [n_b, V]; q[b, i] is the distribution token i was
    drawn from (the drafter's next-token distribution after slot i).
    target_logits: flat [sum(n_b + 1), V] or padded [bs, S, V]; ``probs`` as in verify_sampling.
    Accepts x_i with probability min(1, p_i(x_i) / q_i(x_i)); on the first rejection the bonus is
    drawn from max(p_i - q_i, 0) renormalised, otherwise from p at the last slot.
    """
    if isinstance(draft_tokens, torch.Tensor):
        tb = TreeBatch.chains(draft_tokens.to(target_logits.device), num_nodes)
    else:
        tb = TreeBatch.chains(list(draft_tokens), device=target_logits.device)
    bs, n = tb.tokens.shape
    if isinstance(draft_probs, torch.Tensor):
        q = draft_probs.to(target_logits.device).float()
        if q.shape[1] < n:
            q = torch.nn.functional.pad(q, (0, 0, 0, n - q.shape[1]))
    else:
        vocab = target_logits.shape[-1]
        q = torch.zeros(bs, n, vocab, device=target_logits.device)
        for b, qb in enumerate(draft_probs):
            if len(qb):
                q[b, :len(qb)] = torch.as_tensor(qb, dtype=torch.float32, device=q.device)
    tb, logits, padded = _as_batch(tb, target_logits)
    rows = logits.shape[0]
    reps = _slots_per_request(tb, padded)
    if probs is None:
        probs = target_probs(logits, temperature, top_k, top_p, min_p, repeats=reps, order=order,
                             batch_wide=batch_wide)
    else:
        probs = probs.reshape(rows, -1)
    dev = logits.device
    valid = tb.node_valid()
    tok = tb.tokens.clamp(min=0)
    node_rows = tb.slot_offsets.unsqueeze(1) + torch.arange(n, device=dev).unsqueeze(0)  # slot i
    node_rows = torch.where(valid, node_rows, tb.slot_offsets.unsqueeze(1))
    p_x = probs[node_rows, tok]
    q_x = q.gather(2, tok.unsqueeze(2)).squeeze(2)
    u = torch.rand(bs, n, generator=generator, device=dev)
    accept = (u * q_x < p_x) & valid
    acc_len = torch.cumprod(accept.long(), dim=1).sum(dim=1)
    p_row = probs[tb.slot_offsets + acc_len]
    rejected = acc_len < tb.num_nodes
    q_row = q[torch.arange(bs, device=dev), acc_len.clamp(max=n - 1)]
    q_row = q_row * rejected.unsqueeze(1)
    resid = (p_row - q_row).clamp(min=0.0)
    mass = resid.sum(dim=1, keepdim=True)
    resid = torch.where(mass > 0, resid, p_row)  # p == q exactly: rejection had probability 0
    bonus = _sample_rows(resid, generator)
    path_mask = torch.arange(n, device=dev).unsqueeze(0) < acc_len.unsqueeze(1)
    return _build_result(tb, path_mask, bonus)
