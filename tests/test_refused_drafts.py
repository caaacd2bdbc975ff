"""Refused drafts scored against the output that followed (sgl_longspec.step.refused_drafts), the
router's calibration from them, and the controller's wiring on the fake batch harness."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from sgl_longspec.config import LongSpecConfig
from sgl_longspec.drafters.draft import Draft
from sgl_longspec.step.controller import LongSpecController
from sgl_longspec.step.refused_drafts import RefusedDraftChecks, RefusedOutcome
from sgl_longspec.step.router import Router, RouterConfig
from tests.test_controller import FakeRequest, run_step


def main_path(tokens, parents, probs) -> list[int]:
    """Brute force: from the root, the most probable child (the first of equals) until a leaf."""
    path, node = [], -1
    while True:
        children = [i for i, p in enumerate(parents) if p == node]
        if not children:
            return path
        best = children[0]
        for c in children[1:]:
            if probs[c] > probs[best]:
                best = c
        path.append(best)
        node = best


@st.composite
def draft_and_output(draw):
    n = draw(st.integers(1, 9))
    parents = [draw(st.integers(-1, i - 1)) for i in range(n)]
    tokens = draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))  # few tokens: many matches
    probs = draw(st.lists(st.sampled_from([0.1, 0.3, 0.5, 0.9]), min_size=n, max_size=n))
    path = main_path(tokens, parents, probs)
    copied = draw(st.integers(0, len(path)))  # the output repeats this much of the main path ...
    tail = draw(st.lists(st.integers(0, 3), max_size=4))  # ... then anything
    before = draw(st.lists(st.integers(0, 3), max_size=5))  # the output when it was drafted
    return Draft(tokens, parents, probs), path, before, [tokens[i] for i in path[:copied]] + tail


@settings(max_examples=300, deadline=None)
@given(draft_and_output())
def test_settles_as_soon_as_the_output_decides_the_main_path(case):
    """Fed the output one token at a time, a held draft stays undecided until a token differs from
    its main path or the whole path was repeated; then its outcome is the main path's length, its
    summed probabilities and its longest prefix the output repeats, and nothing stays held."""
    draft, path, before, after = case
    checks = RefusedDraftChecks()
    assert checks.hold("r", draft, len(before))
    want = [int(draft.token_ids[i]) for i in path]
    lcp = 0
    while lcp < min(len(want), len(after)) and want[lcp] == after[lcp]:
        lcp += 1
    decided_at = lcp + 1 if lcp < len(want) else len(want)  # output tokens needed to decide
    for k in range(len(after) + 1):
        got = checks.settle("r", before + after[:k])
        if k < decided_at:
            assert got is None and len(checks) == 1
        else:
            expected = float(np.sum(draft.probs[path], dtype=np.float64))
            assert got == RefusedOutcome("none", len(want), got.expected, lcp)
            assert abs(got.expected - expected) < 1e-9
            assert len(checks) == 0 and checks.settle("r", before + after) is None
            break
    else:
        assert decided_at > len(after)


def test_one_draft_held_per_request_until_settled_or_forgotten():
    checks = RefusedDraftChecks()
    a = Draft.chain([5, 6], probs=[0.5, 0.4], source="suffix")
    assert not checks.hold("r", Draft.empty(), 3)
    assert checks.hold("r", a, 3) and not checks.hold("r", Draft.chain([7], source="owl"), 4)
    assert checks.settle("x", [1, 2, 3, 5]) is None  # nothing held for it
    checks.forget("r")
    assert len(checks) == 0 and checks.settle("r", [1, 2, 3, 5, 6]) is None
    assert checks.hold("r", a, 3)
    assert checks.settle("r", [1, 2, 3, 5, 6]) == RefusedOutcome("suffix", 2, checks_sum(a), 2)


def checks_sum(d: Draft) -> float:
    return float(d.probs.astype(np.float64).sum())


def test_router_calibration_learns_from_refused_drafts():
    """Two requests whose drafts failed get their next drafts refused at a batch of 16 (a draft
    token needs p >= 0.44). The refused drafts of one would have been accepted, the other's not:
    scored against their outputs, the first request's drafts are verified again, the second's stay
    refused. Without them both stay refused (the calibration only drifts back to its prior)."""
    def router():
        r = Router(RouterConfig(min_score=0.0, backoff_steps=0))
        for _ in range(20):  # a = 20 ms, b = 1 ms per token: at bs 16, p >= 16/36
            r.observe_step(16, 16, 36.0, verify=False)
            r.observe_step(16, 40, 20 + 40 + 2, verify=True)
        for rid in ("right", "wrong"):
            for _ in range(3):
                r.observe(rid, drafted=3, accepted=0, expected=1.5)
        return r

    d = Draft.chain([1, 2, 3], probs=[0.6, 0.5, 0.4], source="suffix")
    ids = ["right", "wrong"] + [f"p{i}" for i in range(14)]
    batch = [d, d] + [Draft.empty()] * 14
    for learn in (True, False):
        r = router()
        before = r.calibration("right"), r.calibration("wrong")
        for _ in range(6):
            out = r.plan_batch(ids, batch)
            if learn and len(out[0]):
                break
            assert not len(out[0]) and not len(out[1])
            if learn:
                r.observe_refused("right", "suffix", expected=1.5, accepted=3)
                r.observe_refused("wrong", "suffix", expected=1.5, accepted=0)
        if learn:
            assert len(out[0]) >= 2 and not len(out[1]), out
            # (the wrong one's rose a little with the server-wide prior it is shrunk towards)
            assert r.calibration("right") > 10 * before[0] > 0
            assert r.calibration("wrong") < 0.2 * r.calibration("right")
        else:
            assert not len(out[0]) and not len(out[1])
    r.observe_refused("gone", "suffix", expected=1.0, accepted=1)  # released meanwhile: ignored
    assert len(r) == 2 + 14


def test_controller_scores_refused_drafts_against_the_output():
    """Every draft refused (min score 1000): a request that copies its prompt drafted what it then
    wrote, one that writes its prompt backwards drafted the forward text (wrong); the scores say
    so, and the outputs are the plain ones. Off, nothing is scored."""
    prompt = [int(t) for t in np.random.default_rng(0).permutation(np.arange(8, 60))[:40]]
    streams = {"copy": prompt[:30], "backwards": prompt[::-1][:30]}
    for learn in (True, False):
        for rid, continuation in streams.items():
            ctl = LongSpecController(LongSpecConfig(min_score=1000.0, learn_from_refused=learn), 16)
            req = FakeRequest(rid, prompt, continuation)
            while not req.done:
                assert not any(len(d) for d in run_step(ctl, [req]))
            assert req.output == continuation
            assert ctl.router.refusals["unprofitable"] > 0 and ctl.counters.verify_steps == 0
            scored = ctl.counters.refused_scored
            if not learn:
                assert scored == {}
                continue
            drafts, tokens, expected, accepted = scored["suffix"]
            assert drafts >= 3 and 0 < expected <= tokens, scored
            if rid == "copy":
                assert accepted >= 0.8 * tokens, scored
            else:
                assert accepted <= 0.2 * tokens, scored
