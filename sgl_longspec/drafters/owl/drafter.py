"""The OWL model as a drafter of the decode step: one batched tree per step, from the target's
hidden state that produced each request's root token."""

from __future__ import annotations

from typing import Hashable, Sequence

import torch

from sgl_longspec.drafters.draft import Draft
from sgl_longspec.drafters.protocol import DraftRequest


class OwlDrafter:
    """The OWL LSTM drafter: one batched tree per step, from the target hidden state that produced
    each request's root token (`remember`)."""

    name = "owl"

    def __init__(self, model, top_k: int, max_nodes: int):
        self.model = model
        self.top_k = top_k
        self.max_nodes = max_nodes
        self.hidden: dict[Hashable, torch.Tensor] = {}

    def remember(self, rids: Sequence[Hashable], hidden: torch.Tensor) -> None:
        for b, rid in enumerate(rids):
            self.hidden[rid] = hidden[b]

    def has_state(self, rid: Hashable) -> bool:
        return rid in self.hidden

    def retain(self, rids: set) -> None:
        """Drop the states of requests outside `rids` (e.g. finished during prefill, never
        decoded, so never released as departed)."""
        for rid in [r for r in self.hidden if r not in rids]:
            del self.hidden[rid]

    def propose(self, requests: Sequence[DraftRequest]) -> list[Draft]:
        if not requests:
            return []
        hidden = torch.stack([self.hidden[r.rid] for r in requests]).to(
            self.model.embedding_weight.dtype)
        max_nodes = min(self.max_nodes, max(r.budget for r in requests))
        trees = self.model.draft_tree(hidden, [r.root for r in requests], top_k=self.top_k,
                                      max_nodes=max_nodes)
        return [t.truncated(r.budget) for t, r in zip(trees, requests)]

    def forget(self, rid: Hashable, keep_output: bool) -> None:
        self.hidden.pop(rid, None)
