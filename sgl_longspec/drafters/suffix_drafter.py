"""The suffix index (per-request and global suffix trees) as a drafter."""

from __future__ import annotations

from typing import Hashable, Sequence

from sgl_longspec.drafters.draft import Draft
from sgl_longspec.drafters.protocol import DraftRequest, Observation
from sgl_longspec.drafters.suffix_index import SuffixIndex


class SuffixDrafter:
    """The suffix index as a drafter: each request's tree follows its tokens (`observe`)."""

    name = "suffix"

    def __init__(self, index: SuffixIndex):
        self.index = index
        self.indexed: dict[Hashable, int] = {}  # rid -> tokens indexed

    def observe(self, obs: Observation) -> None:
        """Bring the request's tree to obs.prompt + obs.output (appending only what is new)."""
        rid, prompt, output = obs.rid, obs.prompt, obs.output
        total = len(prompt) + len(output)
        have = self.indexed.get(rid)
        if have is not None and have > total:  # retracted and re-admitted: start over
            self.index.abort_request(rid)
            have = None
        if have is None:
            self.index.start_request(rid, list(prompt) + list(output))
        elif have < total:
            if have >= len(prompt):
                new = list(output[have - len(prompt):])
            else:
                new = list(prompt[have:]) + list(output)
            self.index.extend(rid, new)
        self.indexed[rid] = total

    def propose(self, requests: Sequence[DraftRequest]) -> list[Draft]:
        return [self.index.speculate(r.rid, max_spec_tokens=r.budget, max_tree_nodes=r.budget,
                                     use_tree=r.shape == "tree")
                for r in requests]

    def forget(self, rid: Hashable, keep_output: bool) -> None:
        if self.indexed.pop(rid, None) is None:
            return
        if keep_output:
            self.index.finish_request(rid, keep_in_global=True)
        else:
            self.index.abort_request(rid)
