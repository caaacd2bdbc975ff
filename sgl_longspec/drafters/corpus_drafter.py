"""The external corpus as a drafter: drafts continue the request's last tokens from the corpus's
documents (sgl_longspec.drafters.corpus); nothing is kept per request."""

from __future__ import annotations

from typing import Hashable, Sequence

from sgl_longspec.drafters.corpus import SuffixCorpus
from sgl_longspec.drafters.draft import Draft
from sgl_longspec.drafters.protocol import DraftRequest, Observation


class CorpusDrafter:
    name = "corpus"

    def __init__(self, corpus: SuffixCorpus):
        self.corpus = corpus

    @property
    def context_tokens(self) -> int:
        """How many of a request's last tokens a draft can match on (DraftRequest.context)."""
        return self.corpus.max_depth

    def observe(self, obs: Observation) -> None:
        pass  # drafts match on DraftRequest.context; nothing is kept per request

    def propose(self, requests: Sequence[DraftRequest]) -> list[Draft]:
        return [self.corpus.speculate(r.context, r.budget, use_tree=r.shape == "tree")
                for r in requests]

    def forget(self, rid: Hashable, keep_output: bool) -> None:
        pass  # no per-request state
