"""Live outputs in the global suffix tree (issue #30, item 2): the outputs of active requests are in
the global tree while they are generated, several growing at once, with evictions of finished
outputs and roll-backs of aborted ones in between; checked against the brute-force reference
(tests/suffix_reference.py) after every operation.

The core's counters show that the two paths particular to concurrent sequences ran: an open leaf of
one live output adopted as a pending suffix when another output caught up with it (`adopted`), and a
pending suffix turned back into an open leaf when the other occurrences were removed (`reopened`).
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent))
from suffix_reference import ReferenceIndex  # noqa: E402
from test_suffix_index import SETTINGS, assert_same_draft, random_params, tokens_strategy  # noqa: E402

from sgl_longspec.drafters.suffix_index import SuffixIndex  # noqa: E402


class Mirror:
    """A SuffixIndex and the reference driven by the same calls, compared after each one."""

    def __init__(self, D: int, max_cached: int = 1000, live: bool = True, **kw):
        self.idx = SuffixIndex(max_depth=D, max_cached_responses=max_cached, live_outputs=live,
                               **kw)
        self.ref = ReferenceIndex(D, live_outputs=live)
        self.D = D

    def start(self, rid, prompt):
        self.idx.start_request(rid, prompt)
        self.ref.start(rid, prompt)

    def extend(self, rid, toks):
        self.idx.extend(rid, toks)
        self.ref.extend(rid, toks)

    def finish(self, rid, keep: bool):
        before = set(self.idx._cached)
        self.idx.finish_request(rid, keep_in_global=keep)
        output = self.ref.finish(rid)
        new = set(self.idx._cached) - before
        if keep and output:
            self.ref.global_seqs[new.pop()] = output
        self.sync_evictions()

    def add_response(self, toks):
        self.ref.global_seqs[self.idx.add_response(toks)] = list(toks)
        self.sync_evictions()

    def evict_one(self, rng: random.Random):
        if self.idx.num_cached_responses:
            self.idx.evict_response(rng.choice(self.idx.cached_responses())[0])
            self.sync_evictions()

    def sync_evictions(self):
        kept = {s for s, _ in self.idx.cached_responses()}
        self.ref.global_seqs = {s: v for s, v in self.ref.global_seqs.items() if s in kept}

    def check(self, rng: random.Random, alphabet: int):
        self.idx.check_integrity()
        for rid in self.ref.requests:
            self.idx.check_integrity(rid)
            assert_same_draft(self.idx, self.ref, rid, random_params(rng, self.D))
        texts = self.ref.global_view()
        for _ in range(4):
            if texts and rng.random() < 0.8:
                text = rng.choice(texts)
                a = rng.randrange(len(text))
                pat = text[a:a + rng.randint(1, self.D)]
            else:
                pat = [rng.randrange(alphabet) for _ in range(rng.randint(1, self.D))]
            assert self.idx.count(pat, None) == self.ref.count(pat, None), pat

    @property
    def core(self):
        return self.idx._core


def test_other_requests_draft_from_a_live_output():
    """Request b drafts what request a is writing, before a finishes; not without live outputs."""
    out = [50, 51, 52, 53, 54, 55, 56, 57, 58, 59]
    for live in (True, False):
        m = Mirror(16, live=live)
        m.start("a", [1, 2, 3])
        m.extend("a", out)
        m.start("b", [9, 9, 50, 51, 52])
        d = m.idx.speculate("b", max_spec_tokens=8, spec_factor=2.0)
        assert d.token_ids.tolist() == (out[3:9] if live else []), live  # budget 2 x 3
        m.finish("a", keep=True)
        d = m.idx.speculate("b", max_spec_tokens=8, spec_factor=2.0)
        assert d.token_ids.tolist() == out[3:9]  # a's output is shared once a finishes either way


def test_adoption_when_one_live_output_catches_up_with_another():
    m = Mirror(12)
    rng = random.Random(0)
    m.start("a", [7])
    m.start("b", [8])
    m.extend("a", [1, 2, 3])
    m.extend("b", [1, 2, 3])  # b's suffixes 3, 2 3 and 1 2 3 end where a's open leaves end now
    assert m.core.global_adopted() == 3
    m.check(rng, 5)
    for t in (4, 1, 2):  # both go on, the same way, then apart
        m.extend("a", [t])
        m.extend("b", [t])
        m.check(rng, 5)
    m.extend("a", [3, 6])
    m.extend("b", [4, 6])  # b's suffix 6 is repeated only through a's 6
    m.check(rng, 5)
    m.finish("a", keep=False)  # roll-back: b's repeated suffixes are unique again
    assert m.core.global_reopened() > 0
    m.check(rng, 5)
    m.extend("b", [4, 1])
    m.check(rng, 5)
    m.finish("b", keep=True)
    m.check(rng, 5)
    assert m.core.global_tokens() == 10  # b: 1 2 3 4 1 2 4 6 4 1


def test_abort_rolls_the_live_output_back_exactly():
    m = Mirror(10)
    m.add_response([5, 6, 7, 5, 6])
    empty_bytes = m.idx.global_memory_bytes()
    counts = {(5, 6): 2, (6, 7): 1}
    m.start("a", [1])
    m.extend("a", [5, 6, 5, 6, 7])
    assert m.idx.count([5, 6], None) == 4
    m.idx.abort_request("a")
    m.ref.finish("a")
    for pat, c in counts.items():
        assert m.idx.count(list(pat), None) == c
    assert m.idx.global_memory_bytes() == empty_bytes
    m.idx.check_integrity()


def test_live_outputs_stop_at_the_byte_bound_and_catch_up_at_finish():
    probe = SuffixIndex(max_depth=16)
    empty = probe._core.global_bytes()
    bound = empty + 3000  # room for some tens of tokens of live output, not 400
    idx = SuffixIndex(max_depth=16, max_cached_responses=10, max_cache_bytes=bound)
    out = np.random.default_rng(0).integers(0, 50, size=400).tolist()
    idx.start_request("a", [1, 2])
    for i in range(0, 400, 10):
        idx.extend("a", out[i:i + 10])
    grown = idx._core.global_tokens()
    assert 10 <= grown < 400  # it grew, then stopped at the bound
    idx.finish_request("a")  # caught up (all 400), then evicted: over the bound alone
    assert idx.num_evicted == 1 and idx._core.global_tokens() == 0
    idx.check_integrity()


@st.composite
def live_scenarios(draw):
    D = draw(st.integers(1, 10))
    alphabet = draw(st.integers(1, 4))
    reqs = [(draw(tokens_strategy(alphabet, 1, 12)), draw(tokens_strategy(alphabet, 0, 30)),
             draw(st.booleans())) for _ in range(draw(st.integers(2, 5)))]
    warm = draw(st.lists(tokens_strategy(alphabet, 1, 20), max_size=3))
    return D, alphabet, reqs, warm, draw(st.integers(1, 4)), draw(st.integers(0, 2**32 - 1))


@SETTINGS
@given(live_scenarios())
def test_interleaved_live_outputs_match_reference(scenario):
    """Several outputs growing at once in small alphabets (so they catch up with each other), with
    warm outputs, evictions by count and at random, and aborts interleaved."""
    D, alphabet, reqs, warm, max_cached, seed = scenario
    rng = random.Random(seed)
    m = Mirror(D, max_cached=max_cached)
    for w in warm:
        m.add_response(w)
    pending = list(enumerate(reqs))
    active: dict = {}
    while pending or active:
        r = rng.random()
        if pending and (not active or r < 0.35):
            rid, (prompt, out, keep) = pending.pop(0)
            m.start(rid, prompt)
            active[rid] = [list(out), keep]
        elif r < 0.45:
            m.evict_one(rng)
        else:
            rid = rng.choice(list(active))
            rest, keep = active[rid]
            if rest:
                k = rng.randint(1, min(4, len(rest)))
                m.extend(rid, rest[:k])
                del rest[:k]
            else:
                m.finish(rid, keep)
                del active[rid]
        m.check(rng, alphabet)


@pytest.mark.parametrize("bad", [None, 1, "yes"])
def test_live_outputs_flag_is_checked(bad):
    with pytest.raises(ValueError, match="live_outputs"):
        SuffixIndex(max_depth=8, live_outputs=bad)
