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
- A chain is the special case parents == [-1, 0, 1, ..., n - 2]. In a tree, the main path follows
  from the root the most probable child at each node (the chain the drafter would have drafted);
  every other node is a side node (``side_mask``). The router calibrates the two kinds apart.
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

    def pruned(self, min_prob) -> "Draft":
        """Only the nodes whose path probability is at least min_prob (a number, or one per node),
        and whose ancestors are kept (path probabilities need not be monotone for every drafter)."""
        return self.kept(self.probs >= min_prob)[0]

    def kept(self, keep: np.ndarray) -> tuple["Draft", np.ndarray]:
        """The draft of the nodes marked in `keep` whose ancestors are all kept, and the indices
        (into this draft) of its nodes."""
        if keep.all():
            return self, np.arange(len(self), dtype=np.int64)
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
                     self.source), idx

    def side_mask(self) -> np.ndarray:
        """Bool [n]: the nodes off the main path (the most probable child at each step from the
        root; the first one on ties). All False for a chain."""
        n = len(self)
        side = np.ones(n, dtype=bool)
        node = -1
        while True:
            children = np.flatnonzero(self.parents == node)
            if not len(children):
                break
            node = int(children[np.argmax(self.probs[children])])
            side[node] = False
        return side

    @property
    def shape(self) -> str:
        """"chain" (no node has two children; the empty draft too) or "tree"."""
        return "chain" if len(np.unique(self.parents)) == len(self) else "tree"

    def width(self) -> int:
        """Most nodes at one depth (1 for a chain, 0 for the empty draft)."""
        return int(np.bincount(self.depths()).max()) if len(self) else 0

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
