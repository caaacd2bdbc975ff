"""Tests for sgl_longspec.verify.acceptance: greedy exactness, SGLang sampling semantics, and statistical
losslessness of sampling verification (with biased verifiers that the same test must reject)."""

from __future__ import annotations

import ast
import functools
import importlib.util
import os
import typing

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import stats

from sgl_longspec.verify import acceptance as V
from sgl_longspec.drafters.draft import Draft
from sgl_longspec.verify.acceptance import (
    TOP_K_ALL,
    TreeBatch,
    target_probs,
    verify_greedy,
    verify_sampling,
    verify_sampling_draft_probs,
)

torch.set_num_threads(1)

# ============================================================================================
# SGLang's own CPU computation, loaded without importing sglang (its import takes ~20 s here):
# the function source is taken verbatim from the installed sglang/srt/layers/sampler.py.
# ============================================================================================


def _sglang_file(*parts):
    spec = importlib.util.find_spec("sglang")
    if spec is None or spec.origin is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), *parts)
    return path if os.path.exists(path) else None


def _load_sglang_function(parts, name):
    path = _sglang_file(*parts)
    if path is None:
        pytest.skip("sglang is not installed")
    tree = ast.parse(open(path).read())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    ns = {"torch": torch, **{k: getattr(typing, k) for k in ("Optional", "List", "Tuple")}}
    ns["multinomial_with_seed"] = None  # only used with a sampling seed, which we never pass
    exec(compile(ast.Module(body=[fn], type_ignores=[]), path, "exec"), ns)
    return ns[name]


@functools.lru_cache(maxsize=None)
def _sglang_constants():
    path = _sglang_file("srt", "sampling", "sampling_params.py")
    if path is None:
        pytest.skip("sglang is not installed")
    consts = {}
    for node in ast.parse(open(path).read()).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id in ("TOP_K_ALL", "_SAMPLING_EPS"):
                consts[node.targets[0].id] = eval(compile(ast.Expression(node.value), path, "eval"))
    return dict(consts)


_SGL_FILTER = None


def sglang_probs(logits, temperature, top_k, top_p, min_p):
    """SGLang 0.5.23's distribution, per row: SamplingParams.__post_init__ (temperature < eps ->
    temperature 1, top_k 1; top_k -1 -> TOP_K_ALL), Sampler.forward (logits.div_(temperatures);
    softmax), then top_k_top_p_min_p_sampling_from_probs_torch (pytorch backend), whose filtered
    sorted probabilities we scatter back and normalise (torch.multinomial normalises)."""
    global _SGL_FILTER
    if _SGL_FILTER is None:
        _SGL_FILTER = _load_sglang_function(("srt", "layers", "sampler.py"),
                                            "top_k_top_p_min_p_sampling_from_probs_torch")
    c = _sglang_constants()
    t = torch.as_tensor(temperature, dtype=torch.float32).clone()
    k = torch.as_tensor(top_k, dtype=torch.int32).clone()
    greedy = (t >= 0) & (t < c["_SAMPLING_EPS"])
    t[greedy] = 1.0
    k[greedy] = 1
    k[k == -1] = c["TOP_K_ALL"]
    logits = logits.float().clone()
    logits.div_(t.view(-1, 1))
    probs = torch.softmax(logits, dim=-1)
    top_ps = torch.as_tensor(top_p, dtype=torch.float32)
    min_ps = torch.as_tensor(min_p, dtype=torch.float32)
    # SamplingBatchInfo.from_schedule_batch: batch-wide flags; Sampler.forward's simple case
    if not (bool((k != c["TOP_K_ALL"]).any()) or bool((top_ps != 1.0).any())
            or bool((min_ps > 0).any())):
        return probs
    _, probs_sort, probs_idx, _ = _SGL_FILTER(
        probs, k, top_ps, min_ps, bool((min_ps > 0).any()), None, None, return_filtered_probs=True)
    dense = torch.zeros_like(probs).scatter_(1, probs_idx.long(), probs_sort)
    return dense / dense.sum(dim=1, keepdim=True)


# ============================================================================================
# target_probs
# ============================================================================================


def _grid():
    rows = []
    for t in (0.0, 0.3, 1.0, 1.7):
        for k in (-1, 1, 5, 50, TOP_K_ALL):
            for p in (1.0, 0.95, 0.5):
                for m in (0.0, 0.05, 0.3):
                    rows.append((t, k, p, m))
    return rows


@pytest.mark.parametrize("scale", [0.3, 4.0])  # flat rows force the full-sort fallback of top-p
def test_target_probs_matches_sglang(scale):
    assert _sglang_constants() == {"TOP_K_ALL": TOP_K_ALL, "_SAMPLING_EPS": V.SAMPLING_EPS}
    grid = _grid()
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(len(grid), 3000, generator=g) * scale
    t, k, p, m = (list(c) for c in zip(*grid))
    args = (torch.tensor(t), torch.tensor(k), torch.tensor(p), torch.tensor(m))

    def check(ours, ref):
        assert torch.equal(ours > 0, ref > 0), "support differs from SGLang's"
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(ours.sum(1), torch.ones(len(ours)), rtol=0, atol=1e-5)

    # batch_wide=True: what SGLang computes for this whole (mixed) batch
    check(target_probs(logits, *args, batch_wide=True), sglang_probs(logits, t, k, p, m))
    # default: each row as SGLang computes it in a batch of its own
    ours = target_probs(logits, *args)
    ref = torch.cat([sglang_probs(logits[i:i + 1], t[i:i + 1], k[i:i + 1], p[i:i + 1], m[i:i + 1])
                     for i in range(len(grid))])
    check(ours, ref)
    for i in range(0, len(grid), 23):  # a row alone gives the same answer as inside the batch
        torch.testing.assert_close(target_probs(logits[i:i + 1], t[i], k[i], p[i], m[i]),
                                   ours[i:i + 1], rtol=1e-6, atol=1e-9)


def test_target_probs_per_request_expansion_and_plain_softmax():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(7, 50, generator=g)
    reps = torch.tensor([3, 1, 3])
    out = target_probs(logits, torch.tensor([[0.7], [1.0], [1.3]]), torch.tensor([5, -1, 10]),
                       torch.tensor([1.0, 1.0, 0.8]), torch.tensor([0.0, 0.0, 0.1]), repeats=reps)
    ref = sglang_probs(logits, [0.7] * 3 + [1.0] + [1.3] * 3, [5] * 3 + [-1] + [10] * 3,
                       [1.0] * 4 + [0.8] * 3, [0.0] * 4 + [0.1] * 3)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-8)
    # no filtering at all: exactly the softmax of logits / T
    torch.testing.assert_close(target_probs(logits, 0.5), torch.softmax(logits / 0.5, -1),
                               rtol=0, atol=0)


def test_target_probs_sequential_order():
    """order='sequential': top-k renorm, then top-p on the renormalised probabilities, then min-p
    (FlashInfer's top_k_renorm_probs / top_p_renorm_probs / min_p path)."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 40, generator=g) * 2
    k = torch.tensor([5, 3, -1, 10])
    p = torch.tensor([0.6, 0.9, 0.7, 1.0])
    m = torch.tensor([0.0, 0.0, 0.0, 0.2])
    out = target_probs(logits, 1.0, k, p, m, order="sequential")
    for i in range(4):
        pr = torch.softmax(logits[i], -1).double()
        vals, ids = pr.sort(descending=True)
        kk = 40 if k[i] < 0 else int(k[i])
        vals[kk:] = 0
        vals /= vals.sum()
        excl = vals.cumsum(0) - vals
        vals[excl > p[i]] = 0
        vals[vals < vals[0] * m[i]] = 0
        ref = torch.zeros(40, dtype=torch.float64).scatter(0, ids, vals / vals.sum())
        torch.testing.assert_close(out[i].double(), ref, rtol=1e-5, atol=1e-7)
    # joint differs from sequential when top-k and top-p are both active
    lg = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]]))
    assert (target_probs(lg, 1.0, 2, 0.5) > 0).tolist() == [[True, True, False, False]]
    assert (target_probs(lg, 1.0, 2, 0.5, order="sequential") > 0).tolist() == \
        [[True, False, False, False]]


# ============================================================================================
# Greedy
# ============================================================================================


def brute_force_greedy(draft: Draft, logits: np.ndarray):
    """Every root path whose tokens follow the argmax chain; the deepest (first on ties) wins."""
    am = logits.argmax(-1)
    n = len(draft)
    best, best_path = 0, []
    for leaf in range(n):
        path, j = [], leaf
        while j >= 0:
            path.append(j)
            j = int(draft.parents[j])
        path.reverse()
        ok = all(int(draft.token_ids[c]) == am[0 if int(draft.parents[c]) < 0 else int(draft.parents[c]) + 1]
                 for c in path)
        if ok and len(path) > best:
            best, best_path = len(path), path
    bonus = int(am[best_path[-1] + 1]) if best_path else int(am[0])
    return best_path, [int(draft.token_ids[c]) for c in best_path], bonus


def walk_first_match(draft: Draft, logits: np.ndarray):
    """Plain greedy walk: follow the first child carrying the argmax of the current slot."""
    am = logits.argmax(-1)
    cur, path = -1, []
    while True:
        want = am[cur + 1]
        nxt = [c for c in range(len(draft)) if draft.parents[c] == cur and draft.token_ids[c] == want]
        if not nxt:
            return path, [int(draft.token_ids[c]) for c in path], int(want)
        cur = nxt[0]
        path.append(cur)


@st.composite
def tree_batches(draw):
    bs = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    drafts = []
    for _ in range(bs):
        n = draw(st.integers(0, 14))
        parents = np.array([rng.integers(-1, i) for i in range(n)], dtype=np.int32)
        tokens = rng.integers(0, 4, size=n)
        drafts.append(Draft(tokens, parents))
    vocab = 6
    blocks = []
    for d in drafts:
        lg = rng.normal(size=(len(d) + 1, vocab)).astype(np.float32)
        for s in range(len(d) + 1):  # bias the argmax towards a child's token -> deep matches
            kids = np.flatnonzero(d.parents == s - 1)
            if len(kids) and rng.random() < 0.75:
                lg[s, d.token_ids[rng.choice(kids)]] += 6.0
        blocks.append(lg)
    return drafts, blocks


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree_batches())
def test_greedy_matches_brute_force(batch):
    drafts, blocks = batch
    logits = torch.from_numpy(np.concatenate(blocks))
    res = verify_greedy(drafts, logits)
    reqs = res.requests()
    am = logits.argmax(-1)
    for d, lg, r in zip(drafts, blocks, reqs):
        path, toks, bonus = brute_force_greedy(d, lg)
        assert r.accepted_nodes == path
        assert r.accepted_tokens == toks
        assert r.bonus_token == bonus
        assert r.accepted_slots == [0] + [c + 1 for c in path]
        dup = any(np.sum((d.parents == d.parents[i]) & (d.token_ids == d.token_ids[i])) > 1
                  for i in range(len(d)))
        if not dup:
            assert (r.accepted_nodes, r.accepted_tokens, r.bonus_token) == walk_first_match(d, lg)
        # the emitted tokens are the greedy decode: each is the argmax after the previous one
        assert r.output_tokens[0] == int(lg.argmax(-1)[0])
    # flat tensors agree with the per-request view; output token j = argmax at kept row j
    assert res.accept_lens.tolist() == [r.num_accepted for r in reqs]
    assert res.flat_out_tokens.tolist() == sum((r.output_tokens for r in reqs), [])
    assert torch.equal(res.flat_out_tokens, am[res.flat_kept_rows])
    offs = np.concatenate([[0], np.cumsum([len(d) + 1 for d in drafts])[:-1]])
    assert res.flat_kept_rows.tolist() == sum(
        ([int(o) + s for s in r.accepted_slots] for o, r in zip(offs, reqs)), [])
    # padded [bs, S, V] logits give the same answer
    S = max(len(d) for d in drafts) + 2
    padded = torch.full((len(drafts), S, 6), -5.0)
    for b, lg in enumerate(blocks):
        padded[b, :len(lg)] = torch.from_numpy(lg)
    assert [r.output_tokens for r in verify_greedy(drafts, padded).requests()] == \
        [r.output_tokens for r in reqs]
    # temperature 0 through the sampling entry point is the same greedy verification
    res0 = verify_sampling(drafts, logits, temperature=0.0, generator=torch.Generator().manual_seed(0))
    assert [(r.accepted_nodes, r.bonus_token) for r in res0.requests()] == \
        [(r.accepted_nodes, r.bonus_token) for r in reqs]


def _onehot_logits(targets, vocab=8):
    lg = torch.zeros(len(targets), vocab)
    lg[torch.arange(len(targets)), torch.tensor(targets)] = 5.0
    return lg


def test_greedy_chain_empty_and_duplicates():
    # chain: argmax chain 4, 5, 6, then 1 != draft token 7 at node 3
    chain = Draft.chain([4, 5, 6, 7])
    r = verify_greedy([chain], _onehot_logits([4, 5, 6, 1, 2])).requests()[0]
    assert (r.accepted_nodes, r.output_tokens, r.accepted_slots) == ([0, 1, 2], [4, 5, 6, 1], [0, 1, 2, 3])
    # chain fully accepted: bonus from the last slot
    r = verify_greedy([chain], _onehot_logits([4, 5, 6, 7, 3])).requests()[0]
    assert r.output_tokens == [4, 5, 6, 7, 3] and r.num_accepted == 4
    # empty draft: bonus only
    r = verify_greedy([Draft.empty()], _onehot_logits([3])).requests()[0]
    assert (r.accepted_nodes, r.accepted_slots, r.output_tokens) == ([], [0], [3])
    # duplicate siblings: nodes 0 and 1 both carry 2; only node 1's subtree continues the argmax chain
    dup = Draft(np.array([2, 2, 5, 6, 7]), np.array([-1, -1, 0, 1, 3]))
    lg = _onehot_logits([2, 6, 6, 1, 7, 0])  # slot of node i is i + 1
    r = verify_greedy([dup], lg).requests()[0]
    assert (r.accepted_nodes, r.output_tokens) == ([1, 3, 4], [2, 6, 7, 0])
    # mixed batch with an empty draft in the middle, flat layout
    res = verify_greedy([chain, Draft.empty(), dup],
                        torch.cat([_onehot_logits([4, 5, 0, 0, 0]), _onehot_logits([1]), lg]))
    assert [r.output_tokens for r in res.requests()] == [[4, 5, 0], [1], [2, 6, 7, 0]]
    assert res.accept_lens.tolist() == [2, 0, 3]
    assert res.flat_kept_rows.tolist() == [0, 1, 2, 5, 6, 8, 10, 11]


# ============================================================================================
# Statistical losslessness
# ============================================================================================
#
# A fixed toy "target model" over a 5-token vocabulary: the logits of a context are a row of a
# fixed random table chosen by hashing the context, so the next-token law depends on the whole
# context. For each verifier we simulate M independent generations and record the first TWO
# emitted tokens: round 1 verifies the draft tree for the empty context; when it emits only one
# token t1 (the bonus at the root), round 2 verifies a draft for the context (t1,) -- drafts of
# different sizes per t1, so round 2 is a ragged batch -- and its first emitted token is t2. The
# counts over the 25 cells are compared to the exact joint p(t1) p(t2 | t1) with a chi-square test
# (cells of expected count 0 must be empty and are left out; all others have expected >= 5).
# The correct verifiers must give p > 1e-3; biased ones must give p < 1e-9 with the same M.

VOCAB = 5
M_TRIALS = 20000
_TABLE = np.random.default_rng(12345).normal(size=(13, VOCAB)).astype(np.float32) * 0.9


def ctx_logits(ctx):
    h = 7
    for t in ctx:
        h = (h * 31 + int(t) + 1) % 1000003
    return _TABLE[h % len(_TABLE)]


def dist_fn(params):
    """Context -> filtered target distribution (float64), via SGLang's own computation."""
    cache = {}

    def f(ctx):
        ctx = tuple(ctx)
        if ctx not in cache:
            lg = torch.from_numpy(ctx_logits(ctx)).unsqueeze(0)
            cache[ctx] = sglang_probs(lg, [params[0]], [params[1]], [params[2]], [params[3]])[0].double().numpy()
        return cache[ctx]
    return f


# Round-1 tree: depth 3, siblings at every level, a duplicated sibling token (node 2 repeats node 0;
# it and its child node 5 can never be accepted, although node 5's token is likely under the
# target), and draft tokens outside the truncated support (node 8 at the root, node 6).
TREE1 = Draft(np.array([0, 1, 0, 2, 3, 4, 4, 2, 3]), np.array([-1, -1, -1, 0, 1, 2, 1, 3, -1]))


def tree2(t1):
    """Round-2 draft for context (t1,): sizes 0..4 depending on t1 (ragged batch)."""
    n = int(t1) % 5
    toks = [(t1 + 1) % VOCAB, (t1 + 2) % VOCAB, (t1 + 1) % VOCAB, 3, 0][:n]
    pars = [-1, -1, -1, 0, 3][:n]
    return Draft(np.array(toks, dtype=np.int64), np.array(pars, dtype=np.int32))


def slot_contexts(ctx, draft):
    out = [tuple(ctx)]
    paths = []
    for i in range(len(draft)):
        par = int(draft.parents[i])
        paths.append((paths[par] if par >= 0 else ()) + (int(draft.token_ids[i]),))
        out.append(tuple(ctx) + paths[-1])
    return out


def expected_joint(dist):
    p1 = dist(())
    return np.array([[p1[a] * dist((a,))[b] for b in range(VOCAB)] for a in range(VOCAB)])


def two_token_counts(round_fn, seed):
    """round_fn(ctx_list, rng) -> int array [len, 2]: first two tokens emitted by one round (-1 when
    only one was emitted). Returns the [VOCAB, VOCAB] counts of the first two generated tokens."""
    rng = np.random.default_rng(seed)
    r1 = round_fn([()] * M_TRIALS, rng)
    t1, t2 = r1[:, 0].copy(), r1[:, 1].copy()
    need = np.flatnonzero(t2 < 0)
    if len(need):
        t2[need] = round_fn([(int(a),) for a in t1[need]], rng)[:, 0]
    counts = np.zeros((VOCAB, VOCAB), dtype=np.int64)
    np.add.at(counts, (t1, t2), 1)
    return counts


def chi2_pvalue(counts, joint):
    exp = joint * counts.sum()
    zero = exp <= 1e-9 * counts.sum()
    assert counts[zero].sum() == 0, f"tokens outside the target support were emitted: {counts[zero]}"
    assert exp[~zero].min() >= 5, "test design: expected cell counts too small for chi-square"
    chi2 = float((((counts - exp) ** 2)[~zero] / exp[~zero]).sum())
    return float(stats.chi2.sf(chi2, int((~zero).sum()) - 1))


# ---- verifiers under test -------------------------------------------------------------------


def _batch_logits(ctxs, draft_of):
    """Drafts and flat verify logits for a list of contexts (cached per distinct context)."""
    cache = {}
    drafts, blocks = [], []
    for ctx in ctxs:
        if ctx not in cache:
            d = draft_of(ctx)
            cache[ctx] = (d, np.stack([ctx_logits(c) for c in slot_contexts(ctx, d)]))
        d, lg = cache[ctx]
        drafts.append(d)
        blocks.append(lg)
    return drafts, torch.from_numpy(np.concatenate(blocks))


def _draft_of(ctx):
    return TREE1 if len(ctx) == 0 else tree2(ctx[0])


def production_round(params, first_match=True, seed=777):
    """verify_sampling on the whole batch; first_match=False runs the walk with the duplicate
    rule switched off (a deliberately wrong variant built from the same internals)."""
    gen = torch.Generator().manual_seed(seed)

    def round_fn(ctxs, rng):
        drafts, logits = _batch_logits(ctxs, _draft_of)
        if first_match:
            res = verify_sampling(drafts, logits, *params, generator=gen)
        else:
            tb = TreeBatch.from_drafts(drafts)
            probs = target_probs(logits, *params)
            path, bonus = V._walk(tb, V.sample_rows(probs, gen), first_match=False)
            res = V._build_result(tb, path, bonus)
        return _first_two(res)
    return round_fn


def _first_two(res):
    """First two emitted tokens per request of a VerifyResult (-1 when only one)."""
    toks, lens = res.flat_out_tokens.numpy(), res.out_lens.numpy()
    out = np.full((len(lens), 2), -1, dtype=np.int64)
    starts = np.cumsum(lens) - lens
    out[:, 0] = toks[starts]
    two = lens >= 2
    out[two, 1] = toks[starts[two] + 1]
    return out


def sequential_round(dist, accept_scale=1.0, renorm=True):
    """The brief's procedure written literally (vectorised over trials that share a context):
    at the current node, children in draft order, accept x with prob min(1, scale * p(x)) where p
    is the current distribution renormalised (or NOT renormalised after rejections when renorm is
    False); on rejection p(x) = 0; when all children fail, the bonus is drawn from what is left."""

    def one_context(ctx, count, rng):
        d = _draft_of(ctx)
        sd = [dist(c) for c in slot_contexts(ctx, d)]
        kids = [np.flatnonzero(d.parents == s - 1) for s in range(len(d) + 1)]
        out = np.full((count, 2), -1, dtype=np.int64)
        nout = np.zeros(count, dtype=np.int64)
        cur = np.zeros(count, dtype=np.int64)  # current slot
        done = np.zeros(count, dtype=bool)

        def emit(idx, tok):
            w = nout[idx] < 2
            out[idx[w], nout[idx[w]]] = tok[w] if np.ndim(tok) else tok
            nout[idx] += 1

        for s in range(len(d) + 1):  # slots increase along every path
            idx = np.flatnonzero((cur == s) & ~done)
            if not len(idx):
                continue
            p = np.tile(sd[s], (len(idx), 1))
            trying = np.ones(len(idx), dtype=bool)
            for c in kids[s]:
                x = int(d.token_ids[c])
                pa = p[:, x] / p.sum(1) if renorm else p[:, x]
                acc = trying & (rng.random(len(idx)) < np.minimum(1.0, accept_scale * pa))
                emit(idx[acc], x)
                cur[idx[acc]] = c + 1
                rej = trying & ~acc
                p[rej, x] = 0.0
                trying = rej
            left = idx[trying]
            if len(left):
                q = p[trying] / p[trying].sum(1, keepdims=True)
                u = rng.random(len(left))
                bonus = (q.cumsum(1) < u[:, None]).sum(1).clip(max=VOCAB - 1)
                emit(left, bonus)
                done[left] = True
        return out

    def round_fn(ctxs, rng):
        out = np.full((len(ctxs), 2), -1, dtype=np.int64)
        keys = {}
        for i, c in enumerate(ctxs):
            keys.setdefault(c, []).append(i)
        for c, rows in keys.items():
            out[np.array(rows)] = one_context(c, len(rows), rng)
        return out
    return round_fn


PLAIN = (1.0, -1, 1.0, 0.0)
TRUNC = (0.8, 3, 0.9, 0.05)  # top-k 3 and top-p 0.9 both cut; draft tokens outside the support


@pytest.mark.parametrize("params", [PLAIN, TRUNC], ids=["plain", "topk_topp"])
def test_sampling_lossless_and_bias_detected(params):
    dist = dist_fn(params)
    joint = expected_joint(dist)
    if params is TRUNC:
        assert (joint == 0).any() and (dist(()) == 0).any()  # truncation really is active
    res = {
        "verify_sampling": chi2_pvalue(two_token_counts(production_round(params), 1), joint),
        "sequential_reference": chi2_pvalue(two_token_counts(sequential_round(dist), 2), joint),
    }
    biased = {
        "accept_x1.3": sequential_round(dist, accept_scale=1.3),
        "no_renormalisation": sequential_round(dist, renorm=False),
        "duplicate_follows_match": production_round(params, first_match=False),
    }
    for name, fn in biased.items():
        res[name] = chi2_pvalue(two_token_counts(fn, 3), joint)
    print(f"\nchi-square p-values ({'plain' if params is PLAIN else 'top-k/top-p'}):", res)
    assert res["verify_sampling"] > 1e-3, res
    assert res["sequential_reference"] > 1e-3, res
    for name in biased:
        assert res[name] < 1e-9, (name, res)


def test_sampling_never_accepts_outside_support_and_duplicates():
    # top-k 2 leaves tokens {0, 1} (p0 = 0.622, p1 = 0.378). Node 1 (token 2) is outside the support;
    # node 2 repeats node 0's token, so it and its child node 3 can never be accepted.
    logits = torch.tensor([[3.0, 2.5, 2.0, -1.0]])
    p0 = float(torch.softmax(torch.tensor([3.0, 2.5]), 0)[0])
    d = Draft(np.array([0, 2, 0, 1, 1]), np.array([-1, -1, -1, 2, 0]))
    n = 4000
    run = lambda: verify_sampling([d] * n, logits.repeat(6 * n, 1), 1.0, 2,
                                  generator=torch.Generator().manual_seed(5))
    res = run()
    freq = res.path_mask.float().mean(0)
    assert freq[1] == 0 and freq[2] == 0 and freq[3] == 0
    assert abs(freq[0].item() - p0) < 0.03 and abs(freq[4].item() - p0 * (1 - p0)) < 0.03
    assert set(res.bonus_tokens.tolist()) <= {0, 1}
    assert torch.equal(res.flat_out_tokens, run().flat_out_tokens)  # reproducible


def test_block_sampler_large_vocab():
    """The two-level inverse-CDF sampler used for every slot: frequencies match the row (chi-square)
    and zero-probability tokens (a whole zero block, the last partial block) are never drawn."""
    vocab = 5000
    rng = np.random.default_rng(8)
    base = np.zeros(vocab)
    heavy = np.array([0, 5, 1023, 1024, 1500, 3071 + 1, 4095, 4096, 4500, 4999])
    base[heavy] = rng.dirichlet(np.ones(len(heavy))) * 0.9
    light = np.setdiff1d(np.arange(vocab), np.concatenate([heavy, np.arange(2048, 3072)]))
    light = light[rng.random(len(light)) < 0.5]
    base[light] = 0.1 / len(light)
    row = torch.from_numpy(base.astype(np.float32)) * 3.0  # unnormalised on purpose
    gen = torch.Generator().manual_seed(9)
    draws = torch.cat([V.sample_rows(row.expand(2000, vocab), gen) for _ in range(5)]).numpy()
    assert (base[draws] > 0).all()
    counts = np.array([(draws == h).sum() for h in heavy] + [np.isin(draws, light).sum()])
    p = np.array(list(base[heavy]) + [0.1]) / base.sum()
    pval = stats.chisquare(counts, p * len(draws)).pvalue
    assert pval > 1e-3, pval


# ---- drafter distribution q (chain) -----------------------------------------------------------

_QTABLE = np.random.default_rng(999).normal(size=(13, VOCAB)).astype(np.float32) * 1.2


def q_of(ctx):
    h = 11
    for t in ctx:
        h = (h * 17 + int(t) + 3) % 1000003
    z = _QTABLE[h % len(_QTABLE)].astype(np.float64)
    e = np.exp(z - z.max())
    return e / e.sum()


def q_round(params, chain_len=3, residual=True, seed=4242):
    gen = torch.Generator().manual_seed(seed)

    def round_fn(ctxs, rng):
        n = len(ctxs)
        toks = np.zeros((n, chain_len), dtype=np.int64)
        qs = np.zeros((n, chain_len, VOCAB), dtype=np.float32)
        lg = np.zeros((n, chain_len + 1, VOCAB), dtype=np.float32)
        cur = list(ctxs)
        for j in range(chain_len + 1):  # drafts SAMPLED from q, vectorised per distinct prefix
            groups = {}
            for i, c in enumerate(cur):
                groups.setdefault(c, []).append(i)
            for c, rows in groups.items():
                rows = np.array(rows)
                lg[rows, j] = ctx_logits(c)
                if j < chain_len:
                    q = q_of(c)
                    qs[rows, j] = q
                    toks[rows, j] = (q.cumsum()[None, :] < rng.random((len(rows), 1))).sum(1).clip(max=VOCAB - 1)
            if j < chain_len:
                cur = [c + (int(x),) for c, x in zip(cur, toks[:, j])]
        logits = torch.from_numpy(lg)  # padded [bs, S, V] layout
        tk, qt = torch.from_numpy(toks), torch.from_numpy(qs)
        if residual:
            res = verify_sampling_draft_probs(tk, qt, logits, *params, generator=gen)
        else:
            # wrong on purpose: the bonus after a rejection is drawn from p instead of
            # max(p - q, 0); acceptance is the correct min(1, p/q).
            p = target_probs(logits.reshape(-1, VOCAB), *params)
            acc = verify_sampling_draft_probs(tk, qt, logits, *params, generator=gen, probs=p)
            bonus = V.sample_rows(p.reshape(n, chain_len + 1, VOCAB)[torch.arange(n), acc.accept_lens], gen)
            res = V._build_result(TreeBatch.chains(tk), acc.path_mask, bonus)
        return _first_two(res)
    return round_fn


@pytest.mark.parametrize("params", [PLAIN, TRUNC], ids=["plain", "topk_topp"])
def test_draft_probs_chain_lossless_and_bias_detected(params):
    joint = expected_joint(dist_fn(params))
    good = chi2_pvalue(two_token_counts(q_round(params), 11), joint)
    bad = chi2_pvalue(two_token_counts(q_round(params, residual=False), 12), joint)
    print(f"\ndraft-probs chain p-values: correct={good:.4g} bonus-from-p={bad:.3g}")
    assert good > 1e-3
    assert bad < 1e-9


def test_seeded_uniforms_make_a_request_sample_the_same_whatever_its_batch():
    """A seeded request's slots draw with uniforms of (seed, position): alone or next to other
    requests (whose draws are random), its outcome is the same; another seed differs somewhere."""
    from sgl_longspec.verify.acceptance import seeded_uniforms

    torch.manual_seed(0)
    V = 50
    logits = torch.randn(5, V)  # one request: root + a 4-token chain
    draft = Draft.chain(torch.argmax(logits, -1)[:4].tolist())

    def outcome(seed, with_others):
        u = seeded_uniforms(seed, range(100, 105))
        if not with_others:
            vr = verify_sampling([draft], logits, temperature=1.0, uniforms=u)
            return vr.requests()[0].output_tokens
        other = torch.randn(3, V)
        batch_logits = torch.cat([other, logits])
        uu = torch.cat([torch.full((3,), float("nan"), dtype=torch.float64), u])
        vr = verify_sampling([Draft.chain([1, 2]), draft], batch_logits, temperature=1.0,
                             uniforms=uu, generator=torch.Generator().manual_seed(with_others))
        return vr.requests()[1].output_tokens

    for seed in range(20):
        alone = outcome(seed, 0)
        assert all(outcome(seed, k) == alone for k in (1, 2, 3))
    assert len({tuple(outcome(s, 0)) for s in range(20)}) > 1
    assert torch.equal(seeded_uniforms(7, [3, 4]), seeded_uniforms(7, [3, 4]))
    u = seeded_uniforms(123, range(10000))
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0 and abs(float(u.mean()) - 0.5) < 0.02
