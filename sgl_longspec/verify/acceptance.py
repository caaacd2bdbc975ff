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

The target distribution each slot is verified against: ``sgl_longspec.verify.target_probs``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import numpy as np
import torch

from sgl_longspec.verify.target_probs import (SAMPLING_EPS, TOP_K_ALL, greedy_rows, sample_rows,
                                             sample_target, target_probs)
from sgl_longspec.verify.tree_batch import TreeBatch, TreeBatchLike, as_tree_batch, slots_per_request


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




# --------------------------------------------------------------------------------------------
# Public verification entry points
# --------------------------------------------------------------------------------------------



def verify_greedy(drafts: TreeBatchLike, target_logits: torch.Tensor) -> VerifyResult:
    """Greedy (T = 0) verification; identical tokens to plain greedy decoding.

    drafts: a TreeBatch, one Draft, or a sequence of Drafts (one per request).
    target_logits: flat [sum(n_b + 1), V] or padded [bs, S, V].
    """
    tb, logits, _ = as_tree_batch(drafts, target_logits)
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



def verify_sampling(drafts: TreeBatchLike, target_logits: torch.Tensor, temperature=1.0,
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
    tb, logits, padded = as_tree_batch(drafts, target_logits)
    rows = logits.shape[0]
    reps = slots_per_request(tb, padded)
    if probs is None:
        y = sample_target(logits, temperature, top_k, top_p, min_p, reps, order, batch_wide,
                           generator, uniforms)
    else:
        y = sample_rows(probs.reshape(rows, -1), generator, uniforms)
    greedy_slots = greedy_rows(temperature, top_k, rows, reps, logits.device)
    if bool(greedy_slots.any()):
        y = torch.where(greedy_slots, torch.argmax(logits, dim=-1), y)
    greedy_req = greedy_slots[tb.slot_offsets]
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
    tb, logits, padded = as_tree_batch(tb, target_logits)
    rows = logits.shape[0]
    reps = slots_per_request(tb, padded)
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
    bonus = sample_rows(resid, generator)
    path_mask = torch.arange(n, device=dev).unsqueeze(0) < acc_len.unsqueeze(1)
    return _build_result(tb, path_mask, bonus)
