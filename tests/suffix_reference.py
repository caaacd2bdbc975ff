"""Brute-force reference for sgl_longspec.drafters.suffix_index: the same drafts, computed by scanning the
raw token sequences (no tree). Slow (O(text * depth) per match length); for tests only.

Semantics, shared with the compiled index:
* count(s) = number of places the string s (1 <= len(s) <= D) occurs in a tree's sequences.
* For match length m (1 .. min(len(context), D)) and p = context[-m:], every occurrence of p
  contributes its continuation seq[i+m : min(len(seq), i+D)] (paths are capped at D tokens);
  a drafted path q has probability count(p + q) / count(p).
* First occurrence: in the request's own tree, rec(child) = -(the smallest start position among
  the occurrences of the matched suffix that continue with that child's path), so among equal
  counts the continuation seen first wins; in the global tree rec = 0 for every node.
* Chain: the child with the largest count, ties to the larger rec, then the smaller token id; stop
  at the budget, at a child with probability < min_prob, or when there is no continuation.
* Tree: best-first by count, ties to the larger (more recently drafted) parent index, then the
  larger rec, then the smaller token id; children below min_prob are never queued; at most
  `budget` nodes and `max_rel_depth` levels.
* Budget: chain min(max_spec_tokens, floor(m*factor + offset + 1e-9)); tree the same with
  max_tree_nodes in place of max_spec_tokens, and max_spec_tokens as the depth limit.
* Best draft: highest score (sum of probabilities, summed in draft order in float64), then the
  longer match, then the request's own tree (tree 0) over the global tree (tree 1).
"""

from __future__ import annotations

import heapq
import math

import numpy as np


def budget_for(m: int, factor: float, offset: float, cap: int) -> int:
    x = math.floor(m * factor + offset + 1e-9)
    return max(0, min(cap, x))


def count_occurrences(seqs, pattern) -> int:
    p = list(pattern)
    m = len(p)
    total = 0
    for s in seqs:
        for i in range(len(s) - m + 1):
            if s[i:i + m] == p:
                total += 1
    return total


def draft_chain(c0, children, budget, min_prob):
    """children: {path: {token: [count, rec]}}"""
    toks, pars, probs = [], [], []
    path: tuple = ()
    while len(toks) < budget:
        ch = children.get(path)
        if not ch:
            break
        t = min(ch, key=lambda k: (-ch[k][0], -ch[k][1], k))
        p = ch[t][0] / c0
        if p < min_prob:
            break
        toks.append(t)
        pars.append(len(toks) - 2)
        probs.append(p)
        path = path + (t,)
    return toks, pars, probs


def draft_tree(c0, children, budget, max_rel_depth, min_prob):
    toks, pars, probs = [], [], []
    if budget <= 0 or max_rel_depth <= 0:
        return toks, pars, probs
    heap: list = []

    def push(path, par):
        for t, (c, rec) in children.get(path, {}).items():
            if c / c0 >= min_prob:
                heapq.heappush(heap, (-c, -par, -rec, t, path + (t,)))

    push((), -1)
    while heap and len(toks) < budget:
        negc, negpar, _, t, path = heapq.heappop(heap)
        toks.append(t)
        pars.append(-negpar)
        probs.append(-negc / c0)
        if len(path) < max_rel_depth:
            push(path, len(toks) - 1)
    return toks, pars, probs


def _occurrence_ends(seqs, ctx, m_max):
    """For m = 1.., the (sequence index, end index) of every occurrence of ctx[-m:], found by
    filtering the occurrences of ctx[-(m-1):] (a plain scan of the raw text)."""
    if not ctx:
        return
    last = ctx[-1]
    occ = [(j, e) for j, s in enumerate(seqs) for e in range(len(s)) if s[e] == last]
    m = 1
    while occ and m <= m_max:
        yield m, occ
        m += 1
        if m > len(ctx):
            return
        t = ctx[-m]
        occ = [(j, e) for j, e in occ if e - m + 1 >= 0 and seqs[j][e - m + 1] == t]


def speculate_seqs(trees, context, D, max_spec_tokens, factor, offset, min_prob, use_tree,
                   max_tree_nodes):
    """trees: list of (tree_id, list of sequences). Returns (toks, parents, probs, score,
    match_len, tree_id); tree_id -1 and empty lists when there is no draft."""
    ctx = [int(t) for t in context]
    best = None
    for tree_id, seqs in trees:
        seqs = [list(map(int, s)) for s in seqs]
        for m, occ in _occurrence_ends(seqs, ctx, D):
            c0 = len(occ)
            children: dict = {}
            for j, e in occ:
                s = seqs[j]
                start = e - m + 1
                rec = -start if tree_id == 0 else 0
                path: tuple = ()
                for t in s[e + 1:min(len(s), start + D)]:
                    d = children.setdefault(path, {})
                    cr = d.setdefault(t, [0, rec])
                    cr[0] += 1
                    cr[1] = max(cr[1], rec)
                    path = path + (t,)
            if use_tree:
                budget = budget_for(m, factor, offset, max_tree_nodes)
                toks, pars, probs = draft_tree(c0, children, budget, max_spec_tokens, min_prob)
            else:
                budget = budget_for(m, factor, offset, max_spec_tokens)
                toks, pars, probs = draft_chain(c0, children, budget, min_prob)
            if not toks:
                continue
            score = 0.0
            for q in probs:
                score += q
            key = (score, m, 1 if tree_id == 0 else 0)
            if best is None or key > best[0]:
                best = (key, toks, pars, probs, score, m, tree_id)
    if best is None:
        return [], [], np.zeros(0, np.float32), 0.0, 0, -1
    _, toks, pars, probs, score, m, tree_id = best
    return toks, pars, np.asarray(probs, dtype=np.float32), score, m, tree_id


class ReferenceIndex:
    """Mirror of SuffixIndex's state (request sequences, global outputs) with brute-force drafts."""

    def __init__(self, max_depth: int, live_outputs: bool = False):
        self.D = max_depth
        self.live_outputs = live_outputs  # active requests' outputs are in the global tree too
        self.requests: dict = {}  # req_id -> [tokens, prompt_len]
        self.global_seqs: dict = {}  # global id -> tokens (finished outputs)

    def global_view(self) -> list:
        """The sequences of the global tree: finished outputs, then live ones."""
        seqs = list(self.global_seqs.values())
        if self.live_outputs:
            seqs += [seq[plen:] for seq, plen in self.requests.values() if len(seq) > plen]
        return seqs

    def start(self, req_id, prompt):
        self.requests[req_id] = [list(map(int, prompt)), len(prompt)]

    def extend(self, req_id, toks):
        self.requests[req_id][0].extend(map(int, toks))

    def finish(self, req_id):
        seq, plen = self.requests.pop(req_id)
        return seq[plen:]

    def count(self, pattern, req_id=None) -> int:
        if not 1 <= len(pattern) <= self.D:
            return 0
        seqs = self.global_view() if req_id is None else [self.requests[req_id][0]]
        return count_occurrences(seqs, list(map(int, pattern)))

    def speculate(self, req_id, max_spec_tokens, factor, offset, min_prob, use_tree,
                  max_tree_nodes, use_global=True):
        seq = self.requests[req_id][0]
        trees = [(0, [seq])]
        if use_global and self.global_view():
            trees.append((1, self.global_view()))
        return speculate_seqs(trees, seq, self.D, max_spec_tokens, factor, offset, min_prob,
                              use_tree, max_tree_nodes)
