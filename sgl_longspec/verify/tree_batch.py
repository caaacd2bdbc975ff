"""A batch of draft trees as padded tensors, and the logits layouts it is verified against (see
``sgl_longspec.verify.acceptance``): flat ``[sum(n_b + 1), V]`` or padded ``[bs, S, V]``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch

from sgl_longspec.drafters.draft import Draft

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


def as_tree_batch(drafts, logits: torch.Tensor):
    """-> (TreeBatch with offsets matching the logits layout, flat [T, V] logits, the padded
    slot count or None for flat logits)."""
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


def slots_per_request(tb: TreeBatch, padded_slots: Optional[int]) -> torch.Tensor:
    """Verify slots each request occupies in the logits (its root and nodes, or the padding)."""
    if padded_slots is not None:
        return torch.full_like(tb.num_nodes, padded_slots)
    return tb.num_nodes + 1


# What the verify entry points take as drafts.
TreeBatchLike = Union[TreeBatch, Draft, Sequence[Draft]]
