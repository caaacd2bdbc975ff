"""Tests of sgl_longspec.drafters.suffix_index against the brute-force reference in suffix_reference.py.

Hypothesis example counts are small by default (this suite must stay fast on 2 cores); set
SUFFIX_TEST_EXAMPLES=500 for a longer run.
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent))
from suffix_reference import ReferenceIndex, budget_for, count_occurrences  # noqa: E402

from sgl_longspec.drafters.draft import Draft  # noqa: E402
from sgl_longspec.drafters.suffix_index import SuffixIndex, SuffixIndexConfig  # noqa: E402

N_EXAMPLES = int(os.environ.get("SUFFIX_TEST_EXAMPLES", "60"))
SETTINGS = settings(max_examples=N_EXAMPLES, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ------------------------------------------------------------------------------------ helpers
def random_params(rng: random.Random, D: int):
    return dict(
        max_spec_tokens=rng.choice([0, 1, 2, 3, 5, 8, 16, D, 64]),
        spec_factor=rng.choice([0.0, 0.3, 0.5, 1.0, 2.0, 4.0]),
        spec_offset=rng.choice([-1.0, 0.0, 0.5, 1.0, 3.0]),
        min_token_prob=rng.choice([0.0, 0.1, 0.25, 0.5, 1.0]),
        use_tree=rng.random() < 0.5,
        max_tree_nodes=rng.choice([0, 1, 3, 8, 20, 64]),
    )


def assert_same_draft(idx: SuffixIndex, ref: ReferenceIndex, req_id, params, use_global=True):
    got = idx.speculate_raw(req_id, params["max_spec_tokens"], params["spec_factor"],
                            params["spec_offset"], params["min_token_prob"], params["use_tree"],
                            params["max_tree_nodes"], use_global)
    exp = ref.speculate(req_id, params["max_spec_tokens"], params["spec_factor"],
                        params["spec_offset"], params["min_token_prob"], params["use_tree"],
                        params["max_tree_nodes"], use_global)
    tok, par, prob, score, match_len, tree = got
    etok, epar, eprob, escore, ematch, etree = exp
    ctx = f"params={params} seq={ref.requests[req_id][0]}"
    assert tok.tolist() == list(etok), ctx
    assert par.tolist() == list(epar), ctx
    assert np.array_equal(prob, eprob), ctx
    assert score == escore, ctx
    assert (match_len, tree) == (ematch, etree), ctx
    return got


def check_draft_properties(idx: SuffixIndex, req_id, draft: Draft, seqs_by_tree, params):
    """Every drafted path occurs after the matched suffix with the stated count/probability."""
    n = len(draft)
    if n == 0:
        assert draft.score == 0.0
        return
    assert draft.token_ids.dtype == np.int64 and draft.parents.dtype == np.int32
    assert draft.probs.dtype == np.float32
    Draft(draft.token_ids, draft.parents, draft.probs)  # the type's own validation
    D = idx.config.max_depth
    m = draft.match_len
    assert 1 <= m <= D
    ctx = idx.request_tokens(req_id).tolist()
    p = ctx[-m:]
    if params["use_tree"]:
        assert n <= budget_for(m, params["spec_factor"], params["spec_offset"],
                               params["max_tree_nodes"])
        assert draft.depths().max() <= params["max_spec_tokens"]
    else:
        assert draft.is_chain()
        assert n <= budget_for(m, params["spec_factor"], params["spec_offset"],
                               params["max_spec_tokens"])
    assert abs(draft.score - float(draft.probs.astype(np.float64).sum())) < 1e-5
    assert np.all(draft.probs >= np.float32(params["min_token_prob"]) - 1e-7)
    assert np.all(draft.probs <= 1.0)
    # The path probabilities must be count(p + path) / count(p) in one of the trees.
    ok_any = False
    for seqs in seqs_by_tree:
        c0 = count_occurrences(seqs, p)
        if c0 == 0:
            continue
        good = True
        for i in range(n):
            path, j = [], i
            while j >= 0:
                path.append(int(draft.token_ids[j]))
                j = int(draft.parents[j])
            path.reverse()
            if m + len(path) > D:
                good = False
                break
            c = count_occurrences(seqs, p + path)
            if c == 0 or np.float32(c / c0) != draft.probs[i]:
                good = False
                break
        ok_any = ok_any or good
    assert ok_any, "drafted paths do not occur after the matched suffix with the stated probs"


def tokens_strategy(alphabet, min_size, max_size):
    return st.lists(st.integers(0, alphabet - 1), min_size=min_size, max_size=max_size)


# ------------------------------------------------------------------------------------ core
def test_small_example():
    idx = SuffixIndex(max_depth=8)
    idx.start_request("a", [1, 2, 3, 4, 1, 2, 3, 5, 1, 2, 3])
    d = idx.speculate("a", max_spec_tokens=8, spec_factor=1.0, spec_offset=0.0,
                      min_token_prob=0.1, use_tree=False)
    # [1, 2, 3] occurs 3 times (the trailing one included): followed by 4 and 5 once each;
    # the tie goes to the continuation seen first (4); budget = floor(3 * 1.0) = 3 tokens.
    assert d.token_ids.tolist() == [4, 1, 2]
    assert d.parents.tolist() == [-1, 0, 1]
    assert np.allclose(d.probs, [1 / 3] * 3)
    assert d.match_len == 3 and d.source == "suffix"
    t = idx.speculate("a", max_spec_tokens=8, use_tree=True, max_tree_nodes=3, min_token_prob=0.1)
    # best-first, all at 1/3: 4 (seen before 5), then 4's child 1 (the newest parent wins ties)
    assert t.token_ids.tolist() == [4, 1, 2] and t.parents.tolist() == [-1, 0, 1]
    assert idx.count([1, 2, 3], "a") == 3 and idx.count([3, 5], "a") == 1
    idx.extend("a", [4])
    assert idx.speculate("a", spec_factor=4.0).token_ids.tolist()[:3] == [1, 2, 3]
    idx.finish_request("a")
    assert idx.num_cached_responses == 1 and idx.count([4], None) == 1
    idx.check_integrity()


@st.composite
def scenarios(draw):
    D = draw(st.integers(1, 12))
    alphabet = draw(st.integers(1, 5))
    reqs = []
    for _ in range(draw(st.integers(1, 4))):
        prompt = draw(tokens_strategy(alphabet, 1, 50))
        out = draw(tokens_strategy(alphabet, 0, 40))
        reqs.append((prompt, out, draw(st.booleans())))
    seed = draw(st.integers(0, 2**32 - 1))
    return D, reqs, seed


@SETTINGS
@given(scenarios(), st.booleans())
def test_matches_reference(scenario, live):
    """Requests interleaved at random (several outputs grow in the global tree at once when
    live): every draft, count and tree invariant against the brute-force reference."""
    D, reqs, seed = scenario
    rng = random.Random(seed)
    idx = SuffixIndex(max_depth=D, max_cached_responses=1000, live_outputs=live)
    ref = ReferenceIndex(D, live_outputs=live)
    pending = list(enumerate(reqs))
    active: dict = {}
    while pending or active:
        if pending and (not active or rng.random() < 0.3):
            rid, (prompt, out, keep) = pending.pop(0)
            idx.start_request(rid, np.asarray(prompt, dtype=rng.choice([np.int32, np.int64])))
            ref.start(rid, prompt)
            active[rid] = [list(out), keep]
        rid = rng.choice(list(active))
        rest, keep = active[rid]
        params = random_params(rng, D)
        assert_same_draft(idx, ref, rid, params, use_global=rng.random() < 0.8)
        if rest:
            k = rng.randint(1, min(6, len(rest)))
            chunk, active[rid][0] = rest[:k], rest[k:]
            idx.extend(rid, chunk if rng.random() < 0.5 else np.asarray(chunk))
            ref.extend(rid, chunk)
            if live:
                idx.check_integrity()
        else:
            idx.check_integrity(rid)
            seq_before = set(idx._cached)
            idx.finish_request(rid, keep_in_global=keep)
            output = ref.finish(rid)
            new = set(idx._cached) - seq_before
            if keep and output:
                assert len(new) == 1
                ref.global_seqs[new.pop()] = output
            else:
                assert not new
            del active[rid]
            idx.check_integrity()
        for _ in range(2):  # counts of random patterns (taken from the text, or random)
            tree_req = rng.choice([None] + list(active))
            seqs = ref.global_view() if tree_req is None else [ref.requests[tree_req][0]]
            text = rng.choice(seqs) if seqs else []
            if text and rng.random() < 0.8:
                a = rng.randrange(len(text))
                pat = text[a:a + rng.randint(1, D)]
            else:
                pat = [rng.randrange(alphabet_of(reqs)) for _ in range(rng.randint(1, D))]
            assert idx.count(pat, tree_req) == ref.count(pat, tree_req)


def alphabet_of(reqs):
    return 1 + max(max(p + o) for p, o, _ in reqs)


@settings(max_examples=max(10, N_EXAMPLES // 3), deadline=None, derandomize=True)
@given(scenarios(), st.integers(0, 2**32 - 1))
def test_draft_paths_occur_in_text(scenario, seed):
    """Direct check of the issue's property: drafted paths occur after the match, counts agree."""
    D, reqs, _ = scenario
    rng = random.Random(seed)
    idx = SuffixIndex(max_depth=D)
    global_seqs = []
    for rid, (prompt, out, keep) in enumerate(reqs):
        idx.start_request(rid, prompt)
        seq = list(prompt)
        for t in out + [None]:
            params = random_params(rng, D)
            d = idx.speculate(rid, **params)
            # the global tree: finished outputs and this request's live output
            glob = global_seqs + ([seq[len(prompt):]] if len(seq) > len(prompt) else [])
            check_draft_properties(idx, rid, d, [[seq], glob] if glob else [[seq]], params)
            if t is not None:
                idx.extend(rid, [t])
                seq.append(t)
        idx.finish_request(rid, keep_in_global=keep)
        if keep and out:
            global_seqs.append(out)


# ------------------------------------------------------------------------------------ real tokens
def _stdlib_text(names):
    import inspect
    import importlib
    return "\n".join(inspect.getsource(importlib.import_module(n)) for n in names)


@pytest.fixture(scope="module")
def tokenize():
    """The default model's tokenizer (tokenizers library, no transformers import); falls back to
    byte-level tokens when the embedded model is not available."""
    try:
        from tokenizers import Tokenizer

        from sgl_longspec.tools.models import ensure_embedded_model

        tok = Tokenizer.from_file(str(Path(ensure_embedded_model()) / "tokenizer.json"))
        return lambda text: tok.encode(text, add_special_tokens=False).ids
    except Exception:  # pragma: no cover - depends on the machine
        return lambda text: list(text.encode("utf-8"))


@pytest.mark.parametrize("live", [False, True])
@pytest.mark.parametrize("use_tree", [False, True])
def test_real_tokens_match_reference(tokenize, use_tree, live):
    toks = tokenize(_stdlib_text(["textwrap", "string"]))
    other = tokenize(_stdlib_text(["shlex"]))
    assert len(toks) > 3000
    D = 64
    rng = random.Random(7)
    idx = SuffixIndex(max_depth=D, live_outputs=live)
    ref = ReferenceIndex(D, live_outputs=live)
    # An earlier request whose output (shlex source) is in the global tree.
    idx.start_request("old", other[:50])
    idx.extend("old", other[50:1500])
    idx.finish_request("old")
    ref.global_seqs[idx.cached_responses()[0][0]] = other[50:1500]
    prompt, output = toks[:2500], toks[2500:3200]
    idx.start_request("r", np.asarray(prompt, dtype=np.int32))
    ref.start("r", prompt)
    pos = 0
    while pos < len(output):
        params = dict(max_spec_tokens=rng.choice([8, 16, 32, 64]), spec_factor=1.0,
                      spec_offset=rng.choice([0.0, 1.0]), min_token_prob=0.1, use_tree=use_tree,
                      max_tree_nodes=rng.choice([8, 24, 64]))
        assert_same_draft(idx, ref, "r", params)
        k = rng.randint(1, 40)
        idx.extend("r", output[pos:pos + k])
        ref.extend("r", output[pos:pos + k])
        pos += k
    idx.check_integrity("r")
    idx.check_integrity()


def test_real_tokens_repetitive_context(tokenize):
    """Agent-like traffic: the output re-emits a span of the prompt; the draft must follow it."""
    toks = tokenize(_stdlib_text(["textwrap"]))
    prompt = toks[:1500]
    idx = SuffixIndex(max_depth=64)
    idx.start_request(0, prompt)
    idx.extend(0, prompt[700:720])
    d = idx.speculate(0, max_spec_tokens=16, spec_factor=1.0, min_token_prob=0.1)
    assert len(d) == 16 and d.is_chain()
    assert d.token_ids.tolist() == prompt[720:736]
    assert d.match_len >= 20


# ------------------------------------------------------------------------------------ eviction
def _outputs(n, length=30, seed=0):
    rng = np.random.default_rng(seed)
    # each output starts with a unique marker token (1000 + i) so it can be told apart
    return [[1000 + i] + rng.integers(0, 6, size=length).tolist() for i in range(n)]


def test_fifo_eviction_by_count_forgets_exactly():
    outs = _outputs(8)
    idx = SuffixIndex(max_depth=10, max_cached_responses=3, eviction="fifo")
    ref = ReferenceIndex(10)
    kept = []
    for i, out in enumerate(outs):
        idx.start_request(i, [500 + i, 501 + i])
        idx.extend(i, out)
        idx.finish_request(i)
        kept.append(out)
        assert idx.num_cached_responses == min(i + 1, 3)
        assert [r for _, r in idx.cached_responses()] == list(range(max(0, i - 2), i + 1))
        ref.global_seqs = {k: v for k, v in enumerate(kept[-3:])}
        idx.check_integrity()
        for j, o in enumerate(outs[: i + 1]):
            assert idx.count([1000 + j], None) == (1 if j > i - 3 else 0)
        rng = random.Random(i)
        for _ in range(30):
            src = rng.choice(outs)
            a = rng.randrange(len(src))
            pat = src[a:a + rng.randint(1, 10)]
            assert idx.count(pat, None) == ref.count(pat, None)
        # speculation against the reference built from the cached outputs only
        ref.start("q", outs[i][:5])
        idx.start_request("q", outs[i][:5])
        for params in (dict(max_spec_tokens=8, spec_factor=1.0, spec_offset=2.0, min_token_prob=0.1,
                            use_tree=t, max_tree_nodes=10) for t in (False, True)):
            assert_same_draft(idx, ref, "q", params)
        idx.abort_request("q")
        ref.finish("q")
    assert idx.num_evicted == 5


def test_byte_bound_and_memory_freed():
    outs = _outputs(30, length=200, seed=1)
    probe = SuffixIndex(max_depth=16)
    probe.add_response(outs[0])
    one = probe.global_memory_bytes()
    empty = SuffixIndex(max_depth=16).global_memory_bytes()
    bound = empty + 4 * (one - empty)
    idx = SuffixIndex(max_depth=16, max_cached_responses=1000, max_cache_bytes=bound)
    for i, out in enumerate(outs):
        idx.add_response(out, req_id=i)
        assert idx.global_memory_bytes() <= bound
        idx.check_integrity()
    n = idx.num_cached_responses
    assert 2 <= n <= 5 and idx.num_evicted == 30 - n
    cached = [r for _, r in idx.cached_responses()]
    assert cached == list(range(30 - n, 30))
    ref = ReferenceIndex(16)
    ref.global_seqs = {i: outs[i] for i in cached}
    for j in range(30):
        assert idx.count([1000 + j], None) == (1 if j in cached else 0)
    rng = random.Random(3)
    for _ in range(100):
        src = rng.choice(outs)
        a = rng.randrange(len(src))
        pat = src[a:a + rng.randint(1, 16)]
        assert idx.count(pat, None) == ref.count(pat, None)
    before = idx.global_memory_bytes()
    for seq, _ in idx.cached_responses():
        idx.evict_response(seq)
        after = idx.global_memory_bytes()
        assert after < before
        before = after
        idx.check_integrity()
    assert idx.global_memory_bytes() == empty
    assert idx.num_cached_responses == 0


def test_lru_refreshes_the_response_drafted_from():
    outs = _outputs(4, length=20, seed=2)
    for policy, survivor in (("lru", 0), ("fifo", None)):
        idx = SuffixIndex(max_depth=16, max_cached_responses=3, eviction=policy)
        for i in range(3):
            idx.add_response(outs[i], req_id=i)
        idx.start_request("q", [7, 8, outs[0][0], *outs[0][1:4]])
        d = idx.speculate("q", max_spec_tokens=8, spec_factor=2.0)
        assert d.token_ids.tolist() == outs[0][4:12]
        idx.add_response(outs[3], req_id=3)
        cached = [r for _, r in idx.cached_responses()]
        if survivor is None:
            assert cached == [1, 2, 3]
        else:
            assert cached == [2, 0, 3]


@SETTINGS
@given(st.lists(tokens_strategy(4, 1, 40), min_size=1, max_size=8), st.integers(1, 10),
       st.integers(0, 2**32 - 1))
def test_random_evictions_match_reference(outputs, D, seed):
    rng = random.Random(seed)
    idx = SuffixIndex(max_depth=D, max_cached_responses=rng.randint(1, 4))
    ref = ReferenceIndex(D)
    for out in outputs:
        seq = idx.add_response(out)
        ref.global_seqs[seq] = out
        if rng.random() < 0.3 and idx.num_cached_responses > 1:
            victim = rng.choice(idx.cached_responses())[0]
            idx.evict_response(victim)
        live = {s for s, _ in idx.cached_responses()}
        ref.global_seqs = {s: v for s, v in ref.global_seqs.items() if s in live}
        idx.check_integrity()
        for _ in range(10):
            src = rng.choice(outputs)
            a = rng.randrange(len(src))
            pat = src[a:a + rng.randint(1, D)]
            assert idx.count(pat, None) == ref.count(pat, None)
        ctx = rng.choice(outputs)[: rng.randint(1, 10)]
        idx.start_request("q", ctx)
        ref.start("q", ctx)
        assert_same_draft(idx, ref, "q", random_params(rng, D))
        idx.abort_request("q")
        ref.finish("q")


# ------------------------------------------------------------------------------------ bad input
def _snapshot(idx, rid):
    return (idx.request_tokens(rid).tolist(), idx.num_active_requests, idx.num_cached_responses,
            idx.memory_bytes(), idx.speculate_raw(rid, 8, 1.0, 1.0, 0.1, False, 8)[0].tolist())


def test_bad_request_ids():
    idx = SuffixIndex(max_depth=8)
    idx.start_request("a", [1, 2, 1, 2])
    snap = _snapshot(idx, "a")
    with pytest.raises(ValueError, match="already active"):
        idx.start_request("a", [3, 4])
    for fn in (lambda: idx.extend("b", [1]), lambda: idx.speculate("b"),
               lambda: idx.finish_request("b"), lambda: idx.abort_request("b"),
               lambda: idx.request_tokens("b"), lambda: idx.extend(["unhashable"], [1])):
        with pytest.raises(KeyError, match="request id"):
            fn()
    with pytest.raises(ValueError, match="hashable"):
        idx.start_request(["x"], [1])
    with pytest.raises(KeyError):
        idx.evict_response(12345)
    assert _snapshot(idx, "a") == snap
    idx.finish_request("a")
    with pytest.raises(KeyError):
        idx.extend("a", [1])
    idx.start_request("a", [5])  # a finished id can be reused
    idx.check_integrity("a")


BAD_TOKENS = [
    ([], "empty"),
    (np.zeros(0, np.int64), "empty"),
    ([1, -1], "outside"),
    (np.array([3, -5], np.int32), "outside"),
    ([2**31], "outside"),
    (np.array([2**40], np.int64), "outside"),
    (np.array([2**63], np.uint64), "outside"),
    ([1, 1.5], "not an integer"),
    ([1, True], "not an integer"),
    (np.array([1.0, 2.0]), "integers"),
    (np.array([True, False]), "integers"),
    (np.array([[1, 2]]), "1-D"),
    (np.array(["a"]), "integers"),
    ("abc", "numpy array, list or tuple"),
    (None, "numpy array, list or tuple"),
    (5, "numpy array, list or tuple"),
    ([1, "2"], "not an integer"),
]


@pytest.mark.parametrize("bad,msg", BAD_TOKENS)
def test_bad_tokens_leave_state_unchanged(bad, msg):
    idx = SuffixIndex(max_depth=8)
    idx.add_response([1, 2, 3, 1, 2])
    idx.start_request("a", [1, 2, 3, 1, 2])
    snap = _snapshot(idx, "a")
    with pytest.raises(ValueError, match=msg):
        idx.extend("a", bad)
    with pytest.raises(ValueError, match=msg):
        idx.start_request("b", bad)
    with pytest.raises(ValueError, match=msg):
        idx.add_response(bad)
    assert not idx.is_active("b")
    assert _snapshot(idx, "a") == snap
    idx.check_integrity("a")
    idx.check_integrity()


def test_vocab_size_bound_and_dtypes():
    idx = SuffixIndex(max_depth=8, vocab_size=100)
    with pytest.raises(ValueError, match=r"outside \[0, 100\)"):
        idx.start_request("a", [5, 100])
    for dt in (np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64):
        idx.start_request(dt, np.array([1, 2, 99, 1, 2], dtype=dt))
        idx.extend(dt, np.array([99], dtype=dt)[::-1])  # strided view
        assert idx.request_tokens(dt).tolist() == [1, 2, 99, 1, 2, 99]
        assert idx.speculate(dt, spec_factor=2.0).token_ids.tolist() == [1, 2, 99]
    idx.start_request("t", (1, np.int64(2), 3))
    assert idx.request_tokens("t").tolist() == [1, 2, 3]


@pytest.mark.parametrize("kwargs", [
    dict(max_spec_tokens=-1), dict(max_spec_tokens=10**9), dict(max_spec_tokens=2.5),
    dict(max_spec_tokens=True), dict(spec_factor=float("nan")), dict(spec_factor=float("inf")),
    dict(spec_factor=-1.0), dict(spec_factor="1"), dict(spec_offset=float("-inf")),
    dict(spec_offset=1e9), dict(min_token_prob=1.5), dict(min_token_prob=-0.1),
    dict(min_token_prob=float("nan")), dict(use_tree="yes"), dict(max_tree_nodes=-5),
    dict(max_tree_nodes=10**7),
])
def test_absurd_speculate_parameters(kwargs):
    idx = SuffixIndex(max_depth=8)
    idx.start_request("a", [1, 2, 3, 1, 2])
    snap = _snapshot(idx, "a")
    with pytest.raises(ValueError):
        idx.speculate("a", **kwargs)
    assert _snapshot(idx, "a") == snap


@pytest.mark.parametrize("kwargs", [
    dict(max_depth=0), dict(max_depth=10**6), dict(max_depth=2.0), dict(vocab_size=0),
    dict(vocab_size=2**40), dict(max_cached_responses=-1), dict(max_cache_bytes=-1),
    dict(eviction="random"), dict(spec_factor=float("nan")), dict(min_token_prob=2.0),
    dict(max_spec_tokens=-3), dict(use_tree=1),
])
def test_bad_config(kwargs):
    with pytest.raises(ValueError):
        SuffixIndex(SuffixIndexConfig(**kwargs))


def test_stats_and_global_disabled():
    idx = SuffixIndex(max_depth=8, max_cached_responses=0)
    idx.start_request(1, [1, 2, 3])
    idx.start_request(2, [1, 2, 3])
    assert idx.num_active_requests == 2
    m = idx.memory_bytes()
    assert m > 0 and idx.allocated_bytes() >= m
    idx.extend(1, [4, 5])
    idx.finish_request(1)
    idx.abort_request(2)
    assert idx.num_active_requests == 0 and idx.num_cached_responses == 0
    with pytest.raises(ValueError, match="disabled"):
        idx.add_response([1, 2])
    assert idx.speculate if True else None
    e = Draft.empty()
    idx.start_request(3, [9])
    d = idx.speculate(3)
    assert len(d) == 0 and d.score == 0.0 and len(e) == 0


def test_long_prompt_smoke():
    """A 64K-token prompt indexes, drafts and appends (correctness only; speed is benchmarked)."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 5000, size=4096)
    prompt = np.concatenate([base] * 16).astype(np.int32)  # 64K tokens, highly repetitive
    idx = SuffixIndex(max_depth=64)
    idx.start_request("big", prompt)
    d = idx.speculate("big", max_spec_tokens=16, use_tree=True, max_tree_nodes=32)
    assert len(d) > 0
    idx.extend("big", base[100:110])
    d = idx.speculate("big", max_spec_tokens=16, spec_factor=2.0)
    assert d.token_ids.tolist() == base[110:126].tolist()
    assert np.allclose(d.probs, 16 / 17)
    assert idx.request_memory_bytes("big") < 200 * len(prompt)
