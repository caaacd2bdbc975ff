"""Drafts the router refused, checked against the output that followed.

Why: the router verifies a draft token only when its calibrated path probability pays for the
verify cost, and it calibrates a drafter's probabilities for a request from the drafts it verified.
A request whose calibration fell (a few rejected drafts) then gets its drafts refused, and refused
drafts taught nothing: its calibration could only drift back to the prior. At 16 requests on a CPU
the break-even probability is high (~0.4), and in the code-edit benchmark more drafts were refused
than verified. Yet a refused draft's outcome is known for free a few steps later: the request's
next output tokens are exactly what verification would have compared it with. Greedy, the tokens
verification would have accepted are the draft's longest prefix that the output repeats; sampling,
the output token is drawn from the target's distribution, so it equals a draft token with the
probability that token would have been accepted (lossless speculative sampling of a single draft
token accepts it with the target's probability), and the matched prefix is distributed as the
accepted length. Either way the draft's main path (the chain it would have been without its side
nodes) can be scored as if it had been verified, and the router calibrates with it
(Router.observe_refused).

One refused draft per request is held at a time: the drafts of the next steps predict the same
tokens shifted by one, and counting them all would count one piece of evidence several times.

Engine-independent: Draft objects, request ids and output token sequences.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Optional, Sequence

import numpy as np

from sgl_longspec.drafters.draft import Draft


@dataclass(frozen=True)
class RefusedOutcome:
    """A refused draft's main path scored against the output: the drafter's expected accepted
    tokens (its path probabilities summed) and the tokens verification would have accepted."""

    source: str
    nodes: int
    expected: float
    accepted: int


@dataclass
class _Held:
    source: str
    tokens: np.ndarray  # the main path's tokens, root's child first
    probs: np.ndarray  # their path probabilities (the drafter's, uncalibrated)
    start: int  # output length when drafted: tokens[0] predicts output[start]


class RefusedDraftChecks:
    """Holds each request's latest refused draft until its output decides it (`hold`, `settle`)."""

    def __init__(self) -> None:
        self._held: dict[Hashable, _Held] = {}

    def hold(self, rid: Hashable, draft: Draft, output_len: int) -> bool:
        """Keep `draft`'s main path, refused at a step where the request had `output_len` output
        tokens, unless one is held for the request already. Returns whether it was kept."""
        if not len(draft) or rid in self._held:
            return False
        main = np.flatnonzero(~draft.side_mask())  # parents-first, so in depth order
        self._held[rid] = _Held(draft.source, draft.token_ids[main].copy(),
                                draft.probs[main].astype(np.float64), int(output_len))
        return True

    def settle(self, rid: Hashable, output: Sequence[int]) -> Optional[RefusedOutcome]:
        """The held draft's outcome once `output` (the request's output tokens now) decides it: a
        token differs from the draft's (nothing after it could have been accepted) or the output
        repeats the whole draft. None while undecided or when nothing is held."""
        h = self._held.get(rid)
        if h is None:
            return None
        n = len(h.tokens)
        new = np.asarray(output[h.start:h.start + n], dtype=np.int64)
        differs = np.flatnonzero(new != h.tokens[:len(new)])
        if len(differs):
            accepted = int(differs[0])
        elif len(new) == n:
            accepted = n
        else:
            return None
        del self._held[rid]
        return RefusedOutcome(h.source, n, float(h.probs.sum()), accepted)

    def forget(self, rid: Hashable) -> None:
        self._held.pop(rid, None)

    def __len__(self) -> int:
        return len(self._held)
