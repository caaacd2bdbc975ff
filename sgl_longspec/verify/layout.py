"""The layout of one ragged verify batch, computed once per step and read by everything after it.

Request b verifies q_b = 1 + n_b tokens: its root (the last committed token, at position
prefix_lens[b]) and its n_b draft tokens, each at the position of its depth in the draft tree; their
KV goes to the q_b slots right after its committed prefix (req_to_token[row_b, prefix_b :
prefix_b + q_b]). Nothing is padded: the batch's query rows are the requests' rows one after the
other. The worker builds the forward's inputs from it, the CPU and FlashInfer backends their
attention plans, and the stock FlashInfer backend (the dense baseline) its custom mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from sgl_longspec.drafters.draft import Draft


def indptr(lengths: Sequence[int], device=None) -> torch.Tensor:
    """[0, l0, l0 + l1, ...] as int32: the offsets of ragged rows."""
    out = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    if len(lengths):
        out[1:] = torch.cumsum(torch.as_tensor(list(lengths), dtype=torch.int32), 0)
    return out.to(device) if device is not None else out


@dataclass(frozen=True)
class VerifyLayout:
    tree_masks: list  # per request, [q_b, q_b] bool, row/col 0 the root
    prefix_lens: list  # committed tokens per request (int)
    token_ids: list = field(default_factory=list)  # the batch's query tokens (empty: shape only)
    positions: list = field(default_factory=list)

    @classmethod
    def build(cls, drafts: Sequence[Draft], prefix_lens: Sequence[int],
              roots: Sequence[int]) -> "VerifyLayout":
        ids, pos, masks = [], [], []
        for b, d in enumerate(drafts):
            start = int(prefix_lens[b])
            depth = d.depths() if len(d) else np.zeros(0, np.int32)
            ids.append(int(roots[b]))
            ids.extend(d.token_ids.tolist())
            pos.append(start)
            pos.extend((start + depth).tolist())
            masks.append(torch.from_numpy(d.tree_mask(include_root=True)))
        return cls(masks, [int(p) for p in prefix_lens], ids, pos)

    @property
    def q_lens(self) -> list[int]:
        return [int(m.shape[0]) for m in self.tree_masks]

    def qo_indptr(self, device=None) -> torch.Tensor:
        return indptr(self.q_lens, device)

    def tree_slots(self, req_to_token: torch.Tensor, rows: Sequence[int]) -> list[torch.Tensor]:
        """Each request's verify slots, req_to_token[row, prefix : prefix + q]. A range past the
        row would come back short and shift every later request's tree KV: IndexError."""
        width = int(req_to_token.shape[1])
        out = []
        for b, (r, s, q) in enumerate(zip(rows, self.prefix_lens, self.q_lens)):
            if s + q > width:
                raise IndexError(f"LONGSPEC verify: request {b} verifies slots [{s}, {s + q}) of a "
                                 f"req_to_token row of {width}")
            out.append(req_to_token[r, s:s + q])
        return out

    def flat_tree_mask(self, device=None) -> torch.Tensor:
        """The tree masks row-major, one after the other (offsets: q_b * q_b)."""
        if not self.tree_masks:
            return torch.zeros(0, dtype=torch.bool, device=device)
        return torch.cat([m.reshape(-1) for m in self.tree_masks]).to(device=device, dtype=torch.bool)

    def dense_verify_args(self, prefix_lens: torch.Tensor, device):
        """(kv_indices buffer, kv_indptr, qo_indptr, custom mask) for SGLang's stock FlashInfer
        backend, which verifies through a dense custom mask: request b attends over its prefix_b
        committed tokens plus its q_b verify tokens, under per-request [q_b, prefix_b + q_b] rows
        (prefix columns all true, the tree mask after them) packed row-major. The kv_indices
        buffer (int32, sum(prefix_b + q_b)) is allocated and left for the caller to fill."""
        prefix = [int(p) for p in prefix_lens.tolist()]
        q_lens = self.q_lens
        rows = []
        for m, p in zip(self.tree_masks, prefix):
            m = m.to(device=device, dtype=torch.bool)
            rows.append(torch.cat([torch.ones(m.shape[0], p, dtype=torch.bool, device=device), m],
                                  1).reshape(-1))
        mask = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.bool, device=device)
        kv_indptr = indptr([p + q for p, q in zip(prefix, q_lens)], device)
        kv_indices = torch.empty(int(kv_indptr[-1]), dtype=torch.int32, device=device)
        return kv_indices, kv_indptr, self.qo_indptr(device), mask
