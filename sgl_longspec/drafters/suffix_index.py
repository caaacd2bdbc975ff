"""Suffix-tree draft index (SuffixDecoding) for long-context agent traffic. Engine independent.

One compressed suffix tree per active request (its prompt + the output accepted so far) and one
global tree over the outputs of finished requests, bounded by a response count and by bytes
(FIFO or LRU eviction). With ``live_outputs`` (the default) the outputs of active requests are in
the global tree too, as they are generated (a request's own output included, as in
ArcticInference); an aborted request's output is rolled back; past the byte bound, live outputs
stop growing until their request finishes. Every verify step the worker calls ``extend`` with the accepted tokens and
``speculate`` for the next draft; both run in the compiled core ``sgl_longspec._suffix_core``.

Semantics (the brute-force reference in tests/suffix_reference.py implements exactly this):

* A tree holds token sequences; for a string s with 1 <= len(s) <= max_depth, count(s) is the
  number of places s occurs in them. Paths are capped at ``max_depth`` tokens, so a match of
  length m can be followed by at most max_depth - m draft tokens.
* The context is the request's own sequence. For each match length m, p = its last m tokens; if
  count(p) > 0 in a tree, the draft follows what came after the occurrences of p there. A drafted
  node q has probability count(p + q) / count(p) (the request's own trailing occurrence of p counts
  in its tree, as in ArcticInference). Budget = min(max tokens, floor(m * spec_factor +
  spec_offset)); nodes with probability < min_token_prob are never drafted.
* Chain: repeatedly the child with the largest count; ties go, in the request's tree, to the
  continuation that occurred first (as ArcticInference orders count-1 siblings), then to the
  smaller token id. Tree: best-first by probability with at most ``max_tree_nodes`` (and the
  budget) nodes and at most ``max_spec_tokens`` levels; ties go to the most recently drafted
  parent, then the same child order. ``score`` = sum of probabilities = expected number of
  accepted tokens.
* The draft with the highest score wins over all match lengths and both trees; ties go to the
  longer match, then to the request's own tree.

Data structure and cost (D = max_depth, l = length of the longest suffix of the sequence that
occurred before, capped at D - 1; usually a few tokens):

* Compressed, depth-capped suffix tree with counts; edge labels are (sequence, offset) references.
  Unique suffixes live in "open" leaves that grow with the sequence for free (Ukkonen's trick);
  the l repeated suffixes are kept as pending loci and each appended token advances them:
  O(l + 1) per token (Arctic's tree walks all D active suffixes). Children are a sibling list,
  indexed by a (parent, token) hash map once a node has more than 6 children.
* speculate: the pending loci ARE the matches of the context suffixes in the request's tree
  (no search); the global tree is matched from the root, O(M^2) token steps for a longest match M.
  Match lengths are visited longest first and skipped when their score bound (budget levels x
  (count - 1) / count) cannot beat the best so far. Chain O(length) via a maintained best child;
  tree best-first with a heap, edge runs emitted without heap operations.
* Global eviction walks the evicted output's suffix end nodes upward (O(output x path nodes)),
  frees dead nodes, re-points edge references and merges nodes left with a single same-count child.
* Memory: ~1.4 nodes of 48 bytes per indexed token plus the tokens (about 105 bytes/token).

Not thread-safe: call it from one thread (the worker's scheduler loop).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Hashable

import numpy as np

from sgl_longspec import _suffix_core
from sgl_longspec.drafters.draft import Draft

__all__ = ["SuffixIndex", "SuffixIndexConfig"]

# The C++ core stores token ids and counts as int32.
INT32_MAX = 2**31 - 1


@dataclass
class SuffixIndexConfig:
    """Settings of a :class:`SuffixIndex`; the spec_* fields are the defaults of ``speculate``."""

    max_depth: int = 64  # longest path in a tree (match + draft), as ArcticInference's max_tree_depth
    vocab_size: int | None = None  # token ids must lie in [0, vocab_size); None: [0, 2**31 - 1)
    max_cached_responses: int = 4096  # global tree bound by count; 0 disables the global tree
    max_cache_bytes: int = 512 * 2**20  # global tree bound by (live) bytes
    # Outputs join the global tree while they are generated (other requests draft from them at
    # once, as ArcticInference shares them), not when their request finishes.
    live_outputs: bool = True
    eviction: str = "fifo"  # "fifo" (oldest first) or "lru" (least recently drafted from)
    max_spec_tokens: int = 32
    spec_factor: float = 1.0
    spec_offset: float = 0.0
    min_token_prob: float = 0.1
    use_tree: bool = False
    max_tree_nodes: int = 64

    def validate(self) -> None:
        def _int(name: str, lo: int, hi: int) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not lo <= v <= hi:
                raise ValueError(f"SuffixIndexConfig.{name} must be an int in [{lo}, {hi}], got {v!r}")

        _int("max_depth", 1, 4096)
        if self.vocab_size is not None:
            _int("vocab_size", 1, INT32_MAX)
        _int("max_cached_responses", 0, INT32_MAX)
        _int("max_cache_bytes", 0, 2**62)
        _int("max_spec_tokens", 0, 65536)
        _int("max_tree_nodes", 0, 65536)
        if not isinstance(self.live_outputs, (bool, np.bool_)):
            raise ValueError(f"SuffixIndexConfig.live_outputs must be a bool, got {self.live_outputs!r}")
        if self.eviction not in ("fifo", "lru"):
            raise ValueError(f"SuffixIndexConfig.eviction must be 'fifo' or 'lru', got {self.eviction!r}")
        _check_float("spec_factor", self.spec_factor, 0.0, 1e6)
        _check_float("spec_offset", self.spec_offset, -1e6, 1e6)
        _check_float("min_token_prob", self.min_token_prob, 0.0, 1.0)
        if not isinstance(self.use_tree, (bool, np.bool_)):
            raise ValueError(f"SuffixIndexConfig.use_tree must be a bool, got {self.use_tree!r}")


def _check_float(name: str, v: Any, lo: float, hi: float) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number, got {v!r}")
    f = float(v)
    if not (math.isfinite(f) and lo <= f <= hi):
        raise ValueError(f"{name} must be finite and in [{lo}, {hi}], got {v!r}")
    return f


def _check_int(name: str, v: Any, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not lo <= v <= hi:
        raise ValueError(f"{name} must be an int in [{lo}, {hi}], got {v!r}")
    return int(v)


_new_draft = object.__new__


def _make_draft(tok: np.ndarray, par: np.ndarray, prob: np.ndarray, score: float,
                match_len: int) -> Draft:
    """A Draft without re-validating: the core returns contiguous int64/int32/float32 arrays whose
    parents always precede their children, which is what Draft.__post_init__ would check."""
    d = _new_draft(Draft)
    d.token_ids = tok
    d.parents = par
    d.probs = prob
    d.score = score
    d.match_len = match_len
    d.source = "suffix" if match_len else "none"
    return d


class SuffixIndex:
    """Per-request suffix trees plus a global tree of finished outputs; drafts as ``Draft``.

    Token arguments may be 1-D integer numpy arrays (any integer dtype), lists or tuples of ints.
    Bad arguments raise ``ValueError`` (``KeyError`` for an unknown request id) and leave the index
    unchanged.
    """

    def __init__(self, config: SuffixIndexConfig | None = None, **overrides: Any) -> None:
        cfg = config if config is not None else SuffixIndexConfig()
        if overrides:
            cfg = SuffixIndexConfig(**{**cfg.__dict__, **overrides})
        cfg.validate()
        self.config = cfg
        vocab = cfg.vocab_size if cfg.vocab_size is not None else INT32_MAX
        self._core = _suffix_core.Core(int(cfg.max_depth), int(vocab))
        self._core.set_live_outputs(bool(cfg.live_outputs) and cfg.max_cached_responses > 0,
                                    int(cfg.max_cache_bytes))
        self._handles: dict[Hashable, int] = {}
        # global sequence id -> request id, oldest (FIFO) / least recently used (LRU) first
        self._cached: OrderedDict[int, Hashable] = OrderedDict()
        self._lru = cfg.eviction == "lru"
        self.num_evicted = 0

    # ------------------------------------------------------------------ requests
    def _handle(self, req_id: Hashable) -> int:
        try:
            return self._handles[req_id]
        except KeyError:
            raise KeyError(f"unknown request id {req_id!r} (not started, or already finished)") from None
        except TypeError:
            raise KeyError(f"request id must be hashable, got {type(req_id).__name__}") from None

    def start_request(self, req_id: Hashable, prompt_ids) -> None:
        """Index the prompt of a new request (O(prompt length))."""
        try:
            if req_id in self._handles:
                raise ValueError(f"request id {req_id!r} is already active")
        except TypeError:
            raise ValueError(f"request id must be hashable, got {type(req_id).__name__}") from None
        self._handles[req_id] = self._core.start_request(prompt_ids)

    def extend(self, req_id: Hashable, new_ids) -> None:
        """Append accepted tokens (output) to the request's sequence."""
        try:
            h = self._handles[req_id]
        except (KeyError, TypeError):
            h = self._handle(req_id)
        self._core.extend(h, new_ids)

    def finish_request(self, req_id: Hashable, keep_in_global: bool = True) -> None:
        """Drop the request's tree; with keep_in_global its output joins the global tree."""
        h = self._handle(req_id)
        keep = bool(keep_in_global) and self.config.max_cached_responses > 0
        seq = self._core.finish_request(h, keep)
        del self._handles[req_id]
        if seq >= 0:
            self._cached[seq] = req_id
            self._evict()

    def abort_request(self, req_id: Hashable) -> None:
        """Drop the request without keeping its output."""
        self.finish_request(req_id, keep_in_global=False)

    def add_response(self, token_ids, req_id: Hashable = None) -> int:
        """Insert a finished output directly into the global tree (warm start); returns its id."""
        if self.config.max_cached_responses <= 0:
            raise ValueError("the global tree is disabled (max_cached_responses=0)")
        seq = self._core.global_insert(token_ids)
        self._cached[seq] = req_id
        self._evict()
        return seq

    def _evict(self) -> None:
        cfg = self.config
        core = self._core
        while self._cached and (len(self._cached) > cfg.max_cached_responses
                                or core.global_bytes() > cfg.max_cache_bytes):
            seq, _ = self._cached.popitem(last=False)
            core.global_remove(seq)
            self.num_evicted += 1

    def evict_response(self, seq_id: int) -> None:
        """Remove one cached output (by the id returned from add_response / cached_responses)."""
        if seq_id not in self._cached:
            raise KeyError(f"no cached response with id {seq_id!r}")
        del self._cached[seq_id]
        self._core.global_remove(seq_id)

    # ------------------------------------------------------------------ speculation
    def speculate(self, req_id: Hashable, max_spec_tokens: int | None = None,
                  spec_factor: float | None = None, spec_offset: float | None = None,
                  min_token_prob: float | None = None, use_tree: bool | None = None,
                  max_tree_nodes: int | None = None, use_global: bool = True) -> Draft:
        """Draft a continuation of the request's sequence (None = the config's default)."""
        try:
            h = self._handles[req_id]
        except (KeyError, TypeError):
            h = self._handle(req_id)
        cfg = self.config
        if max_spec_tokens is None:
            max_spec_tokens = cfg.max_spec_tokens
        if spec_factor is None:
            spec_factor = cfg.spec_factor
        if spec_offset is None:
            spec_offset = cfg.spec_offset
        if min_token_prob is None:
            min_token_prob = cfg.min_token_prob
        if use_tree is None:
            use_tree = cfg.use_tree
        if max_tree_nodes is None:
            max_tree_nodes = cfg.max_tree_nodes
        # Fast path for plain Python values; the core range-checks them.
        if (type(max_spec_tokens) is not int or type(max_tree_nodes) is not int
                or type(spec_factor) is not float or type(spec_offset) is not float
                or type(min_token_prob) is not float or type(use_tree) is not bool):
            max_spec_tokens = _check_int("max_spec_tokens", max_spec_tokens, 0, 65536)
            max_tree_nodes = _check_int("max_tree_nodes", max_tree_nodes, 0, 65536)
            spec_factor = _check_float("spec_factor", spec_factor, 0.0, 1e6)
            spec_offset = _check_float("spec_offset", spec_offset, -1e6, 1e6)
            min_token_prob = _check_float("min_token_prob", min_token_prob, 0.0, 1.0)
            if not isinstance(use_tree, (bool, np.bool_)):
                raise ValueError(f"use_tree must be a bool, got {use_tree!r}")
            use_tree = bool(use_tree)
        tok, par, prob, score, match_len, tree, ref_seq = self._core.speculate(
            h, max_spec_tokens, spec_factor, spec_offset, min_token_prob, use_tree,
            max_tree_nodes, use_global and self._has_global())
        if tree == 1 and self._lru and ref_seq in self._cached:
            self._cached.move_to_end(ref_seq)
        return _make_draft(tok, par, prob, score, match_len)

    def speculate_context(self, context_ids, max_spec_tokens: int | None = None,
                          use_tree: bool | None = None, max_tree_nodes: int | None = None) -> Draft:
        """Draft a continuation of `context_ids` from the global tree alone (no request of this
        index is involved: a corpus kept in an index of its own). Only the last max_depth tokens
        of the context can matter. Same rules as ``speculate`` otherwise."""
        cfg = self.config
        max_spec_tokens = _check_int("max_spec_tokens", cfg.max_spec_tokens if max_spec_tokens is None
                                     else max_spec_tokens, 0, 65536)
        max_tree_nodes = _check_int("max_tree_nodes", cfg.max_tree_nodes if max_tree_nodes is None
                                    else max_tree_nodes, 0, 65536)
        use_tree = cfg.use_tree if use_tree is None else use_tree
        if not isinstance(use_tree, (bool, np.bool_)):
            raise ValueError(f"use_tree must be a bool, got {use_tree!r}")
        if not self._cached:
            return Draft.empty()
        tok, par, prob, score, match_len, tree, ref_seq = self._core.speculate_context(
            context_ids, max_spec_tokens, float(cfg.spec_factor), float(cfg.spec_offset),
            float(cfg.min_token_prob), bool(use_tree), max_tree_nodes)
        if tree == 1 and self._lru and ref_seq in self._cached:
            self._cached.move_to_end(ref_seq)
        return _make_draft(tok, par, prob, score, match_len)

    def speculate_raw(self, req_id: Hashable, max_spec_tokens: int, spec_factor: float,
                      spec_offset: float, min_token_prob: float, use_tree: bool,
                      max_tree_nodes: int, use_global: bool = True):
        """(token_ids, parents, probs, score, match_len, tree) with tree 0 = request, 1 = global,
        -1 = no draft. For tests and benchmarks; no LRU bookkeeping."""
        out = self._core.speculate(self._handle(req_id), max_spec_tokens, spec_factor, spec_offset,
                                   min_token_prob, use_tree, max_tree_nodes,
                                   use_global and self._has_global())
        return out[:6]

    def _has_global(self) -> bool:
        # live outputs are in the global tree before any request has finished
        return bool(self._cached) or self._core.live_outputs

    # ------------------------------------------------------------------ stats
    @property
    def num_active_requests(self) -> int:
        return len(self._handles)

    @property
    def num_cached_responses(self) -> int:
        return len(self._cached)

    def cached_responses(self) -> list[tuple[int, Hashable]]:
        """(global id, request id) of the cached outputs, next to be evicted first."""
        return list(self._cached.items())

    def is_active(self, req_id: Hashable) -> bool:
        try:
            return req_id in self._handles
        except TypeError:
            return False

    def request_tokens(self, req_id: Hashable) -> np.ndarray:
        """The request's sequence (prompt + accepted output) as int64."""
        return self._core.request_tokens(self._handle(req_id))

    def memory_bytes(self) -> int:
        """Live bytes of all trees (nodes, child map entries at their load factor, tokens): what
        the max_cache_bytes bound is enforced on (for the global tree)."""
        return int(self._core.memory_bytes())

    def allocated_bytes(self) -> int:
        """Bytes actually reserved by all trees (container capacities included)."""
        return int(self._core.allocated_bytes())

    def global_memory_bytes(self) -> int:
        return int(self._core.global_bytes())

    def request_memory_bytes(self, req_id: Hashable, allocated: bool = False) -> int:
        h = self._handle(req_id)
        return int(self._core.request_allocated_bytes(h) if allocated else self._core.request_bytes(h))

    def count(self, pattern, req_id: Hashable = None) -> int:
        """Occurrences of pattern (1 <= len <= max_depth) in the request's tree, or in the global
        tree when req_id is None."""
        h = -1 if req_id is None else self._handle(req_id)
        return int(self._core.count(h, pattern))

    def check_integrity(self, req_id: Hashable = None) -> None:
        """Raise AssertionError when a structural invariant of a tree is broken (debugging)."""
        h = -1 if req_id is None else self._handle(req_id)
        msg = self._core.check(h)
        if msg:
            raise AssertionError(f"suffix index integrity: {msg}")
