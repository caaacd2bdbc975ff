"""The engine-independent controller on a fake batch harness: no server, no model.

The "target model" is deterministic: each request has a true token stream (its prompt followed by
its continuation), and the target's greedy next token after a context that is a prefix of the
stream is the stream's next token (anything else maps to a fixed function of the last token).
The harness plays SGLang's part: it builds the ragged verify batch from the controller's plan,
gives one-hot logits per verify slot, and appends the accepted tokens. Greedy output must then be
exactly the stream, whatever was drafted; the counters must show that the paths under test ran.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
import pytest
import torch

from sgl_longspec.config import LongSpecConfig
from sgl_longspec.step.controller import LongSpecController, RequestView, SamplingParams
from sgl_longspec.verify.layout import VerifyLayout
from sgl_longspec.drafters.draft import Draft
from sgl_longspec.step.router import Load, Router, RouterConfig

VOCAB = 64


def target_next(stream: list[int], context: list[int]) -> int:
    n = len(context)
    if n < len(stream) and list(stream[:n]) == list(context):
        return stream[n]
    return (context[-1] * 7 + 3) % VOCAB


class FakeRequest:
    def __init__(self, rid, prompt, continuation, aborted=False):
        self.rid, self.prompt, self.stream = rid, list(prompt), list(prompt) + list(continuation)
        self.output = [self.stream[len(prompt)]]  # prefill produced the first token
        self.max_new = len(continuation)
        self.aborted = aborted

    @property
    def done(self):
        return len(self.output) >= self.max_new

    def view(self, plain_only=False):
        return RequestView(self.rid, self.prompt, self.output, self.max_new - len(self.output),
                           plain_only, handle=self)


def run_step(ctl: LongSpecController, reqs: list[FakeRequest], plain_only=False, load=None):
    """One decode step as the SGLang adapter runs it (`load`: the server's, as the adapter reads
    it); returns the plan's drafts."""
    plan = ctl.plan_step([r.view(plain_only) for r in reqs], load)
    if not plan.verify:
        for r in reqs:
            r.output.append(target_next(r.stream, r.prompt + r.output))
        ctl.record_step("plain", len(reqs), len(reqs), 100.0, 100.0)
        return plan.drafts
    seq_lens = [len(r.prompt) + len(r.output) - 1 for r in reqs]
    layout = VerifyLayout.build(plan.drafts, seq_lens, [r.output[-1] for r in reqs])
    ids, pos, masks = layout.token_ids, layout.positions, layout.tree_masks
    rows = []
    for r, d in zip(reqs, plan.drafts):
        base = r.prompt + r.output
        paths = [[]]
        for i, p in enumerate(d.parents):
            paths.append((paths[p + 1] if p >= 0 else []) + [int(d.token_ids[i])])
        rows += [target_next(r.stream, base + path) for path in paths]
    assert len(rows) == len(ids) == len(pos)
    logits = torch.full((len(rows), VOCAB), -10.0)
    logits[torch.arange(len(rows)), torch.tensor(rows)] = 10.0
    vr = ctl.verify([r.rid for r in reqs], plan.drafts, logits, SamplingParams(all_greedy=True))
    for r, res in zip(reqs, vr.requests()):
        r.output.extend(res.output_tokens)
        del r.output[r.max_new:]
    ctl.record_step("verify", len(reqs), len(ids), 110.0, 105.0)
    return plan.drafts


def run_to_completion(ctl, reqs, max_steps=500):
    live = list(reqs)
    for _ in range(max_steps):
        live = [r for r in live if not r.done]
        if not live:
            break
        run_step(ctl, live)
    ctl.release_departed([])  # everything left the batch
    return reqs


def repetitive(seed: int, period: int, repeats: int, tail: int):
    rng = np.random.default_rng(seed)
    unit = rng.integers(0, VOCAB, period).tolist()
    prompt = unit * repeats
    return prompt, (unit * (tail // period + 2))[:tail]


def controller(**cfg):
    return LongSpecController(LongSpecConfig(drafter_path="none", **cfg), window=16,
                              finished_ok=lambda req: not req.aborted)


def test_greedy_output_is_the_stream_and_batched_verify_ran():
    ctl = controller()
    reqs = [FakeRequest(f"r{i}", *repetitive(i, 5 + i, 4, 40)) for i in range(4)]
    reqs.append(FakeRequest("chat", list(range(10, 30)), list(range(40, 60))))  # nothing to copy
    run_to_completion(ctl, reqs)
    for r in reqs:
        assert r.output == r.stream[len(r.prompt):], r.rid
    c = ctl.counters
    assert c.accepted > 0 and c.verify_steps > 0
    assert c.batched_verify_steps > 0 and c.max_verify_batch >= 2
    assert not c.fallbacks
    assert c.by_source["suffix"].accepted == c.accepted
    # every request left: the finished outputs joined the global tree, nothing is tracked
    assert ctl.index.num_active_requests == 0 and ctl.stats()["tracked_requests"] == 0
    assert ctl.index.num_cached_responses == len(reqs)
    assert len(ctl.router) == 0


def test_aborted_output_stays_out_of_the_global_tree():
    ctl = controller()
    a = FakeRequest("kept", *repetitive(1, 6, 4, 12))
    b = FakeRequest("aborted", *repetitive(2, 6, 4, 30), aborted=True)
    run_step(ctl, [a, b])
    run_step(ctl, [a, b])
    run_step(ctl, [a])  # b left the batch unfinished
    assert ctl.index.num_active_requests == 1
    assert "aborted" not in [str(r) for _, r in ctl.index.cached_responses()]
    run_to_completion(ctl, [a])
    assert [str(r) for _, r in ctl.index.cached_responses()] == ["kept"]


def test_plain_only_requests_never_draft_but_are_tracked():
    ctl = controller()
    r = FakeRequest("g", *repetitive(3, 4, 5, 20))
    for _ in range(5):
        drafts = run_step(ctl, [r], plain_only=True)
        assert not any(len(d) for d in drafts)
    assert ctl.counters.verify_steps == 0 and ctl.counters.plain_steps == 5
    assert r.output == r.stream[len(r.prompt):len(r.prompt) + len(r.output)]


class BrokenDrafter:
    name = "suffix"

    def __init__(self, real, bad_rid):
        self.real, self.bad_rid, self.index = real, bad_rid, real.index
        self.indexed = real.indexed

    def observe(self, obs):
        self.real.observe(obs)

    def propose(self, requests):
        if any(r.rid == self.bad_rid for r in requests):
            raise RuntimeError("injected drafter failure")
        return self.real.propose(requests)

    def forget(self, rid, keep_output):
        self.real.forget(rid, keep_output)


def test_drafter_failure_turns_only_that_request_plain(caplog):
    ctl = controller()
    ctl.suffix = BrokenDrafter(ctl.suffix, "bad")
    good = FakeRequest("good", *repetitive(4, 5, 4, 30))
    bad = FakeRequest("bad", *repetitive(5, 5, 4, 30))
    with caplog.at_level("WARNING", logger="sgl_longspec"):
        run_to_completion(ctl, [good, bad])
    assert good.output == good.stream[len(good.prompt):]
    assert bad.output == bad.stream[len(bad.prompt):]  # plain decoding, still correct
    c = ctl.counters
    assert c.fallbacks == {"suffix_drafter": 1} and c.fallback_requests["suffix_drafter"] == 1
    assert c.by_source["suffix"].drafts > 0  # the good request kept speculating
    assert "Traceback" in caplog.text and "injected drafter failure" in caplog.text


def test_clear_forgets_requests_a_failure_turned_plain():
    """flush_cache right after a batch in which a drafter failed: nothing of the failed request
    (router record, plain mark) survives, as the load-and-fault suite requires."""
    ctl = controller()
    ctl.suffix = BrokenDrafter(ctl.suffix, "bad")
    good = FakeRequest("good", *repetitive(4, 5, 4, 30))
    bad = FakeRequest("bad", *repetitive(5, 5, 4, 30))
    for _ in range(3):
        run_step(ctl, [good, bad])
    assert ctl.counters.fallbacks == {"suffix_drafter": 1} and len(ctl.router) == 2
    ctl.clear()
    assert len(ctl.router) == 0 and not ctl._plain
    assert ctl.stats()["tracked_requests"] == 0 and ctl.index.num_active_requests == 0


def test_index_failure_is_counted_by_cause():
    ctl = controller()
    r = FakeRequest("x", *repetitive(6, 5, 4, 10))

    def broken_observe(obs):
        raise ValueError("injected index failure")

    ctl.suffix.observe = broken_observe
    run_to_completion(ctl, [r])
    assert r.output == r.stream[len(r.prompt):]
    assert ctl.counters.fallbacks == {"index": 1}  # once: the request then stays plain
    assert ctl.counters.verify_steps == 0


def test_budget_never_exceeds_window_or_remaining_tokens():
    ctl = LongSpecController(LongSpecConfig(drafter_path="none", max_spec_tokens=7), window=8)
    r = FakeRequest("w", *repetitive(7, 3, 10, 9))
    while not r.done:
        remaining = r.max_new - len(r.output)
        drafts = run_step(ctl, [r])
        assert all(len(d) <= min(7, max(remaining - 1, 0)) for d in drafts)
    assert r.output == r.stream[len(r.prompt):]


def test_draft_budget_follows_the_queue_and_the_kv_headroom():
    r = Router(RouterConfig(batch_draft_budget=64))
    assert r.draft_budget(16) == r.draft_budget(16, Load()) == 64
    assert r.draft_budget(16, Load(waiting=16)) == 42  # 64 * 16 / (16 + 0.5 * 16)
    assert r.draft_budget(16, Load(waiting=48)) == 25
    # KV: no queue, no reserve; with a queue 5% of the pool stays free for admissions
    assert r.draft_budget(16, Load(kv_free_tokens=30, kv_total_tokens=10_000)) == 30
    assert r.draft_budget(16, Load(waiting=1, kv_free_tokens=540, kv_total_tokens=10_000)) == 40
    assert r.draft_budget(16, Load(waiting=1, kv_free_tokens=450, kv_total_tokens=10_000)) == 0
    assert Router(RouterConfig(queue_weight=0.0)).draft_budget(16, Load(waiting=1000)) == 64


@settings(max_examples=200, deadline=None)
@given(bs=st.integers(1, 64), waiting=st.integers(0, 500), more=st.integers(1, 100),
       free=st.integers(0, 20_000), extra=st.integers(1, 5000), budget=st.integers(0, 256))
def test_draft_budget_is_monotone_in_the_load(bs, waiting, more, free, extra, budget):
    r = Router(RouterConfig(batch_draft_budget=budget))
    base = r.draft_budget(bs, Load(waiting, free, 20_000))
    assert 0 <= base <= budget
    assert r.draft_budget(bs, Load(waiting + more, free, 20_000)) <= base  # a longer queue: never more
    assert r.draft_budget(bs, Load(waiting, free + extra, 20_000)) >= base  # more free KV: never less


def test_a_saturated_server_drafts_and_verifies_nothing_and_stays_exact():
    ctl = controller()
    reqs = [FakeRequest(f"r{i}", *repetitive(i, 5 + i, 4, 30)) for i in range(4)]
    full = Load(waiting=12, kv_free_tokens=100, kv_total_tokens=10_000)  # below the 5% reserve
    live = list(reqs)
    steps = 0
    while live:
        assert not any(len(d) for d in run_step(ctl, live, load=full))
        steps += 1
        live = [r for r in live if not r.done]
    for r in reqs:
        assert r.output == r.stream[len(r.prompt):], r.rid
    c = ctl.counters
    assert c.saturated_steps == steps and c.verify_steps == 0 and c.drafted == 0
    assert c.last_load == {"waiting": 12, "kv_free_tokens": 100, "step_budget": 0}
    # The load eases: the same kind of traffic speculates again.
    more = [FakeRequest(f"s{i}", *repetitive(10 + i, 5, 4, 30)) for i in range(2)]
    run_to_completion(ctl, more)
    assert ctl.counters.verify_steps > 0 and ctl.counters.saturated_steps == steps


def test_a_queue_shrinks_what_a_step_verifies():
    queued = Load(waiting=24, kv_free_tokens=50_000, kv_total_tokens=100_000)
    totals = {}
    for name, load in (("idle", None), ("queued", queued)):
        ctl = controller()
        reqs = [FakeRequest(f"r{i}", *repetitive(i, 6, 5, 40)) for i in range(4)]
        live, most = list(reqs), 0
        while live:
            most = max(most, sum(len(d) for d in run_step(ctl, live, load=load)))
            live = [r for r in live if not r.done]
        assert all(r.output == r.stream[len(r.prompt):] for r in reqs)
        totals[name] = (most, ctl.counters.verify_steps)
    budget = ctl.router.draft_budget(4, queued)
    assert budget == 64 * 4 // (4 + 12)
    assert totals["queued"][0] <= budget < totals["idle"][0], totals
    assert totals["queued"][1] > 0  # still speculating, within the smaller budget


def test_sampling_verify_accepts_a_certain_draft():
    """At T > 0 with one-hot targets the lossless sampler accepts exactly what greedy accepts."""
    ctl = controller()
    reqs = [FakeRequest("s", *repetitive(8, 5, 4, 20))]
    plan = ctl.plan_step([r.view() for r in reqs])
    assert plan.verify
    d = plan.drafts[0]
    rows = len(d) + 1
    logits = torch.full((rows, VOCAB), -1e4)
    r = reqs[0]
    base = r.prompt + r.output
    paths = [[]]
    for i, p in enumerate(d.parents):
        paths.append((paths[p + 1] if p >= 0 else []) + [int(d.token_ids[i])])
    for j, path in enumerate(paths):
        logits[j, target_next(r.stream, base + path)] = 1e4
    t = torch.ones(1)
    vr = ctl.verify(["s"], plan.drafts, logits, SamplingParams(False, t, torch.full((1,), -1),
                                                               t, torch.zeros(1)))
    assert int(vr.accept_lens[0]) == len(d)


@pytest.mark.parametrize("bs", [1, 3])
def test_verify_layout_positions_follow_tree_depth(bs):
    drafts = [Draft([5, 6, 7], [-1, 0, -1]), Draft.empty(), Draft.chain([1, 2])][:bs]
    layout = VerifyLayout.build(drafts, [10, 20, 30][:bs], [9, 8, 7][:bs])
    ids, pos, masks = layout.token_ids, layout.positions, layout.tree_masks
    assert ids[:4] == [9, 5, 6, 7] and pos[:4] == [10, 11, 12, 11]
    if bs == 3:
        assert ids[4:] == [8, 7, 1, 2] and pos[4:] == [20, 30, 31, 32]
    assert [m.shape[0] for m in masks] == [1 + len(d) for d in drafts]


def test_fault_spec_parsing():
    from sgl_longspec.step.faults import Faults, InjectedFault, parse

    assert parse("verify:0.5, index") == {"verify": 0.5, "index": 1.0}
    with pytest.raises(ValueError, match="unknown fault point"):
        parse("forward:1")
    with pytest.raises(ValueError, match="probability"):
        parse("verify:2")
    f = Faults("verify:1", seed=0)
    with pytest.raises(InjectedFault):
        f.check("verify")
    f.check("index")  # not armed
    assert f.injected == {"verify": 1}


def test_fault_points_draw_from_their_own_streams():
    """Whether a point fires on its k-th visit depends on the seed and k only, not on the visits
    of other points (which vary with batching): the server fault test relies on it."""
    from sgl_longspec.step.faults import Faults
    from test_longspec import FAULT_FIRST_VISIT, FAULT_SEED, FAULT_SPEC

    def first_fire(f, point, other_visits):
        for k in range(1, 1000):
            for _ in range(other_visits):
                f.fires("verify" if point != "verify" else "index")
            if f.fires(point):
                return k
    for point, k in FAULT_FIRST_VISIT.items():
        assert {first_fire(Faults(FAULT_SPEC, seed=FAULT_SEED), point, n) for n in (0, 1, 3)} == {k}
    # Another seed gives another schedule (the seed is used).
    assert any(first_fire(Faults(FAULT_SPEC, seed=FAULT_SEED + 1), p, 0) != k
               for p, k in FAULT_FIRST_VISIT.items())


def test_injected_verify_fault_is_counted():
    from sgl_longspec.step.faults import Faults

    ctl = LongSpecController(LongSpecConfig(drafter_path="none"), window=16,
                             faults=Faults("verify:1", seed=0))
    r = FakeRequest("v", *repetitive(9, 5, 4, 10))
    with pytest.raises(RuntimeError, match="injected"):
        run_step(ctl, [r])


def test_hidden_states_of_requests_that_never_decode_are_released():
    """A request that finishes during prefill never reaches a decode batch (so never departs
    from one): its OWL hidden state must not stay behind."""

    class NoModel:
        embedding_weight = torch.zeros(1)

    ctl = LongSpecController(LongSpecConfig(), window=16, owl_model=NoModel())
    ctl.remember_hidden(["short", "long"], torch.zeros(2, 4))  # prefill of both
    assert ctl.stats()["hidden_states"] == 2
    ctl.plan_step([FakeRequest("long", *repetitive(10, 4, 3, 8)).view()])  # only "long" decodes
    assert ctl.stats()["hidden_states"] == 1 and ctl.owl.has_state("long")


class ForbidGrammar:
    """A grammar that forbids a fixed set of tokens and never terminates; counts its state so
    the test can check that the controller leaves it where it was."""

    def __init__(self, forbidden: set[int]):
        self.forbidden = forbidden
        self.depth = 0

    def accept_token(self, token):
        assert token not in self.forbidden
        self.depth += 1

    def rollback(self, k):
        self.depth -= k

    def is_terminated(self):
        return False

    def allocate_vocab_mask(self, vocab_size, batch_size, device):
        return torch.full((batch_size, (vocab_size + 31) // 32), -1, dtype=torch.int32)

    def fill_vocab_mask(self, mask, idx):
        mask[idx] = -1
        for t in self.forbidden:
            word = int(mask[idx, t >> 5]) & ~(1 << (t & 31))
            mask[idx, t >> 5] = word - (1 << 32) if word >= 1 << 31 else word

    def apply_vocab_mask(self, logits, mask):
        for t in self.forbidden:
            logits[:, t] = float("-inf")


def rules_step(ctl, reqs):
    """run_step with logit rules: the plain path applies each request's rules to its one row
    (SGLang's sampler), the verify path applies the plan's rules to every verify row; the
    scheduler then advances each grammar over the emitted tokens."""
    from sgl_longspec.drafters.draft import Draft as D
    from sgl_longspec.verify.logit_rules import StepRules, grammar_prune

    views = [RequestView(r.rid, r.prompt, r.output, r.max_new - len(r.output), handle=r,
                         rules=r.rules) for r in reqs]
    plan = ctl.plan_step(views)
    drafts = plan.drafts if plan.needs_verify_path else [D.empty()] * len(reqs)
    rules = plan.rules
    if not plan.needs_verify_path and any(r.rules for r in reqs):
        masks = [grammar_prune(D.empty(), r.rules.grammar, VOCAB)[1] if r.rules and r.rules.grammar
                 else None for r in reqs]
        rules = StepRules([r.rules for r in reqs], [r.output for r in reqs], masks)
    rows = []
    for r, d in zip(reqs, drafts):
        base = r.prompt + r.output
        paths = [[]]
        for i, p in enumerate(d.parents):
            paths.append((paths[p + 1] if p >= 0 else []) + [int(d.token_ids[i])])
        rows += [target_next(r.stream, base + path) for path in paths]
    logits = torch.full((len(rows), VOCAB), -10.0)
    logits[torch.arange(len(rows)), torch.tensor(rows)] = 10.0
    if rules is not None:
        rules.apply(logits, drafts)
    vr = ctl.verify([r.rid for r in reqs], drafts, logits, SamplingParams(all_greedy=True))
    for r, res in zip(reqs, vr.requests()):
        new = res.output_tokens[: r.max_new - len(r.output)]
        r.output.extend(new)
        if r.rules is not None and r.rules.grammar is not None:
            for t in new:
                r.rules.grammar.accept_token(t)
    ctl.record_step("verify" if plan.needs_verify_path else "plain", len(reqs), len(rows), 100.0, 100.0)


def test_grammar_and_penalties_follow_plain_decoding_on_every_row():
    """A request whose grammar forbids a token its prompt repeats (its suffix drafts contain it)
    and one with a frequency penalty strong enough to change every repeated token: LONGSPEC's
    output equals a one-token-at-a-time decode with the same rules, drafts were pruned to the
    grammar, drafts were accepted, and each grammar ends where the scheduler left it."""
    from sgl_longspec.verify.logit_rules import LogitRules, Penalties

    def make(rid, seed, rules):
        prompt, cont = repetitive(seed, 6, 5, 30)
        r = FakeRequest(rid, prompt, cont)
        r.output = []  # decode from scratch (the rules apply to the first token too)
        r.rules = rules
        return r

    def plain_reference(r):
        from sgl_longspec.drafters.draft import Draft as D
        from sgl_longspec.verify.logit_rules import StepRules, grammar_prune

        out, g = [], r.rules.grammar if r.rules else None
        while len(out) < r.max_new:
            row = torch.full((1, VOCAB), -10.0)
            row[0, target_next(r.stream, r.prompt + out)] = 10.0
            mask = grammar_prune(D.empty(), g, VOCAB)[1] if g else None
            if r.rules:
                StepRules([r.rules], [out], [mask]).apply(row, [D.empty()])
            out.append(int(row.argmax()))
            if g:
                g.accept_token(out[-1])
        if g:
            g.rollback(len(out))
        return out

    prompt, _ = repetitive(11, 6, 5, 30)
    forbidden = {prompt[2]}
    reqs = [make("grammar", 11, LogitRules(grammar=ForbidGrammar(forbidden))),
            make("penalty", 12, LogitRules(penalties=Penalties(frequency=7.0))),
            make("free", 13, None)]
    want = [plain_reference(r) for r in reqs]
    ctl = controller()
    for r in reqs:  # the first token, as prefill would emit it
        r.output.append(want[reqs.index(r)][0])
        if r.rules and r.rules.grammar:
            r.rules.grammar.accept_token(r.output[-1])
    for _ in range(200):
        live = [r for r in reqs if not r.done]
        if not live:
            break
        rules_step(ctl, live)
    for r, w in zip(reqs, want):
        assert r.output == w, r.rid
    truth = [r.stream[len(r.prompt):] for r in reqs]
    assert want[0] != truth[0] and want[1] != truth[1] and want[2] == truth[2]  # rules matter
    assert reqs[0].rules.grammar.depth == len(reqs[0].output)  # only the emitted tokens
    assert not forbidden & set(reqs[0].output)
    c = ctl.counters
    assert c.grammar_pruned > 0 and c.accepted > 0 and not c.fallbacks


def test_circuit_breaker_stops_a_failing_drafter_and_retries_later():
    """A drafter that fails for every request trips the breaker after 5 failures: it is not
    called during the cooldown, is retried afterwards, and a second trip waits twice as long.
    Outputs stay exact throughout."""
    from sgl_longspec.step.breaker import CircuitBreaker

    ctl = controller()
    calls = []

    class AlwaysFails(BrokenDrafter):
        def propose(self, requests):
            calls.append(ctl.breakers["suffix_drafter"].now)
            raise RuntimeError("injected drafter failure")

    ctl.suffix = AlwaysFails(ctl.suffix, None)
    ctl.breakers["suffix_drafter"] = CircuitBreaker(failures=5, window=50, cooldown=20)
    reqs = [FakeRequest(f"r{i}", *repetitive(20 + i, 5, 4, 120)) for i in range(12)]
    for _ in range(60):
        live = [r for r in reqs if not r.done]
        if not live:
            break
        # each failure turns its request plain: feed fresh requests so drafting keeps being tried
        run_step(ctl, live)
    b = ctl.breakers["suffix_drafter"]
    assert b.trips >= 2, (b.trips, calls)
    first_trip = calls[4]  # the 5th failure
    assert all(not (first_trip < t < first_trip + 20) for t in calls), calls  # silent cooldown
    assert any(t >= first_trip + 20 for t in calls)  # retried after it
    second_trip = calls[9]
    assert all(not (second_trip < t < second_trip + 40) for t in calls)  # doubled cooldown
    for r in reqs:
        assert r.output == r.stream[len(r.prompt):len(r.prompt) + len(r.output)]
    assert ctl.stats()["breaker_trips"]["suffix_drafter"] == b.trips


@pytest.mark.parametrize("corrupt", ["nan", "oov", "over_budget"])
def test_invalid_drafts_are_drafter_failures(corrupt):
    """A drafter that returns garbage (NaN path probabilities, token ids outside the vocabulary,
    more tokens than its budget) is treated as a failing drafter: the request decodes plainly,
    exactly, and the failure is counted."""
    ctl = LongSpecController(LongSpecConfig(drafter_path="none"), window=16, vocab_size=VOCAB,
                             finished_ok=lambda req: not req.aborted)

    class Garbage(BrokenDrafter):
        def propose(self, requests):
            d = self.real.propose(requests)[0]
            if not len(d):
                return [d]
            if corrupt == "nan":
                d.probs[:] = np.nan
            elif corrupt == "oov":
                d.token_ids[-1] = VOCAB + 3
            else:
                d = Draft.chain(list(d.token_ids) * 20)
            return [d]

    ctl.suffix = Garbage(ctl.suffix, None)
    r = FakeRequest("g", *repetitive(30, 5, 4, 30))
    run_to_completion(ctl, [r])
    assert r.output == r.stream[len(r.prompt):]
    assert ctl.counters.fallbacks == {"suffix_drafter": 1} and ctl.counters.accepted == 0


def test_external_corpus_drafts_text_no_prompt_held():
    """A request that copies a document of the corpus (absent from its prompt and from every past
    output) is drafted from the corpus, exactly; the same request without it gets nothing."""
    rng = np.random.default_rng(7)
    doc = rng.integers(0, VOCAB, 120).tolist()
    prompt = rng.integers(0, VOCAB, 30).tolist() + doc[:6]  # the copy starts after the prompt

    def run(with_corpus: bool):
        ctl = controller(cost_aware=False)
        if with_corpus:
            assert ctl.corpus.add("repo", [rng.integers(0, VOCAB, 200).tolist(), doc]) == 320
        r = FakeRequest("copy", prompt, doc[6:100])
        run_to_completion(ctl, [r])
        assert r.output == r.stream[len(r.prompt):]
        assert not ctl.counters.fallbacks
        return ctl

    ctl = run(True)
    corpus = ctl.counters.by_source["corpus"]
    drafted, accepted = corpus.draft_tokens, corpus.accepted
    assert accepted >= 60 and ctl.counters.accepted >= accepted
    assert ctl.stats()["corpus_tokens"] == {"repo": 320}
    plain = run(False)
    assert "corpus" not in plain.counters.by_source and plain.counters.accepted < accepted / 4


def test_controller_drafts_from_the_parts_it_is_given():
    """The suffix index, corpus and router passed in are the ones the step uses: a corpus that
    holds the request's continuation drafts it, and the given router's refusals are counted."""
    from sgl_longspec.drafters.corpus import SuffixCorpus
    from sgl_longspec.step.controller import build_corpus, build_router, build_suffix_index

    cfg = LongSpecConfig(drafter_path="none", global_cache_requests=0)
    corpus, router, index = build_corpus(cfg), build_router(cfg), build_suffix_index(cfg)
    assert isinstance(corpus, SuffixCorpus)
    corpus.add("doc", [[50, 51, 52, 53, 54, 55, 56, 57]])
    ctl = LongSpecController(cfg, window=16, index=index, corpus=corpus, router=router)
    assert ctl.corpus is corpus and ctl.router is router and ctl.index is index
    view = RequestView("r", prompt=[7, 8, 50, 51, 52], output=[53], handle="r", remaining=10)
    plan = ctl.plan_step([view])
    assert plan.drafts[0].source == "corpus" and plan.drafts[0].token_ids.tolist()[:3] == [54, 55, 56]


def branchy(seed: int, n_units: int, tail_units: int, endings: int = 2, unit_len: int = 3,
            end_len: int = 2):
    """A stream of one short repeated unit, each occurrence followed by one of `endings` endings
    drawn at random: after the unit the suffix index has seen every ending (a tree covers them,
    a chain guesses one)."""
    rng = np.random.default_rng(seed)
    unit = rng.integers(0, VOCAB, unit_len).tolist()
    ends = [rng.integers(0, VOCAB, end_len).tolist() for _ in range(endings)]
    seq = []
    for _ in range(n_units + tail_units):
        seq += unit + ends[int(rng.integers(endings))]
    cut = n_units * (unit_len + end_len)
    return seq[:cut], seq[cut:]


def shape_run(draft_shape: str, req: tuple, **cfg) -> LongSpecController:
    ctl = controller(draft_shape=draft_shape, **cfg)
    r = FakeRequest("r", *req)
    run_to_completion(ctl, [r])
    assert r.output == r.stream[len(r.prompt):]
    assert not ctl.counters.fallbacks
    return ctl


def tau(ctl) -> float:
    c = ctl.counters
    return (c.accepted + c.verify_steps) / max(c.verify_steps, 1)


def test_draft_shape_per_request_trees_where_siblings_are_right():
    """Where the next tokens branch (matches kept short, --longspec-max-depth 16, so the index
    cannot memorise which ending came when), "auto" drafts trees and their side nodes get
    accepted, and it accepts more per verify step than chains alone. Where the text is copied,
    it drafts chains."""
    req = branchy(0, 60, 30)
    chain, auto = shape_run("chain", req, max_depth=16), shape_run("auto", req, max_depth=16)
    assert set(chain.counters.by_shape) == {"chain"}
    shapes = auto.counters.by_shape
    assert shapes["tree"].drafts > 0 and shapes["tree"].accepted > 0
    assert shapes["tree"].width_sum > shapes["tree"].drafts  # wider than chains
    side = auto.router._global.get("suffix/side")
    assert side is not None and side[1] > 0  # side nodes were accepted
    assert tau(auto) > tau(chain)
    copy = shape_run("auto", repetitive(7, 9, 5, 60))
    assert set(copy.counters.by_shape) == {"chain"}
