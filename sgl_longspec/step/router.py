"""Per-request, per-step choice between a suffix draft, a model (OWL) draft, or no speculation, and
of the draft's shape: a chain, or a tree with siblings.

Why a router: a verify step of n draft tokens costs more than a plain decode step (on this CPU a
few percent of a step per token; on a GPU little until the batch fills the device), so a draft is
worth verifying only when its expected accepted length pays for it. The router therefore keeps

- a cost model of the step itself (StepCostModel: time = a + r * requests + b * tokens + c *
  is_verify, fitted online from the worker's own step timings), which gives the path probability
  below which a draft token costs more than it is expected to save;
- a per-request, per-drafter record (accepted / expected, accepted per draft), shrunk towards the
  drafter's server-wide record, which calibrates the
  drafters' probabilities and decides whether drafting is worth calling at all: a request whose
  drafts do not pay for the verify step and the drafter's own time (chat, for instance) stops
  drafting, and tries again once that evidence has faded;
- the records split a draft's nodes into its main path and its side nodes (Draft.side_mask), so
  each request's record says how often its siblings are right; a drafter that can draft both
  shapes offers both, and the router keeps the one with the higher calibrated net value (expected
  accepted tokens less their verify cost): a request copying a long span gets a chain, one whose
  next tokens are uncertain a tree, whatever its neighbours in the batch get (`better_shape`);
- a backoff for requests whose drafts from a costly drafter keep failing (no calls to it for a
  while, doubling up to a cap): it saves the drafter's time, which pruning cannot (a draft must
  exist to be pruned). A drafter whose calls cost next to nothing (the suffix index, the corpus)
  is not backed off; its failing drafts are pruned by the request's calibration instead, so that
  the first draft worth verifying after a failure is verified. A draft refused as not worth
  verifying counts in the records as a call that brought nothing, which costs a free drafter
  nothing and a costly one its calls (wants_source); once the request's output has decided what
  verification would have accepted of it, it calibrates the drafter like a verified draft
  (observe_refused), so a request whose calibration fell is not locked out of verifying;
- a draft-token budget for the whole batch, filled best value first, which the server's load
  (requests waiting for admission, KV headroom: Load, draft_budget) shrinks down to nothing on a
  saturated server.

A step verifies drafts only when the batch's expected tokens per second beat plain decoding's, so
a request for which speculation does not pay stops paying for it.

Engine-independent: works on sgl_longspec.drafters.draft.Draft objects and request ids.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Hashable, Optional, Sequence

import numpy as np

from sgl_longspec.drafters.draft import Draft
from sgl_longspec.step.cost_model import StepCostModel

# The record of a drafter's side nodes (off a tree's main path) is f"{source}{SIDE}".
SIDE = "/side"
# The record of a drafter's refused drafts, scored against the output that followed
# (sgl_longspec.step.refused_drafts), is f"{source}{REFUSED}": it calibrates the drafter's
# path probabilities beside its verified drafts, and says nothing of what its calls bring.
REFUSED = "/refused"
# A drafter's record, per request and server-wide, decayed sums of: expected accepted tokens
# (the drafter's path probabilities), accepted tokens, drafting calls (verified or refused),
# verified draft tokens, verified drafts.
_EMPTY_RECORD = (0.0, 0.0, 0.0, 0.0, 0.0)


def _calibration_evidence(records: dict, source: str) -> tuple[float, float]:
    """(expected, accepted) tokens in `records` (a request's or the server-wide) for `source`:
    its verified drafts' and its refused drafts' scored against the output."""
    e, h = records.get(source, _EMPTY_RECORD)[:2]
    e_refused, h_refused = records.get(source + REFUSED, _EMPTY_RECORD)[:2]
    return e + e_refused, h + h_refused


@dataclass
class RouterConfig:
    min_score: float = 0.0  # minimum (calibrated) expected accepted tokens for a draft to be verified
    howl_threshold: float = 2.0  # prefer the suffix draft when its score reaches this
    batch_draft_budget: int = 64  # total draft tokens per verify step
    max_draft_tokens: int = 15  # per request
    backoff_steps: int = 8  # cap of the plain-decode pause after rejected drafts
    cost_aware: bool = True  # prune drafts with the step cost model (False: verify every draft)
    calibration_prior: float = 2.0  # pseudo-tokens of "drafts are right" before a request's history
    # Load (see Load): each waiting request counts as this fraction of a running one when the
    # batch budget is shared out, and with requests waiting this fraction of the KV pool stays
    # free for their admission.
    queue_weight: float = 0.5
    kv_reserve: float = 0.05


@dataclass(frozen=True)
class Load:
    """What the server carries besides the running batch, as the engine adapter reads it before
    each decode step. None: unknown (no load limit from it)."""

    waiting: int = 0  # requests queued for admission
    kv_free_tokens: Optional[int] = None  # KV slots free or evictable from the prefix cache
    kv_total_tokens: Optional[int] = None  # the KV pool's size


@dataclass
class _ReqState:
    skip: dict = field(default_factory=dict)  # source -> steps left without drafts from it
    penalty: dict = field(default_factory=dict)  # source -> current backoff length
    drafted: int = 0
    accepted: int = 0
    steps: int = 0  # verify steps with a draft
    plain_steps: int = 0  # steps without a draft
    # per draft source ("suffix", "corpus", "owl", and "<source>/side"): its record (_EMPTY_RECORD)
    calib: dict = field(default_factory=dict)


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
    cost: StepCostModel = field(default_factory=StepCostModel)
    _reqs: dict = field(default_factory=dict)

    CALIBRATION_DECAY = 0.9  # per verify step of a source: recent drafts count more
    RECOVERY_DECAY = 0.95  # per step without a draft: evidence fades, so drafting is tried again
    GLOBAL_DECAY = 0.98  # per verify observation: the server-wide record of each drafter
    GLOBAL_FADE = 0.998  # per request step without a draft
    # Most a record may raise a drafter's own probabilities: a lucky streak must not let long,
    # unlikely drafts through the cost threshold (the drafters' probabilities are roughly
    # calibrated already; a record mostly lowers them).
    CALIBRATION_CAP = 1.5
    # Weight of the newest drafting-call time in its running average: follows a change of load
    # within ~5 calls without letting one slow call (a GC pause) close a drafter.
    DRAFT_MS_WEIGHT = 0.2
    # A drafter is backed off after failures only when one call costs at least this share of the
    # time a plain step spends per output token: below it, skipping calls saves less than the
    # drafts the pause forgoes (the suffix index answers in microseconds and is not even timed;
    # an OWL call on the CPU costs 5-20% of a step).
    BACKOFF_MIN_CALL_SHARE = 0.01
    PRIOR_ACCEPTED = 2.0  # accepted tokens per draft believed before any record exists
    _draft_ms: dict = field(default_factory=dict)  # source -> EMA of one drafting call (ms)
    # source -> the decayed record (_EMPTY_RECORD's fields) over all requests: the prior of
    # a request's own record (hierarchical), so that on chat traffic a new request starts as
    # skeptical as its predecessors ended, and on copy traffic as confident.
    _global: dict = field(default_factory=dict)
    # drafts not verified, by reason: "unprofitable" (below the break-even probability or
    # --longspec-min-score), "batch_budget", "step_slower_than_plain" (the whole step vetoed)
    refusals: Counter = field(default_factory=Counter)

    def _prior(self, source: str) -> tuple[float, float, float, float]:
        """(calibration, accepted tokens, verified tokens, verified drafts) per drafting call,
        believed for a new request."""
        _, h, n, l, v = self._global.get(source, _EMPTY_RECORD)
        e_all, h_all = _calibration_evidence(self._global, source)
        k0 = min((h_all + 1.0) / (e_all + 1.0), self.CALIBRATION_CAP)
        accepted = (h + self.PRIOR_ACCEPTED) / (n + 1.0)
        length = (l + self.PRIOR_ACCEPTED) / (n + 1.0)
        return k0, accepted, length, (v + 1.0) / (n + 1.0)

    def calibration(self, req_id: Hashable, source: str = "suffix") -> float:
        """Factor on a drafter's path probabilities for this request: accepted / expected over its
        recent verify steps and refused drafts (scored against its output), shrunk towards the
        drafter's server-wide calibration."""
        e, h = _calibration_evidence(self._state(req_id).calib, source)
        m = self.config.calibration_prior
        k0 = self._prior(source)[0]
        return min((h + m * k0) / (e + m), self.CALIBRATION_CAP)

    def observe_step(self, requests: int, tokens: int, ms: float, verify: bool) -> None:
        """Feed the step cost model with one forward step's size (requests, tokens) and wall time."""
        self.cost.observe(requests, tokens, ms, verify)

    def observe_draft_cost(self, source: str, ms: float) -> None:
        """Wall time of one batched drafting call of a model drafter (the suffix index is ~free)."""
        old = self._draft_ms.get(source)
        w = self.DRAFT_MS_WEIGHT
        self._draft_ms[source] = ms if old is None else (1.0 - w) * old + w * ms

    def wants_source(self, req_id: Hashable, source: str, batch_size: int,
                     max_tokens: int) -> bool:
        """Whether drafting from `source` pays for this request now: the tokens its recent calls
        got accepted (decayed mean per call, a refused draft counting as nothing; optimistic
        prior) must exceed what a call costs in output-token time: the verify path's fixed cost
        (for the share of calls whose draft is verified), its tokens, and the drafter's own time.
        So refusals cost a free drafter nothing and a costly one its calls."""
        if not self.wants_draft(req_id, source):
            return False
        if not self.config.cost_aware or self.cost.params is None:
            return True
        b, c = self.cost.draft_token_ms, self.cost.verify_overhead_ms
        token_ms = self.cost.plain_ms_per_token(batch_size)
        calib = self._state(req_id).calib
        _, hits, calls, length, verified = calib.get(source, _EMPTY_RECORD)
        _, side_hits, _, side_length, _ = calib.get(source + SIDE, _EMPTY_RECORD)
        hits, length = hits + side_hits, length + side_length  # per draft, whatever its shape
        m = self.config.calibration_prior
        _, prior_accepted, prior_len, prior_verified = self._prior(source)
        accepted = (hits + m * prior_accepted) / (calls + m)
        # The record (pruned drafts, as verified), not max_tokens, says what a draft costs.
        typical_len = min(max_tokens, (length + m * prior_len) / (calls + m))
        verified_share = min(1.0, (verified + m * prior_verified) / (calls + m))
        # A verify step's fixed cost is shared by the batch's drafts.
        cost_ms = (c / batch_size * verified_share + b * typical_len
                   + self._draft_ms.get(source, 0.0) / batch_size)
        return accepted * token_ms > cost_ms

    def _state(self, req_id: Hashable) -> _ReqState:
        st = self._reqs.get(req_id)
        if st is None:
            st = self._reqs[req_id] = _ReqState()
        return st

    def wants_draft(self, req_id: Hashable, source: Optional[str] = None) -> bool:
        """False while the request is backed off for `source` (None: for every drafter), after
        drafts from it were rejected outright."""
        skip = self._state(req_id).skip
        if source is not None:
            return skip.get(source, 0) <= 0
        return any(skip.get(src, 0) <= 0 for src in {"suffix", "owl", *skip})

    def suffix_suffices(self, suffix: Optional[Draft]) -> bool:
        """HOWL rule, first half: a suffix draft scoring at least `howl_threshold` is taken as it
        is, and the model drafter is not asked for that request."""
        return suffix is not None and len(suffix) > 0 and suffix.score >= self.config.howl_threshold

    def pick(self, suffix: Optional[Draft], model: Optional[Draft] = None,
             req_id: Optional[Hashable] = None) -> Draft:
        """HOWL rule: the suffix chain when its score is high, else the model tree, else the better
        (scores calibrated by the request's record of each drafter when req_id is given)."""
        if self.suffix_suffices(suffix):
            return suffix
        candidates = [d for d in (model, suffix) if d is not None and len(d)]
        if not candidates:
            return Draft.empty()
        if req_id is None:
            return max(candidates, key=lambda d: d.score)
        return max(candidates, key=lambda d: d.score * self.calibration(req_id, d.source))

    def better(self, a: Draft, b: Draft, req_id: Hashable) -> Draft:
        """The draft with the larger calibrated score (ties: a); empty drafts lose."""
        if not len(b):
            return a
        if not len(a):
            return b
        return b if (b.score * self.calibration(req_id, b.source)
                     > a.score * self.calibration(req_id, a.source)) else a

    def node_calibration(self, req_id: Hashable, d: Draft) -> np.ndarray:
        """Factor per node of `d` on its path probability: the request's record of the drafter's
        main-path nodes, or of its side nodes."""
        k_main = self.calibration(req_id, d.source)
        if d.shape == "chain":
            return np.full(len(d), k_main, dtype=np.float32)
        k_side = self.calibration(req_id, d.source + SIDE)
        return np.where(d.side_mask(), k_side, k_main).astype(np.float32)

    def better_shape(self, req_id: Hashable, candidates: Sequence[Draft], batch_size: int) -> Draft:
        """Of one drafter's drafts for one request in different shapes, the one with the highest
        calibrated net value: the calibrated path probabilities of the nodes that pay for their
        verify cost, less that cost (break-even probability; 0 without the cost model, so the
        larger expected accepted length wins). Ties go to the earlier candidate (the chain)."""
        theta = self.cost.token_threshold(batch_size) if self.config.cost_aware else 0.0
        best, best_value = Draft.empty(), 0.0
        for d in candidates:
            if not len(d):
                continue
            q = d.probs * self.node_calibration(req_id, d)
            _, idx = d.kept(q >= theta)
            value = float((q[idx] - theta).sum())
            if not len(best) or value > best_value:
                best, best_value = d, value
        return best

    def draft_budget(self, batch_size: int, load: Optional[Load] = None) -> int:
        """Draft tokens this step may verify in all, given the load.

        Requests waiting mean the server is at its concurrency limit: what counts then is the
        throughput of everyone, queued requests included, so the budget is shared out as if each
        waiting request were `queue_weight` of a running one (16 running, 48 waiting: 40% of it).
        The KV pool bounds it too: accepted tokens grow the cache faster than plain decoding, and
        with the pool nearly full and requests waiting that growth forces SGLang to retract
        running requests (which redo their prefill later), so `kv_reserve` of the pool stays free
        for admissions. 0 = saturated: verify nothing (and draft nothing)."""
        cfg = self.config
        budget = cfg.batch_draft_budget
        if load is None or batch_size <= 0:
            return budget
        waiting = max(0, int(load.waiting))
        if waiting:
            budget = int(budget * batch_size / (batch_size + cfg.queue_weight * waiting))
        if load.kv_free_tokens is not None:
            reserve = int(cfg.kv_reserve * (load.kv_total_tokens or 0)) if waiting else 0
            budget = min(budget, max(0, int(load.kv_free_tokens) - reserve))
        return max(0, budget)

    def plan_batch(self, req_ids: Sequence[Hashable], drafts: Sequence[Draft],
                   budget: Optional[int] = None) -> list[Draft]:
        """Choose what to verify this step: prune each draft to the tokens that pay for their cost,
        fill the batch budget (`budget`, default the configured one; see draft_budget) best value
        per token first, and verify nothing at all when the step as a whole would be slower than
        plain decoding."""
        cfg = self.config
        bs = len(drafts)
        theta = self.cost.token_threshold(bs) if cfg.cost_aware else 0.0
        out = [Draft.empty()] * bs
        values = [0.0] * bs
        calibrated = [None] * bs  # per kept node: its calibrated path probability
        refused = [False] * bs  # a draft that did not pay for itself (not one the budget cut)
        for i, (rid, d) in enumerate(zip(req_ids, drafts)):
            if not len(d):
                continue
            q = d.probs * self.node_calibration(rid, d)
            if theta > 0.0:
                d, idx = d.kept(q >= theta)
                q = q[idx]
            d = d.truncated(cfg.max_draft_tokens)
            q = q[:len(d)]
            expected = float(q.sum())
            if len(d) and expected >= cfg.min_score:
                out[i], values[i], calibrated[i] = d, expected, q
            else:
                refused[i] = True
                self.refusals["unprofitable"] += 1
        order = sorted((i for i in range(bs) if len(out[i])), key=lambda i: -values[i] / len(out[i]))
        budget = cfg.batch_draft_budget if budget is None else budget
        for i in order:
            d = out[i]
            if budget <= 0:
                out[i] = Draft.empty()
                continue
            if len(d) > budget:
                d = out[i] = d.truncated(budget)
                values[i] = float(calibrated[i][:len(d)].sum())
            budget -= len(d)
        if budget <= 0:
            self.refusals["batch_budget"] += sum(1 for i in order if not len(out[i]))
        if cfg.cost_aware:
            gain = sum(v for v, d in zip(values, out) if len(d))
            tokens = sum(len(d) for d in out)
            if tokens and self.cost.speedup(bs, gain, tokens) <= 1.0:
                self.refusals["step_slower_than_plain"] += sum(1 for d in out if len(d))
                refused = [r or bool(len(d)) for r, d in zip(refused, out)]
                out = [Draft.empty()] * bs
        for i, (rid, d) in enumerate(zip(req_ids, out)):
            st = self._state(rid)
            for src in st.skip:  # backoffs count decode steps, whichever drafter ran meanwhile
                st.skip[src] -= 1
            if refused[i]:
                # Drafting that is never verified only costs drafter time: it counts as a call
                # that brought nothing, and backs a costly drafter off as a rejection does, so
                # that traffic speculation cannot help pays (almost) nothing.
                self._count_unverified_call(st, drafts[i].source)
                self._back_off(st, drafts[i].source, bs)
            if len(d) == 0:
                st.plain_steps += 1
                for c in st.calib.values():
                    for j in range(len(c)):
                        c[j] *= self.RECOVERY_DECAY
                for g in self._global.values():  # so the server-wide record cannot lock drafting out
                    for j in range(len(g)):
                        g[j] *= self.GLOBAL_FADE
        return out

    def observe(self, req_id: Hashable, drafted: int, accepted: int,
                expected: Optional[float] = None, source: str = "suffix",
                side: Optional[tuple[int, int, float]] = None, batch_size: int = 1) -> None:
        """Record a verify outcome (expected = the drafter's uncalibrated expected accepted length of
        the verified draft, the sum of its path probabilities); a draft with nothing accepted
        doubles the backoff (of a costly drafter, in a step of `batch_size` requests). `side` =
        (side nodes drafted, of them accepted, their expected) for a tree: they go to the side
        record, the rest to the main path's."""
        if drafted <= 0:
            return
        st = self._state(req_id)
        st.steps += 1
        st.drafted += drafted
        st.accepted += accepted
        if expected is not None:
            records = [(source, (expected, accepted, 1.0, drafted, 1.0))]
            if side is not None and side[0] > 0:
                n_side, hits_side, expected_side = side
                records = [(source, (expected - expected_side, accepted - hits_side, 1.0,
                                     drafted - n_side, 1.0)),
                           (source + SIDE, (expected_side, hits_side, 1.0, n_side, 1.0))]
            for key, values in records:
                self._add_to_records(st, key, values)
        if accepted == 0:
            self._back_off(st, source, batch_size)
        else:
            st.penalty[source] = 0
            st.skip[source] = 0

    def observe_refused(self, req_id: Hashable, source: str, expected: float, accepted: int) -> None:
        """A refused draft scored against the output that followed (RefusedOutcome): its main
        path's expected accepted tokens (the drafter's uncalibrated path probabilities) and the
        tokens verification would have accepted. Evidence for the calibration only: the record of
        what the drafter's calls bring (wants_source) counted the refused call as bringing nothing,
        which it did."""
        if self._reqs.get(req_id) is None:
            return  # released meanwhile
        self._add_to_records(self._state(req_id), source + REFUSED, (expected, accepted, 1.0, 0.0, 0.0))

    def worth_backing_off(self, source: str, batch_size: int) -> bool:
        """Whether pausing `source` for a failing request saves time: its calls (measured, per
        request of the batch) cost BACKOFF_MIN_CALL_SHARE of a plain output token or more. Without
        a cost model (cost-awareness off, or no step measured yet) every drafter is backed off, as
        nothing else stops a failing request's drafts then."""
        token_ms = self.cost.plain_ms_per_token(max(batch_size, 1))
        if not self.config.cost_aware or token_ms is None:
            return True
        call_ms = self._draft_ms.get(source, 0.0) / max(batch_size, 1)
        return call_ms >= self.BACKOFF_MIN_CALL_SHARE * token_ms

    def _count_unverified_call(self, st: _ReqState, source: str) -> None:
        """A drafting call whose draft was refused (not worth verifying) joins the request's and
        the server-wide record as a draft with nothing verified and nothing accepted: the record
        of accepted tokens per call (wants_source) falls, so a drafter whose drafts this batch
        size never lets through stops being called (e.g. OWL at 16 requests on a CPU, where the
        break-even probability is high). The calibration of its path probabilities learns from the
        refused draft later, once the output has decided it (observe_refused)."""
        self._add_to_records(st, source, (0.0, 0.0, 1.0, 0.0, 0.0))

    def _add_to_records(self, st: _ReqState, key: str, values: Sequence[float]) -> None:
        """One call's figures (_EMPTY_RECORD's fields) into the request's and the server-wide
        record of `key`, each decayed first."""
        for record, decay in ((st.calib, self.CALIBRATION_DECAY), (self._global, self.GLOBAL_DECAY)):
            c = record.setdefault(key, list(_EMPTY_RECORD))
            for j, x in enumerate(values):
                c[j] = decay * c[j] + x

    def _back_off(self, st: _ReqState, source: str, batch_size: int = 1) -> None:
        """No drafts from `source` for this request for a while, doubling up to the cap, when its
        calls cost enough to be worth saving (worth_backing_off)."""
        if not self.worth_backing_off(source, batch_size):
            return
        st.penalty[source] = min(max(1, 2 * st.penalty.get(source, 0)), self.config.backoff_steps)
        st.skip[source] = st.penalty[source]

    def stats(self, req_id: Hashable) -> RouterStats:
        st = self._state(req_id)
        return RouterStats(st.drafted, st.accepted, st.steps, st.plain_steps)

    def forget(self, req_id: Hashable) -> None:
        self._reqs.pop(req_id, None)

    def __len__(self) -> int:
        return len(self._reqs)
