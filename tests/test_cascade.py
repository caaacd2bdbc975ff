"""Cascade attention over radix-shared prefixes: the grouping (sgl_longspec.attention.cascade) against brute
force, and the CPU backend's three-level attention (shared prefix, own prefix, new tokens) against
dense attention, for decode, verify and extend batches with random groupings."""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flashinfer_ext.reference import tree_mask_from_parents
from sgl_longspec.attention.cascade import MinShared, common_prefix_len, shared_prefix_groups
from sgl_longspec.verify.layout import VerifyLayout
from test_cpu_ops import _FakeKVPool


def _lcp(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@st.composite
def _prefix_batches(draw):
    """Slot lists as the radix cache makes them: a few cached runs, each request a cut of one run
    followed by slots of its own."""
    fresh = iter(range(10_000, 100_000))
    runs = [[next(fresh) for _ in range(draw(st.integers(1, 40)))] for _ in range(draw(st.integers(1, 3)))]
    out = []
    for _ in range(draw(st.integers(0, 8))):
        run = runs[draw(st.integers(0, len(runs) - 1))]
        cut = draw(st.integers(0, len(run)))
        out.append(run[:cut] + [next(fresh) for _ in range(draw(st.integers(0, 10)))])
    return out


@settings(max_examples=300, deadline=None)
@given(batch=_prefix_batches(), min_shared=st.integers(0, 12))
def test_groups_share_what_they_claim_and_miss_no_pair(batch, min_shared):
    groups = shared_prefix_groups([torch.tensor(p, dtype=torch.int64) for p in batch], min_shared)
    seen = [i for g in groups for i in g.members]
    assert len(seen) == len(set(seen))  # disjoint
    for g in groups:
        assert len(g.members) >= 2 and g.length >= min_shared > 0
        # the length is exactly the members' common prefix
        assert g.length == min(_lcp(batch[g.members[0]], batch[j]) for j in g.members[1:])
    # no two requests left out could have shared a level
    alone = [i for i in range(len(batch)) if i not in seen]
    if min_shared > 0:
        assert all(_lcp(batch[i], batch[j]) < min_shared for i in alone for j in alone if i < j)
    else:
        assert groups == []


@settings(max_examples=300, deadline=None)
@given(batch=_prefix_batches(), pair=st.integers(1, 14), drop=st.integers(0, 6))
def test_groups_by_size_threshold(batch, pair, drop):
    """A size-dependent threshold (larger groups need shorter runs): every group's run is long
    enough for its size, and no two requests left out share the run a pair needs."""
    need = MinShared(((2, pair), (3, max(1, pair - drop)), (5, max(1, pair - 2 * drop))))
    groups = shared_prefix_groups([torch.tensor(p, dtype=torch.int64) for p in batch], need)
    seen = [i for g in groups for i in g.members]
    assert len(seen) == len(set(seen))
    for g in groups:
        assert g.length >= need.for_group(len(g.members))
        assert g.length == min(_lcp(batch[g.members[0]], batch[j]) for j in g.members[1:])
    alone = [i for i in range(len(batch)) if i not in seen]
    assert all(_lcp(batch[i], batch[j]) < pair for i in alone for j in alone if i < j)


def test_a_larger_group_takes_a_shorter_run():
    """Three requests sharing 6 slots: no pair is worth a level at 8, the group of three is at 5."""
    run = list(range(6))
    batch = [torch.tensor(run + [100 + i]) for i in range(3)]
    assert shared_prefix_groups(batch, 8) == []
    (g,) = shared_prefix_groups(batch, MinShared(((2, 8), (3, 5))))
    assert g.members == (0, 1, 2) and g.length == 6
    assert shared_prefix_groups(batch[:2], MinShared(((2, 8), (3, 5)))) == []


def test_a_short_sharer_does_not_shrink_a_long_group():
    long = list(range(100))
    batch = [long + [1000], long + [1001], long + [1002], long[:10] + [1003]]
    (g,) = shared_prefix_groups([torch.tensor(p) for p in batch], 4)
    assert g.members == (0, 1, 2) and g.length == 100


@settings(max_examples=200, deadline=None)
@given(a=st.lists(st.integers(0, 3), max_size=12), b=st.lists(st.integers(0, 3), max_size=12))
def test_common_prefix_len(a, b):
    assert common_prefix_len(torch.tensor(a, dtype=torch.int64), torch.tensor(b, dtype=torch.int64)) == _lcp(a, b)


# ------------------------------------------------------------------------- groups from radix paths
def _node_slots(node) -> torch.Tensor:
    """The KV slots of the radix-cache path ending at `node`, root first (as SGLang reads a
    match's indices)."""
    parts = []
    while node is not None and node.parent is not None:
        parts.append(node.value.to(torch.int64))
        node = node.parent
    return torch.cat(parts[::-1]) if parts else torch.zeros(0, dtype=torch.int64)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=_prefix_batches(), min_shared=st.integers(1, 12))
def test_radix_paths_group_as_the_slots_do(batch, min_shared):
    """SGLang's own radix cache: each request's prompt inserted as the scheduler does (the
    matched prefix keeps its slots, the rest gets fresh ones), later prompts splitting earlier
    nodes; the groups from the tree's paths (host-side, what the GPU plan uses) are exactly the
    groups from the requests' slot ids."""
    pytest.importorskip("sglang")
    from sglang.srt.mem_cache.base_prefix_cache import InsertParams, MatchPrefixParams
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams
    from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey

    from sgl_longspec.adapter.radix_paths import radix_path
    from sgl_longspec.attention.cascade import shared_path_groups

    tree = RadixCache(CacheInitParams(disable=False, req_to_token_pool=None,
                                      token_to_kv_pool_allocator=None, page_size=1))
    fresh = iter(range(1_000_000, 2_000_000))
    nodes = []
    for tokens in batch:
        if not tokens:
            nodes.append(None)
            continue
        hit = _node_slots(tree.match_prefix(MatchPrefixParams(key=RadixKey(tokens))).last_device_node)
        value = torch.cat([hit.to(torch.int64),
                           torch.tensor([next(fresh) for _ in range(len(tokens) - len(hit))],
                                        dtype=torch.int64)])
        tree.insert(InsertParams(key=RadixKey(tokens), value=value))
        m = tree.match_prefix(MatchPrefixParams(key=RadixKey(tokens)))
        assert m.device_prefix_len == len(tokens)
        nodes.append(m.last_device_node)
    # the slots each request's row holds: its path's values, read after every split
    slots = [_node_slots(n) for n in nodes]
    assert [len(x) for x in slots] == [len(t) for t in batch]
    paths = [radix_path(n) for n in nodes]
    assert [p[-1][1] if p else 0 for p in paths] == [len(t) for t in batch]
    assert shared_path_groups(paths, min_shared) == shared_prefix_groups(slots, min_shared)


# ------------------------------------------------------------------------- the CPU backend, 3 levels
@pytest.fixture(scope="module")
def attn():
    pytest.importorskip("sglang")
    from sgl_longspec import cpu

    cpu.prepare_environment()
    from sgl_longspec.attention import cpu_hybrid as attention

    return attention


def _dense(q, k, v, allowed, scale):
    """float64 softmax attention with GQA: q [n, Hq, D], k/v [m, Hkv, D], allowed [n, m]."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(rep, 1), v.double().repeat_interleave(rep, 1)
    s = torch.einsum("nhd,mhd->hnm", q.double(), k) * scale
    s = s.masked_fill(~allowed[None], -math.inf)
    return torch.einsum("hnm,mhd->nhd", torch.softmax(s, -1), v)


def _tree_mask(rng, n):
    return tree_mask_from_parents([-1] + [rng.randint(0, i - 1) for i in range(1, n)])


@pytest.mark.parametrize("mode", ["decode", "verify", "extend"])
@pytest.mark.parametrize("seed", range(6))
def test_backend_cascade_equals_dense_attention(attn, monkeypatch, mode, seed):
    """Random batches whose requests share radix runs (some contiguous, some scattered): the backend
    forms shared groups (counters), and every query row equals dense attention over its request's
    whole KV under its mask (causal for extend, the tree for verify)."""
    from sglang.srt.layers.radix_attention import AttentionType
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    monkeypatch.setattr(attn, "CASCADE_MIN_SHARED", 3)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    hq, hkv, d, slots = 4, 2, 16, 2048
    free = list(range(1, slots))
    rng.shuffle(free)
    contiguous = rng.random() < 0.5
    run = list(range(1500, 1540)) if contiguous else [free.pop() for _ in range(40)]
    free = [x for x in free if x not in set(run)]
    bs = rng.randint(2, 6)
    committed, new_lens = [], []
    for b in range(bs):
        cut = rng.choice([0, 2, 5, 17, 40]) if b else 40  # some share nothing, some a short run
        committed.append(run[:cut] + [free.pop() for _ in range(rng.randint(1 if mode == "decode" else 0, 9))])
        new_lens.append(1 if mode == "decode" else rng.randint(1, 6))
    req_to_token = torch.zeros(bs + 1, 128, dtype=torch.int32)
    rows = list(range(1, bs + 1))
    news = []
    for r, c, n in zip(rows, committed, new_lens):
        if mode == "decode":  # the decoded token's slot is the last of the committed ones
            req_to_token[r, :len(c)] = torch.tensor(c, dtype=torch.int32)
            news.append([])
        else:
            own = [free.pop() for _ in range(n)]
            req_to_token[r, :len(c) + n] = torch.tensor(c + own, dtype=torch.int32)
            news.append(own)
    k_cache, v_cache = torch.randn(slots, hkv, d), torch.randn(slots, hkv, d)
    runner = SimpleNamespace(device="cpu", req_to_token_pool=SimpleNamespace(req_to_token=req_to_token),
                             token_to_kv_pool=_FakeKVPool(k_cache, v_cache))
    backend = attn.LongSpecCPUAttnBackend(runner)
    masks = [_tree_mask(rng, n) for n in new_lens]
    if mode == "decode":
        seq = [len(c) for c in committed]
        out_loc = torch.tensor([c[-1] for c in committed])
        fb = SimpleNamespace(forward_mode=ForwardMode.DECODE, encoder_lens=None, out_cache_loc=out_loc,
                             req_pool_indices=torch.tensor(rows), seq_lens=torch.tensor(seq),
                             seq_lens_cpu=torch.tensor(seq))
    else:
        out_loc = torch.tensor([x for o in news for x in o])
        seq = [len(c) for c in committed]
        fb = SimpleNamespace(forward_mode=ForwardMode.TARGET_VERIFY if mode == "verify" else ForwardMode.EXTEND,
                             encoder_lens=None, out_cache_loc=out_loc, req_pool_indices=torch.tensor(rows),
                             seq_lens=torch.tensor([s + n for s, n in zip(seq, new_lens)]) if mode == "extend"
                             else torch.tensor(seq),
                             seq_lens_cpu=torch.tensor([s + n for s, n in zip(seq, new_lens)]) if mode == "extend"
                             else torch.tensor(seq),
                             extend_prefix_lens_cpu=seq, extend_seq_lens_cpu=new_lens,
                             spec_info=SimpleNamespace(layout=VerifyLayout(masks, list(seq))))
    before = dict(attn.CASCADE_COUNTS)
    backend.init_forward_metadata(fb)
    sharers = sum(1 for c in committed if len(c) >= 3 and c[:3] == run[:3])
    if sharers >= 2:
        key = f"{mode}_groups"
        assert attn.CASCADE_COUNTS[key] > before[key], "no shared level was planned"
        assert backend.plan.shared
    layer = SimpleNamespace(tp_q_head_num=hq, tp_k_head_num=hkv, qk_head_dim=d, v_head_dim=d,
                            scaling=d ** -0.5, layer_id=0, is_cross_attention=False,
                            attn_type=AttentionType.DECODER, sliding_window_size=None, logit_cap=0)
    total = sum(new_lens)
    q = torch.randn(total, hq * d)
    k_new, v_new = torch.randn(total, hkv * d), torch.randn(total, hkv * d)
    if mode == "decode":
        out = backend.forward_decode(q, k_new, v_new, layer, fb)
    else:
        out = backend.forward_extend(q, k_new, v_new, layer, fb)
    out = out.view(total, hq, d)
    start = 0
    for b, (c, n) in enumerate(zip(committed, new_lens)):
        kv_slots = torch.tensor(c + news[b], dtype=torch.int64)
        p = len(c) - (1 if mode == "decode" else 0)
        if mode == "decode":
            allowed = torch.ones(1, len(c), dtype=torch.bool)
        else:
            tree = masks[b] if mode == "verify" else torch.ones(n, n, dtype=torch.bool).tril()
            allowed = torch.cat([torch.ones(n, p, dtype=torch.bool), tree], 1)
        ref = _dense(q[start:start + n].view(n, hq, d), k_cache[kv_slots], v_cache[kv_slots], allowed, d ** -0.5)
        torch.testing.assert_close(out[start:start + n].double(), ref, atol=2e-5, rtol=1e-4)
        start += n
