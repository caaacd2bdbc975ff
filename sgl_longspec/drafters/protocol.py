"""The drafter protocol: what the decode step asks of every source of drafts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Protocol, Sequence

from sgl_longspec.drafters.draft import Draft


@dataclass
class DraftRequest:
    rid: Hashable
    root: int  # last committed token
    budget: int  # most draft tokens
    # the request's last tokens (root included), for drafters that match on the context rather
    # than keep per-request state (the external corpus); empty where no drafter asked for them
    context: Sequence[int] = ()


class Drafter(Protocol):
    """A source of drafts. `propose` gets the requests of one step that want its drafts and
    returns one Draft each (empty for none); `forget` releases a request's state."""

    name: str

    def propose(self, requests: Sequence[DraftRequest]) -> list[Draft]: ...

    def forget(self, rid: Hashable, keep_output: bool) -> None: ...
