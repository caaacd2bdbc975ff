"""Shared-prefix groups for cascade attention: which requests of a batch read the same KV.

SGLang's radix cache gives every request that reuses a cached prefix the very same KV slots for it,
so requests whose committed KV starts with the same run of slot ids share that run. Attention then
splits into levels merged by log-sum-exp: the group's shared prefix (all query rows of the group
against one copy of its KV: read once per step instead of once per request), each request's own
remaining prefix, and its new tokens (draft tree or prefill chunk) under their mask.

Engine independent: slot-id tensors (or radix-cache paths) in, groups out. Planned once per step on
the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Hashable, Sequence, Union

import torch


@dataclass(frozen=True)
class MinShared:
    """Shortest shared run worth a cascade level, by the size of the group that shares it: the
    level costs a fixed amount per request and saves KV reads in proportion to the group, so
    larger groups pay off from shorter runs. `steps`: (group size, slots) with sizes ascending;
    a group of at least `size` requests needs `slots` (the last step it reaches)."""

    steps: tuple[tuple[int, int], ...]

    @classmethod
    def fixed(cls, slots: int) -> "MinShared":
        return cls(((2, int(slots)),))

    def for_group(self, size: int) -> int:
        need = self.steps[0][1]
        for n, slots in self.steps:
            if size >= n:
                need = slots
        return need

    @property
    def floor(self) -> int:
        """The shortest run any group size accepts (<= 0: no grouping at all)."""
        return min(slots for _, slots in self.steps)


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


def shared_prefix_groups(prefixes: Sequence[torch.Tensor],
                         min_shared: Union[int, MinShared]) -> list[SharedGroup]:
    """Disjoint groups of requests whose slot ids start with the same run of at least
    min_shared slots (a MinShared: what the group's size needs; an int: the same for every size).
    The slot ids must be readable on the host (the CPU backend's); shared_path_groups groups by
    radix-cache paths instead, without reading slot ids."""
    return _groups([p.numel() for p in prefixes],
                   lambda i: int(prefixes[i][0]),
                   lambda i, j: common_prefix_len(prefixes[i], prefixes[j]), min_shared)


RadixPath = Sequence[tuple[Hashable, int]]  # root-first (node, KV slots from the root to its end)


def path_common_len(a: RadixPath, b: RadixPath) -> int:
    """KV slots two requests share: the length up to their deepest common radix-cache node."""
    n = 0
    for (node_a, end_a), (node_b, _) in zip(a, b):
        if node_a != node_b:
            break
        n = end_a
    return n


def shared_path_groups(paths: Sequence[RadixPath],
                       min_shared: Union[int, MinShared]) -> list[SharedGroup]:
    """shared_prefix_groups for requests given by the radix-cache paths that hold their cached
    prefixes: the same groups, computed on the host from the tree alone (a GPU plan reads no slot
    id back from the device). A request shares exactly the slots of their common path."""
    return _groups([p[-1][1] if p else 0 for p in paths], lambda i: paths[i][0][0],
                   lambda i, j: path_common_len(paths[i], paths[j]), min_shared)


def _groups(lengths: Sequence[int], first: Callable[[int], Hashable],
            common: Callable[[int, int], int],
            min_shared: Union[int, MinShared]) -> list[SharedGroup]:
    """Requests are bucketed by their first slot (node). In a bucket, the first request left is
    the anchor; of the others, those sharing a run with it are ranked by its length, and the anchor
    takes the top k that maximise the KV reads saved, k * (the k-th longest shared length), among
    the k whose group of k + 1 has a run long enough for its size (one short sharer must not
    shrink a long group's shared level); the rest try again with the next anchor. A request
    belongs to at most one group; a threshold <= 0 turns grouping off."""
    need = min_shared if isinstance(min_shared, MinShared) else MinShared.fixed(min_shared)
    floor = need.floor
    if floor <= 0:
        return []
    buckets: dict[Hashable, list[int]] = {}
    for i, n in enumerate(lengths):
        if n >= floor:
            buckets.setdefault(first(i), []).append(i)
    groups = []
    for pool in buckets.values():
        while len(pool) >= 2:
            anchor, others = pool[0], pool[1:]
            shared = [(common(anchor, j), j) for j in others]
            sharers = sorted(((n, j) for n, j in shared if n >= floor), key=lambda t: (-t[0], t[1]))
            sizes = [k for k in range(1, len(sharers) + 1) if sharers[k - 1][0] >= need.for_group(k + 1)]
            if sizes:
                k = max(sizes, key=lambda k: (k * sharers[k - 1][0], -k))
                taken = sharers[:k]
                groups.append(SharedGroup((anchor, *sorted(j for _, j in taken)), taken[-1][0]))
                left = {j for _, j in taken}
                pool = [j for j in others if j not in left]
            else:
                pool = others
    return groups
