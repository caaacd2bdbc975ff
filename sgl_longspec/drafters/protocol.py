"""The drafter protocol: what the decode step asks of every source of drafts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Hashable, Optional, Protocol, Sequence

from sgl_longspec.drafters.draft import Draft


@dataclass
class Observation:
    """What one request of the decode batch holds at the start of a step: every token so far, and
    the target's hidden state that produced its newest token where the step captured one (a
    tensor; None otherwise). Each drafter keeps what it uses."""
    rid: Hashable
    prompt: Sequence[int]
    output: Sequence[int]
    hidden: Optional[Any] = None


@dataclass
class DraftRequest:
    rid: Hashable
    root: int  # last committed token
    budget: int  # most draft tokens
    # the request's last tokens (root included), for drafters that match on the context rather
    # than keep per-request state (the external corpus); empty where no drafter asked for them
    context: Sequence[int] = ()
    # "chain" or "tree": the shape asked for, from drafters that can draft both (the suffix index,
    # the corpus); a drafter with one shape (OWL's trees) ignores it
    shape: str = "chain"


class Drafter(Protocol):
    """A source of drafts, three verbs:
    - `observe`: once per step and request, before any `propose`, what the request now holds
      (tokens accepted since the last step included); a drafter without per-request state ignores it;
    - `propose`: the requests of one step that want its drafts, one Draft each (empty for none);
    - `forget`: the request left (`keep_output`: it finished normally, its output may be kept)."""

    name: str

    def observe(self, obs: Observation) -> None: ...

    def propose(self, requests: Sequence[DraftRequest]) -> list[Draft]: ...

    def forget(self, rid: Hashable, keep_output: bool) -> None: ...
