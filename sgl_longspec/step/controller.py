"""LONGSPEC's decode-step logic, independent of any engine.

The SGLang adapter (sgl_longspec.adapter.worker) turns each decode batch into `RequestView`s and
asks the controller what to verify; it runs the forward and hands the logits back. Everything in
between lives here and is tested on a fake batch harness (tests/test_controller.py):

- the request lifecycle: every drafter observes what each request holds at the start of each
  step (its tokens, and the target hidden state the last step captured for it); a request that
  left the batch is released (a finished output stays in the global tree, which holds outputs
  while they are generated with live outputs on; an aborted one is dropped or rolled back);
- the drafters, behind one protocol (`Drafter`: name, observe, propose, forget): the suffix index,
  the external corpus and the OWL model drafter;
- the router's step (`plan_step` -> `StepPlan`): which drafter, how many tokens, or no draft;
- verification (greedy or lossless sampling, sgl_longspec.verify.acceptance) and what it teaches the router;
- counters, including fallbacks by cause: a drafter, index or verify failure turns only the
  requests it touched to plain decoding, is counted, and is logged with its traceback the first
  time each cause occurs (later ones in one line); a drafter that keeps failing is switched off
  for a while by its circuit breaker and retried later.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from typing import Callable, Hashable, Optional, Sequence

import numpy as np
import torch

from sgl_longspec.config import LongSpecConfig
from sgl_longspec.drafters.corpus import SuffixCorpus
from sgl_longspec.drafters.corpus_drafter import CorpusDrafter
from sgl_longspec.drafters.draft import Draft
from sgl_longspec.drafters.owl.drafter import OwlDrafter
from sgl_longspec.drafters.protocol import DraftRequest, Drafter, Observation
from sgl_longspec.drafters.suffix_drafter import SuffixDrafter
from sgl_longspec.drafters.suffix_index import SuffixIndex
from sgl_longspec.step.breaker import CircuitBreaker
from sgl_longspec.step.built_parts import build_corpus, build_router, build_suffix_index
from sgl_longspec.step.faults import Faults
from sgl_longspec.step.records import (Counters, RequestView, SamplingParams, ShapeCounts,
                                       SourceCounts, StepPlan)
from sgl_longspec.step.refused_drafts import RefusedDraftChecks
from sgl_longspec.step.router import Load, Router
from sgl_longspec.verify.acceptance import VerifyResult, verify_greedy, verify_sampling
from sgl_longspec.verify.logit_rules import StepRules, grammar_prune

logger = logging.getLogger("sgl_longspec")

# --longspec-draft-shape -> the shapes drafted; with two, the router keeps one per request and step
SHAPES_DRAFTED = {"chain": ("chain",), "tree": ("tree",), "auto": ("chain", "tree")}


class LongSpecController:
    def __init__(self, config: LongSpecConfig, window: int, owl_model=None,
                 finished_ok: Callable[[object], bool] = lambda handle: True,
                 faults: Optional[Faults] = None, vocab_size: int = 1 << 30,
                 index: Optional[SuffixIndex] = None, corpus: Optional[SuffixCorpus] = None,
                 router: Optional[Router] = None):
        """window: verify width per request including the root (SGLang's
        --speculative-num-draft-tokens); finished_ok(handle): whether a request that left the
        batch finished normally (its output then stays in the global tree); vocab_size: the
        target's (grammar masks cover it). The suffix index, the external corpus and the router
        are built from `config` unless given."""
        self.config = config
        self.window = window
        self.vocab_size = vocab_size
        self.finished_ok = finished_ok
        cfg = config
        self.index = index if index is not None else build_suffix_index(cfg)
        self.suffix = SuffixDrafter(self.index)
        # The external corpus (--longspec-corpus, POST /add_external_corpus): consulted beside the
        # request's and the global tree; its drafts are source "corpus" to the router.
        self.corpus = corpus if corpus is not None else build_corpus(cfg)
        self.corpus_drafter = CorpusDrafter(self.corpus)
        # the shapes asked of the suffix index and the corpus (--longspec-draft-shape)
        self.shapes = SHAPES_DRAFTED[cfg.draft_shape]
        self.owl = OwlDrafter(owl_model, cfg.owl_top_k, cfg.owl_max_nodes) if owl_model else None
        self.router = router if router is not None else build_router(cfg)
        # refused drafts held until the output decides what verification would have accepted
        self.refused = RefusedDraftChecks() if cfg.learn_from_refused else None
        self.counters = Counters()
        self.faults = faults or Faults("")
        self.breakers = {name: CircuitBreaker() for name in ("suffix_drafter", "owl_drafter")}
        self._prev: dict[Hashable, object] = {}  # rid -> handle, the previous decode batch
        self._plain: set[Hashable] = set()  # requests turned to plain decoding by a failure
        # rid -> the target hidden state that produced the request's newest token, captured by
        # the last forward (remember_hidden) and handed to the drafters at the next step's observe
        self._captured_hidden: dict[Hashable, torch.Tensor] = {}

    # ---- failures -----------------------------------------------------------------------------
    def fallback(self, cause: str, rids: Sequence[Hashable], what: str) -> None:
        """Call inside an `except` block: count, log, and turn `rids` to plain decoding."""
        breaker = self.breakers.get(cause)
        if breaker is not None and breaker.failed():
            logger.warning("LONGSPEC: %s failed %d times in %d steps; not used for %d steps",
                           cause, breaker.failures, breaker.window, breaker.open_until - breaker.now)
        first = self.counters.fallbacks[cause] == 0
        self.counters.fallbacks[cause] += 1
        self.counters.fallback_requests[cause] += len(rids)
        if first:
            logger.exception("LONGSPEC fallback (%s): %s; plain decoding for %d request(s)",
                             cause, what, len(rids))
        else:
            logger.warning("LONGSPEC fallback (%s, #%d): %s: %r", cause,
                           self.counters.fallbacks[cause], what, sys.exc_info()[1])
        for rid in rids:
            self._plain.add(rid)
            for drafter in self._drafters():
                try:
                    drafter.forget(rid, keep_output=False)
                except Exception:  # counted and logged; the request is plain already
                    self.fallback("release", [], f"forgetting {rid} in {drafter.name}")

    def _drafters(self) -> list[Drafter]:
        return [self.suffix, self.corpus_drafter] + ([self.owl] if self.owl is not None else [])

    # ---- lifecycle ----------------------------------------------------------------------------
    def release(self, rid: Hashable, keep_output: bool) -> None:
        self.router.forget(rid)
        if self.refused is not None:
            self.refused.forget(rid)
        self._plain.discard(rid)
        for drafter in self._drafters():
            try:
                drafter.forget(rid, keep_output=keep_output)
            except Exception:
                self.fallback("release", [], f"releasing request {rid} from {drafter.name}")

    def release_departed(self, views: Sequence[RequestView]) -> None:
        current = {v.rid: v.handle for v in views}
        for rid, handle in self._prev.items():
            if rid not in current:
                self.release(rid, keep_output=self.finished_ok(handle))
        self._prev = current

    def clear(self) -> None:
        """Forget every request (SGLang's flush_cache, which runs only when nothing is in flight).
        The last batch's requests are released as departed first: one that a failure turned
        plain is no longer in the index but still has a router record and a plain mark."""
        self.release_departed([])
        for rid in list(self.suffix.indexed):
            self.release(rid, keep_output=False)
        self._plain.clear()
        self._captured_hidden.clear()

    def remember_hidden(self, rids: Sequence[Hashable], hidden: Optional[torch.Tensor]) -> None:
        """The target hidden states whose logits produced each request's newest token (row b for
        rids[b]); the drafters observe them at the next step. Only kept while a drafter uses them."""
        if self.wants_hidden_states and hidden is not None:
            for b, rid in enumerate(rids):
                self._captured_hidden[rid] = hidden[b]

    @property
    def wants_hidden_states(self) -> bool:
        return self.owl is not None

    # ---- the router's step --------------------------------------------------------------------
    def plan_step(self, views: Sequence[RequestView], load: Optional[Load] = None) -> StepPlan:
        """Release departed requests, index new tokens, draft, and let the router decide (within
        the draft budget the server's load leaves, Router.draft_budget)."""
        t0 = time.perf_counter()
        for breaker in self.breakers.values():
            breaker.step()
        self.release_departed(views)
        bs = len(views)
        eligible = [not v.plain_only and v.rid not in self._plain for v in views]
        self._observe(views, eligible)
        self._settle_refused(views)
        step_budget = self.router.draft_budget(bs, load)
        if load is not None:
            self.counters.last_load = {"waiting": load.waiting, "kv_free_tokens": load.kv_free_tokens,
                                       "step_budget": step_budget}
            self.counters.queued_steps += load.waiting > 0
        if step_budget <= 0 and bs:
            # Nothing can be verified: no drafter time either. Saturated = the load did it (not
            # a configured --longspec-batch-draft-budget of 0).
            self.counters.saturated_steps += self.config.batch_draft_budget > 0
            eligible = [False] * bs
        budgets = [0] * bs
        for i, v in enumerate(views):
            if eligible[i] and self.router.wants_draft(v.rid):
                budgets[i] = min(self.config.max_spec_tokens, self.window - 1, max(v.remaining - 1, 0),
                                 step_budget)
                if v.room is not None and v.room < budgets[i]:
                    # Never draft past what its window holds: fewer tokens, down to none.
                    budgets[i] = max(v.room, 0)
                    self.counters.room_capped += 1
        suffix = self._suffix_drafts(views, budgets)
        model = self._owl_drafts(views, budgets, suffix)
        picked = [self.router.pick(s, m, v.rid) for s, m, v in zip(suffix, model, views)]
        drafts = self.router.plan_batch([v.rid for v in views], picked, budget=step_budget)
        if self.refused is not None:
            for v, p, d in zip(views, picked, drafts):
                if len(p) and not len(d):
                    self.refused.hold(v.rid, p, len(v.output))
        rules = self.step_rules(views, drafts)
        self.counters.draft_ms += 1e3 * (time.perf_counter() - t0)
        return StepPlan(drafts, rules)

    def _observe(self, views: Sequence[RequestView], eligible: list[bool]) -> None:
        """Every drafter observes each eligible request; a failure turns that request plain
        (cause "index": what the request holds could not be indexed). Hidden states captured for
        requests that are not in this batch (finished during prefill, never decoded, so never
        released as departed) or not eligible are dropped here."""
        captured, self._captured_hidden = self._captured_hidden, {}
        for i, v in enumerate(views):
            if not eligible[i]:
                continue
            obs = Observation(v.rid, v.prompt, v.output, captured.get(v.rid))
            try:
                self.faults.check("index")
                for drafter in self._drafters():
                    drafter.observe(obs)
            except Exception:
                self.fallback("index", [v.rid], f"observing request {v.rid}")
                eligible[i] = False

    def _settle_refused(self, views: Sequence[RequestView]) -> None:
        """Score the refused drafts that the requests' outputs now decide, for the router's
        calibration and the counters (per source: drafts, expected tokens, accepted tokens)."""
        if self.refused is None or not len(self.refused):
            return
        for v in views:
            outcome = self.refused.settle(v.rid, v.output)
            if outcome is None:
                continue
            self.router.observe_refused(v.rid, outcome.source, outcome.expected, outcome.accepted)
            row = self.counters.refused_scored.setdefault(outcome.source, [0, 0, 0.0, 0])
            row[0] += 1
            row[1] += outcome.nodes
            row[2] += outcome.expected
            row[3] += outcome.accepted

    def step_rules(self, views, drafts: list[Draft], check_faults: bool = True) -> Optional[StepRules]:
        """Prune each draft to its request's grammar (in place in `drafts`) and collect the
        batch's logit rules with the grammar masks of every verify slot. (Part of plan_step;
        under tensor parallelism the other ranks call it on the drafts rank 0 planned.)"""
        if not any(v.rules is not None and not v.rules.empty for v in views):
            return None
        masks: list[Optional[torch.Tensor]] = [None] * len(views)
        for i, v in enumerate(views):
            g = v.rules.grammar if v.rules is not None else None
            if g is None:
                continue
            try:
                if check_faults:
                    self.faults.check("grammar")
                pruned, masks[i] = grammar_prune(drafts[i], g, self.vocab_size)
            except Exception:
                # The root row still needs its mask: try it without a draft.
                self.fallback("grammar", [v.rid], f"grammar pruning for {v.rid}")
                pruned, masks[i] = grammar_prune(Draft.empty(), g, self.vocab_size)
            self.counters.grammar_pruned += len(drafts[i]) - len(pruned)
            drafts[i] = pruned
        return StepRules([v.rules for v in views], [v.output for v in views], masks)

    def _suffix_drafts(self, views, budgets) -> list[Draft]:
        """Suffix drafts: the request's and the global tree ("suffix") and the external corpus
        ("corpus"), each consulted when the router expects it to pay for this request; the
        better of the two by calibrated score. The corpus has its own record, so that a request
        whose own tree keeps drafting badly can still copy from the corpus, and vice versa."""
        out = [Draft.empty()] * len(views)
        if not self.config.suffix_drafts:
            return out
        breaker = self.breakers["suffix_drafter"]
        has_corpus = len(self.corpus) > 0
        bs = len(views)
        for i, v in enumerate(views):
            if budgets[i] <= 0 or not breaker.closed:
                continue
            own = self.router.wants_source(v.rid, "suffix", bs, budgets[i])
            corpus = has_corpus and self.router.wants_source(v.rid, "corpus", bs, budgets[i])
            if not (own or corpus):
                continue
            try:
                self.faults.check("suffix_drafter")
                d = (self._shaped(self.suffix, DraftRequest(v.rid, v.output[-1], budgets[i]), bs)
                     if own else Draft.empty())
                if corpus:
                    c = self._shaped(self.corpus_drafter, DraftRequest(
                        v.rid, v.output[-1], budgets[i],
                        context=_tail(v, self.corpus_drafter.context_tokens)), bs)
                    d = self.router.better(d, c, v.rid)
                out[i] = self._checked(d, budgets[i])
            except Exception:
                self.fallback("suffix_drafter", [v.rid], f"suffix draft for {v.rid}")
                budgets[i] = 0
        return out

    def _shaped(self, drafter: Drafter, request: DraftRequest, batch_size: int) -> Draft:
        """The drafter's draft for one request in the configured shape; under "auto" a chain and
        a tree, of which the router keeps the one worth more for this request now."""
        drafts = [drafter.propose([dataclasses.replace(request, shape=shape)])[0]
                  for shape in self.shapes]
        if len(drafts) == 1:
            return drafts[0]
        return self.router.better_shape(request.rid, drafts, batch_size)

    def _owl_drafts(self, views, budgets, suffix) -> list[Optional[Draft]]:
        """OWL trees (one batched call) for the requests whose suffix draft does not suffice (the
        router's HOWL rule) and for which the router expects OWL to pay."""
        out: list[Optional[Draft]] = [None] * len(views)
        if self.owl is None or not self.breakers["owl_drafter"].closed:
            return out
        bs = len(views)
        rows = [i for i, v in enumerate(views)
                if budgets[i] > 0 and not self.router.suffix_suffices(suffix[i])
                and self.owl.has_state(v.rid)
                and self.router.wants_source(v.rid, "owl", bs, min(budgets[i], self.owl.max_nodes))]
        if not rows:
            return out
        t0 = time.perf_counter()
        try:
            self.faults.check("owl_drafter")
            trees = self.owl.propose([DraftRequest(views[i].rid, views[i].output[-1], budgets[i])
                                      for i in rows])
            if self.faults.fires("owl_nan"):
                trees[0].probs[:] = np.nan
            trees = [self._checked(t, budgets[i]) for i, t in zip(rows, trees)]
        except Exception:
            self.fallback("owl_drafter", [views[i].rid for i in rows], "OWL draft")
            return out
        self.router.observe_draft_cost("owl", 1e3 * (time.perf_counter() - t0))
        for i, tree in zip(rows, trees):
            out[i] = tree
        return out

    def _checked(self, d: Draft, budget: int) -> Draft:
        """A drafter's output, or ValueError (a drafter failure) if it is not a valid draft: over
        budget, token ids outside the vocabulary, non-finite path probabilities."""
        n = len(d)
        if n > budget:
            raise ValueError(f"{d.source} drafted {n} tokens for a budget of {budget}")
        if n and (int(d.token_ids.min()) < 0 or int(d.token_ids.max()) >= self.vocab_size):
            raise ValueError(f"{d.source} drafted a token id outside [0, {self.vocab_size})")
        if n and not np.isfinite(d.probs).all():
            raise ValueError(f"{d.source} drafted non-finite path probabilities")
        return d

    # ---- verification -------------------------------------------------------------------------
    def verify(self, rids: Sequence[Hashable], drafts: Sequence[Draft], logits: torch.Tensor,
               sampling: SamplingParams) -> VerifyResult:
        """Verify the drafts against the target logits of a ragged verify batch (one row per slot,
        request after request) and teach the router what was accepted. The plan's logit rules
        must have been applied to the logits (`StepPlan.rules.apply`, by the engine adapter: its
        logprobs must see them too, as in plain decoding)."""
        self.faults.check("verify")
        if sampling.all_greedy:
            vr = verify_greedy(list(drafts), logits)
        else:
            vr = verify_sampling(list(drafts), logits, temperature=sampling.temperature,
                                 top_k=sampling.top_k, top_p=sampling.top_p, min_p=sampling.min_p,
                                 uniforms=sampling.uniforms)
        self.record_verified(rids, drafts, vr.accept_lens.tolist(), vr.path_mask.cpu().numpy())
        return vr

    def record_verified(self, rids, drafts, accepted: Sequence[int],
                        paths: Optional[np.ndarray] = None) -> None:
        """Teach the router and count what each request's verified draft got accepted; `paths`
        (bool [bs, N], the accepted nodes: VerifyResult.path_mask) tells a tree's side nodes'
        hits apart from its main path's."""
        c = self.counters
        with_draft = 0
        for b, (rid, d, a) in enumerate(zip(rids, drafts, accepted)):
            if not len(d):
                continue
            with_draft += 1
            side = None
            if d.shape == "tree":
                off_main = d.side_mask()
                hits = int((paths[b, :len(d)] & off_main).sum()) if paths is not None else 0
                side = (int(off_main.sum()), hits, float(d.probs[off_main].sum()))
            self.router.observe(rid, len(d), int(a), expected=float(d.probs.sum()), source=d.source,
                                side=side, batch_size=len(rids))
            c.drafted += len(d)
            c.accepted += int(a)
            c.by_source.setdefault(d.source, SourceCounts()).add(len(d), int(a))
            c.by_shape.setdefault(d.shape, ShapeCounts()).add(len(d), int(a), d.width(),
                                                               int(d.depths().max()))
        if with_draft >= 2:
            c.batched_verify_steps += 1
        c.max_verify_batch = max(c.max_verify_batch, with_draft)

    def record_step(self, kind: str, requests: int, tokens: int, ms: float, forward_ms: float,
                    attention_ms: float = 0.0) -> None:
        """A finished forward step ('plain' or 'verify') of `requests` requests and `tokens`
        tokens: the router's cost model and counters."""
        c = self.counters
        verify = kind == "verify"
        self.router.observe_step(requests, tokens, ms, verify=verify)
        if verify:
            c.verify_steps += 1
            c.verify_ms += ms
            c.verify_forward_ms += forward_ms
            c.verify_tokens += tokens
        else:
            c.plain_steps += 1
            c.plain_ms += ms
        row = c.step_profile.setdefault(f"{kind}:{tokens}", [0, 0.0, 0.0, 0.0])
        row[0] += 1
        row[1] += ms
        row[2] += forward_ms
        row[3] += attention_ms

    # ---- introspection ------------------------------------------------------------------------
    def stats(self) -> dict:
        idx = self.index
        return {
            "active_requests": sorted(str(r) for r in self.suffix.indexed),
            "num_active_requests": idx.num_active_requests,
            "num_cached_responses": idx.num_cached_responses,
            "cached_response_ids": [str(r) for _, r in idx.cached_responses()],
            "index_memory_bytes": idx.memory_bytes(),
            "index_global_bytes": idx.global_memory_bytes(),  # past outputs (bounded, FIFO)
            "corpus_tokens": self.corpus.token_counts(),  # external corpus (bounded, FIFO)
            "corpus_bytes": self.corpus.memory_bytes(),
            "tracked_requests": len(self._prev),
            "router_records": len(self.router),
            "hidden_states": (len(self.owl.hidden) if self.owl is not None else 0)
                             + len(self._captured_hidden),
            "injected_faults": dict(self.faults.injected),
            "cost_model_ms": self.router.cost.params,  # (a, r, b, c) of the router's step model
            "refusals": dict(self.router.refusals),
            "breaker_trips": {k: b.trips for k, b in self.breakers.items()},
            "breakers_open": sorted(k for k, b in self.breakers.items() if not b.closed),
            **self.counters.as_dict(),
        }


def _tail(view: RequestView, n: int) -> list:
    """The request's last n tokens (prompt + output) without copying the whole context."""
    out = view.output
    if len(out) >= n:
        return list(out[len(out) - n:])
    return list(view.prompt[max(len(view.prompt) - (n - len(out)), 0):]) + list(out)
