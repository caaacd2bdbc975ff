"""The draft tree that every drafter produces and the verifier and attention mask builder consume.

Conventions (shared by the suffix index, the OWL drafter, verification and the attention mask):
- A draft of n tokens is a tree rooted at the request's last committed token, which is not part of
  the draft. Node i (0 <= i < n) has token ``token_ids[i]`` and parent ``parents[i]``: -1 for the
  root, otherwise an index < i (nodes are stored parents-first).
- ``probs[i]`` is the drafter's estimate that the whole path root -> i is accepted; ``score`` is the
  drafter's expected number of accepted tokens (the sum of probs for the suffix index), which the
  router compares across drafters.
- In a verify pass the root occupies slot 0 and node i slot i + 1; ``tree_mask(include_root=True)``
  is the [n + 1, n + 1] ancestor-or-self mask in that layout.
- A chain is the special case parents == [-1, 0, 1, ..., n - 2].
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Draft:
    token_ids: np.ndarray  # int64 [n]
    parents: np.ndarray  # int32 [n], -1 = the root (last committed token)
    probs: np.ndarray = field(default=None)  # float32 [n], path acceptance estimates
    score: float = 0.0
    match_len: int = 0
    source: str = "none"  # "suffix", "owl", "none"

    def __post_init__(self) -> None:
        self.token_ids = np.ascontiguousarray(self.token_ids, dtype=np.int64).reshape(-1)
        self.parents = np.ascontiguousarray(self.parents, dtype=np.int32).reshape(-1)
        if self.probs is None:
            self.probs = np.ones(len(self.token_ids), dtype=np.float32)
        self.probs = np.ascontiguousarray(self.probs, dtype=np.float32).reshape(-1)
        n = len(self.token_ids)
        if len(self.parents) != n or len(self.probs) != n:
            raise ValueError(
                f"draft arrays disagree in length: tokens={n} parents={len(self.parents)} "
                f"probs={len(self.probs)}"
            )
        if n and not np.all((self.parents >= -1) & (self.parents < np.arange(n))):
            raise ValueError("draft parents must be -1 or the index of an earlier node")

    @classmethod
    def empty(cls) -> "Draft":
        return cls(np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32))

    @classmethod
    def chain(cls, token_ids, probs=None, score: float | None = None, match_len: int = 0,
              source: str = "none") -> "Draft":
        n = len(token_ids)
        d = cls(token_ids, np.arange(-1, n - 1, dtype=np.int32), probs, 0.0, match_len, source)
        d.score = float(d.probs.sum()) if score is None else float(score)
        return d

    def __len__(self) -> int:
        return len(self.token_ids)

    def is_chain(self) -> bool:
        return bool(np.array_equal(self.parents, np.arange(-1, len(self) - 1)))

    def depths(self) -> np.ndarray:
        """Depth of each node (1 for children of the root)."""
        d = np.zeros(len(self), dtype=np.int32)
        for i, p in enumerate(self.parents):
            d[i] = 1 if p < 0 else d[p] + 1
        return d

    def truncated(self, max_nodes: int) -> "Draft":
        """The first max_nodes nodes (still a valid tree: parents come first)."""
        if max_nodes >= len(self):
            return self
        k = max(max_nodes, 0)
        return Draft(self.token_ids[:k], self.parents[:k], self.probs[:k],
                     float(self.probs[:k].sum()), self.match_len, self.source)

    def pruned(self, min_prob: float) -> "Draft":
        """Only the nodes whose path probability is at least min_prob, and whose ancestors are kept
        (path probabilities need not be monotone for every drafter)."""
        keep = self.probs >= min_prob
        if keep.all():
            return self
        new_index = np.full(len(self), -1, dtype=np.int32)
        kept = []
        for i, p in enumerate(self.parents):
            if keep[i] and (p < 0 or new_index[p] >= 0):
                new_index[i] = len(kept)
                kept.append(i)
        idx = np.asarray(kept, dtype=np.int64)
        parents = np.where(self.parents[idx] < 0, -1, new_index[np.maximum(self.parents[idx], 0)])
        probs = self.probs[idx]
        return Draft(self.token_ids[idx], parents, probs, float(probs.sum()), self.match_len,
                     self.source)

    def tree_mask(self, include_root: bool = True) -> np.ndarray:
        """Boolean ancestor-or-self mask; with the root, slot 0 is the root and node i is slot i+1."""
        n = len(self)
        off = 1 if include_root else 0
        m = np.zeros((n + off, n + off), dtype=bool)
        if include_root:
            m[:, 0] = True
        for i, p in enumerate(self.parents):
            row = i + off
            if p >= 0:
                m[row, : n + off] = m[p + off, : n + off]
            m[row, row] = True
        return m
