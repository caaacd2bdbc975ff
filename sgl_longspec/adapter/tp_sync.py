"""Rank-0 decisions for tensor parallelism.

Under `--tp N` every rank runs the same scheduler loop and must run forwards of the same shapes,
or the collectives inside the model hang. What LONGSPEC decides per step depends on state that is
not identical across ranks: the router fits its cost model to each rank's own step timings, and
the rejection sampler draws random numbers. So the decisions are made once, on TP rank 0, and
broadcast over the group's CPU (gloo) channel, the pattern of SGLang's spec_tp_sync:

- before the forward: the drafts to verify (an empty plan = a plain decode step), so every rank
  builds the same ragged verify batch;
- after the forward: the verification outcome, so every rank commits the same tokens and KV.

Ranks other than 0 run no drafter and keep no suffix state. With one rank nothing is sent.
`group` is anything with `world_size`, `rank_in_group` and `broadcast_object(obj, src=0)`:
SGLang's GroupCoordinator, or the gloo harness of the tests.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from sgl_longspec.drafters.draft import Draft


class RankZeroDecisions:
    def __init__(self, group: Optional[Any]):
        self.group = group
        self.world_size = int(getattr(group, "world_size", 1) or 1)
        self.rank = int(getattr(group, "rank_in_group", 0) or 0)
        self.broadcasts = 0

    @property
    def decides(self) -> bool:
        """Whether this rank makes the decisions (rank 0, or the only rank)."""
        return self.rank == 0

    def share(self, value: Any) -> Any:
        """Rank 0's `value` on every rank (the argument is ignored elsewhere)."""
        if self.world_size == 1:
            return value
        self.broadcasts += 1
        return self.group.broadcast_object(value if self.rank == 0 else None, src=0)

    def share_drafts(self, drafts: Optional[list[Draft]]) -> list[Draft]:
        packed = None if drafts is None else [_pack(d) for d in drafts]
        return [_unpack(p) for p in self.share(packed)]


def _pack(d: Draft):
    return (d.token_ids, d.parents, d.probs, float(d.score), int(d.match_len), d.source)


def _unpack(p) -> Draft:
    tokens, parents, probs, score, match_len, source = p
    return Draft(np.asarray(tokens), np.asarray(parents), np.asarray(probs), score, match_len,
                 source)


def tp_group():
    """SGLang's TP group of this process (None when distributed is not initialised)."""
    from sgl_longspec.adapter import sglang_compat

    try:
        return sglang_compat.name("get_tp_group")()
    # Not initialised (a worker built outside a scheduler): SGLang 0.5.23's ParallelContext raises
    # RuntimeError/ValueError for an unwritten or unpublished field, AttributeError otherwise.
    except (AttributeError, RuntimeError, ValueError):
        return None
