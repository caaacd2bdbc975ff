"""Shared-prefix groups for cascade attention: which requests of a batch read the same KV.

SGLang's radix cache gives every request that reuses a cached prefix the very same KV slots for it,
so requests whose committed KV starts with the same run of slot ids share that run. Attention then
splits into levels merged by log-sum-exp: the group's shared prefix (all query rows of the group
against one copy of its KV: read once per step instead of once per request), each request's own
remaining prefix, and its new tokens (draft tree or prefill chunk) under their mask.

Engine independent: slot-id tensors in, groups out. Planned once per step on the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class SharedGroup:
    members: tuple[int, ...]  # indices of the requests in the batch, at least two
    length: int  # their KV's first `length` slots are the same slot ids


def common_prefix_len(a: torch.Tensor, b: torch.Tensor) -> int:
    """Length of the longest common prefix of two 1-D slot-id tensors."""
    n = min(a.numel(), b.numel())
    if n == 0:
        return 0
    differ = (a[:n] != b[:n]).nonzero()
    return int(differ[0, 0]) if differ.numel() else n


def shared_prefix_groups(prefixes: Sequence[torch.Tensor], min_shared: int) -> list[SharedGroup]:
    """Disjoint groups of requests whose slot ids start with the same run of >= min_shared slots.

    Requests are bucketed by their first slot. In a bucket, the first request left is the anchor;
    of the others, those sharing >= min_shared slots with it are ranked by that length, and the
    anchor takes the top k that maximise the KV reads saved, k * (the k-th longest shared length)
    (one short sharer must not shrink a long group's shared level); the rest try again with the
    next anchor. A request belongs to at most one group; min_shared <= 0 turns grouping off."""
    if min_shared <= 0:
        return []
    buckets: dict[int, list[int]] = {}
    for i, p in enumerate(prefixes):
        if p.numel() >= min_shared:
            buckets.setdefault(int(p[0]), []).append(i)
    groups = []
    for pool in buckets.values():
        while len(pool) >= 2:
            anchor, others = pool[0], pool[1:]
            shared = [(common_prefix_len(prefixes[anchor], prefixes[j]), j) for j in others]
            sharers = sorted(((n, j) for n, j in shared if n >= min_shared), key=lambda t: (-t[0], t[1]))
            if sharers:
                k = max(range(1, len(sharers) + 1), key=lambda k: (k * sharers[k - 1][0], -k))
                taken = sharers[:k]
                groups.append(SharedGroup((anchor, *sorted(j for _, j in taken)), taken[-1][0]))
                left = {j for _, j in taken}
                pool = [j for j in others if j not in left]
            else:
                pool = others
    return groups
