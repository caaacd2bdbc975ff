"""The OWL model as a drafter of the decode step: one batched tree per step, from the target's
hidden state that produced each request's root token."""

from __future__ import annotations

from typing import Hashable, Sequence

import torch

from sgl_longspec.drafters.draft import Draft
from sgl_longspec.drafters.protocol import DraftRequest, Observation


class OwlDrafter:
    """The OWL LSTM drafter: one batched tree per step, from the target hidden state that produced
    each request's root token (`observe`)."""

    name = "owl"

    def __init__(self, model, top_k: int, max_nodes: int):
        self.model = model
        self.top_k = top_k
        self.max_nodes = max_nodes
        self.hidden: dict[Hashable, torch.Tensor] = {}

    def observe(self, obs: Observation) -> None:
        if obs.hidden is not None:
            self.hidden[obs.rid] = obs.hidden

    def has_state(self, rid: Hashable) -> bool:
        """Whether a hidden state was observed for the request (it can be drafted for)."""
        return rid in self.hidden

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
