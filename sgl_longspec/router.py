"""Per-request, per-step choice between a suffix draft, a model (OWL) draft, or no speculation.

Why a router: a verify step of n draft tokens costs more than a plain decode step (on this CPU a
few percent per token; on a GPU little until the batch fills the device), so a draft is worth
verifying only when its expected accepted length pays for it. A request whose drafts keep failing
is backed off (plain decoding for a while, doubling up to a cap) so that it stops paying for
speculation; the batch as a whole gets a draft-token budget, filled best score first, so
speculation shrinks as load grows.

Engine-independent: works on sgl_longspec.draft.Draft objects and request ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable, Optional, Sequence

from sgl_longspec.draft import Draft


@dataclass
class RouterConfig:
    min_score: float = 1.0  # minimum expected accepted tokens for a draft to be verified
    howl_threshold: float = 2.0  # prefer the suffix draft when its score reaches this
    batch_draft_budget: int = 64  # total draft tokens per verify step
    max_draft_tokens: int = 15  # per request
    backoff_steps: int = 8  # cap of the plain-decode pause after rejected drafts


@dataclass
class _ReqState:
    skip: int = 0  # steps left to decode plainly
    penalty: int = 0  # current backoff length
    drafted: int = 0
    accepted: int = 0
    steps: int = 0  # verify steps with a draft
    plain_steps: int = 0  # steps without a draft


@dataclass
class RouterStats:
    drafted: int
    accepted: int
    steps: int
    plain_steps: int

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


@dataclass
class Router:
    config: RouterConfig = field(default_factory=RouterConfig)
    _reqs: dict = field(default_factory=dict)

    def _state(self, req_id: Hashable) -> _ReqState:
        st = self._reqs.get(req_id)
        if st is None:
            st = self._reqs[req_id] = _ReqState()
        return st

    def wants_draft(self, req_id: Hashable) -> bool:
        """False while the request is backed off (no drafting work at all)."""
        return self._state(req_id).skip <= 0

    def pick(self, suffix: Optional[Draft], model: Optional[Draft] = None) -> Draft:
        """HOWL rule: the suffix chain when its score is high, else the model tree, else the better."""
        cfg = self.config
        if suffix is not None and len(suffix) and suffix.score >= cfg.howl_threshold:
            return suffix
        candidates = [d for d in (model, suffix) if d is not None and len(d)]
        if not candidates:
            return Draft.empty()
        return max(candidates, key=lambda d: d.score)

    def plan_batch(self, req_ids: Sequence[Hashable], drafts: Sequence[Draft]) -> list[Draft]:
        """Drop drafts not worth verifying and fit the rest into the batch budget (best first)."""
        cfg = self.config
        out = [Draft.empty()] * len(drafts)
        order = sorted(range(len(drafts)), key=lambda i: -drafts[i].score)
        budget = cfg.batch_draft_budget
        for i in order:
            d = drafts[i]
            if not len(d) or d.score < cfg.min_score or budget <= 0:
                continue
            d = d.truncated(min(cfg.max_draft_tokens, budget))
            budget -= len(d)
            out[i] = d
        for rid, d in zip(req_ids, out):
            st = self._state(rid)
            if len(d) == 0:
                st.plain_steps += 1
                st.skip -= 1
        return out

    def observe(self, req_id: Hashable, drafted: int, accepted: int) -> None:
        """Record a verify outcome; a draft with nothing accepted doubles the backoff."""
        if drafted <= 0:
            return
        st = self._state(req_id)
        st.steps += 1
        st.drafted += drafted
        st.accepted += accepted
        if accepted == 0:
            st.penalty = min(max(1, 2 * st.penalty), self.config.backoff_steps)
            st.skip = st.penalty
        else:
            st.penalty = 0
            st.skip = 0

    def stats(self, req_id: Hashable) -> RouterStats:
        st = self._state(req_id)
        return RouterStats(st.drafted, st.accepted, st.steps, st.plain_steps)

    def forget(self, req_id: Hashable) -> Optional[RouterStats]:
        st = self._reqs.pop(req_id, None)
        return None if st is None else RouterStats(st.drafted, st.accepted, st.steps, st.plain_steps)

    def __len__(self) -> int:
        return len(self._reqs)
