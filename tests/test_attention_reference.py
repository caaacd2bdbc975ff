"""CPU reference attention (flashinfer_ext.reference) against naive dense masked attention in float64.

Tolerances (inputs are first rounded to the tested dtype; the float64 oracle uses those same rounded
values, so only the kernel's own arithmetic is measured):
- float32: out atol 2e-5 (rtol 1e-4), lse atol 1e-4;
- bfloat16: out atol 2e-2 (rtol 2e-2): the bf16 output rounding (2^-9 relative) plus the bf16
  probabilities the blocked CPU flash kernel feeds into P@V; lse atol 2e-3 (scores are accumulated
  in float32 from exact bf16 products).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flashinfer_ext.reference as ref
from flashinfer_ext.reference import (
    attention_with_lse,
    batch_hybrid_tree_attention,
    dense_tree_verify_attention,
    hybrid_tree_attention,
    lse_from_base2,
    lse_to_base2,
    merge_attention_states,
    merge_attention_states_many,
    tree_mask_from_parents,
)

TOL = {
    torch.float32: dict(out_atol=2e-5, out_rtol=1e-4, lse_atol=1e-4),
    torch.bfloat16: dict(out_atol=2e-2, out_rtol=2e-2, lse_atol=2e-3),
}

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ----------------------------------------------------------------------------------------- oracle
def naive_attention(q, k, v, sm_scale, mask=None):
    """Float64 dense attention with K/V repeated per query head. Returns (out, lse) like the API."""
    nq, hq, d = q.shape
    nk, hkv, _ = k.shape
    g = hq // hkv
    kk = k.double().repeat_interleave(g, dim=1)
    vv = v.double().repeat_interleave(g, dim=1)
    s = torch.einsum("qhd,khd->hqk", q.double(), kk) * sm_scale
    if mask is not None:
        s = s.masked_fill(~mask.bool(), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # -inf for empty rows
    p = torch.exp(s - lse.unsqueeze(-1)).nan_to_num(0.0)
    return torch.einsum("hqk,khd->qhd", p, vv), lse.transpose(0, 1)


def make_parents(kind, n, rnd):
    if n == 0:
        return []
    if kind == "chain":
        return list(range(-1, n - 1))
    if kind == "wide":  # every node a child of the first (the verify root)
        return [-1] + [0] * (n - 1)
    if kind == "star":  # every node a root (no node sees another)
        return [-1] * n
    return [-1] + [rnd.randrange(-1, i) for i in range(1, n)]  # random tree / forest


def assert_close_state(out, lse, ref_out, ref_lse, dtype):
    tol = TOL[dtype]
    assert out.dtype == dtype
    assert lse.dtype == torch.float32
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(out.double(), ref_out, atol=tol["out_atol"], rtol=tol["out_rtol"])
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), fin), "empty rows must be exactly the -inf rows"
    assert (lse[~fin] == float("-inf")).all()
    torch.testing.assert_close(lse.double()[fin], ref_lse[fin], atol=tol["lse_atol"], rtol=0)


def rand_qkv(nq, nk, hq, hkv, d, dtype, gen):
    q = torch.randn(nq, hq, d, generator=gen).to(dtype)
    k = torch.randn(nk, hkv, d, generator=gen).to(dtype)
    v = torch.randn(nk, hkv, d, generator=gen).to(dtype)
    return q, k, v


dtypes = st.sampled_from([torch.float32, torch.bfloat16])
head_cfg = st.sampled_from([(4, 4), (8, 4), (8, 2), (16, 2), (8, 1)])  # (Hq, Hkv): ratios 1/2/4/8


# --------------------------------------------------------------------------- attention_with_lse
@SETTINGS
@given(nq=st.integers(1, 40), nk=st.integers(1, 300), heads=head_cfg, d=st.sampled_from([64, 128]),
       dtype=dtypes, density=st.sampled_from([None, 0.0, 0.1, 0.5, 1.0]), causal=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_attention_with_lse_matches_naive(nq, nk, heads, d, dtype, density, causal, seed):
    hq, hkv = heads
    gen = torch.Generator().manual_seed(seed)
    q, k, v = rand_qkv(nq, nk, hq, hkv, d, dtype, gen)
    mask = None if density is None else (torch.rand(nq, nk, generator=gen) < density)
    if mask is not None and nq > 1:
        mask[nq // 2] = False  # always one explicitly empty row
    scale = 1.0 / math.sqrt(d)
    out, lse = attention_with_lse(q, k, v, scale, mask=mask, causal=causal)
    full = mask
    if causal:
        cm = torch.arange(nk)[None, :] <= torch.arange(nq)[:, None] + (nk - nq)
        full = cm if full is None else (full & cm)
    ro, rl = naive_attention(q, k, v, scale, full)
    assert_close_state(out, lse, ro, rl, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_masked_problem_uses_flash_path_and_matches(dtype, monkeypatch):
    gen = torch.Generator().manual_seed(1)
    q, k, v = rand_qkv(24, 700, 8, 2, 64, dtype, gen)
    mask = torch.rand(24, 700, generator=gen) < 0.7
    mask[5] = False
    calls = []
    real = ref._flash_masked_attention
    monkeypatch.setattr(ref, "_flash_masked_attention", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(ref, "_EXPLICIT_MAX_SCORES", 1000)
    out, lse = attention_with_lse(q, k, v, 0.125, mask=mask)
    if ref._cpu_flash_ok:
        assert calls, "large masked problems should go through the blocked CPU flash kernel"
    ro, rl = naive_attention(q, k, v, 0.125, mask)
    assert_close_state(out, lse, ro, rl, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_explicit_fallback_matches_flash_path(dtype, monkeypatch):
    gen = torch.Generator().manual_seed(2)
    q, k, v = rand_qkv(9, 500, 8, 2, 128, dtype, gen)
    o1, l1 = attention_with_lse(q, k, v, 0.09)
    monkeypatch.setattr(ref, "_cpu_flash_ok", False)
    o2, l2 = attention_with_lse(q, k, v, 0.09)
    ro, rl = naive_attention(q, k, v, 0.09)
    assert_close_state(o1, l1, ro, rl, dtype)
    assert_close_state(o2, l2, ro, rl, dtype)


def test_empty_rows_and_empty_inputs():
    gen = torch.Generator().manual_seed(3)
    q, k, v = rand_qkv(5, 6, 4, 2, 64, torch.float32, gen)
    out, lse = attention_with_lse(q, k, v, 0.1, mask=torch.zeros(5, 6, dtype=torch.bool))
    assert torch.equal(out, torch.zeros_like(out))
    assert (lse == float("-inf")).all()
    # no keys at all
    out, lse = attention_with_lse(q, k[:0], v[:0], 0.1)
    assert out.shape == (5, 4, 64) and (out == 0).all() and (lse == float("-inf")).all()
    # no queries
    out, lse = attention_with_lse(q[:0], k, v, 0.1)
    assert out.shape == (0, 4, 64) and lse.shape == (0, 4)
    # causal with more queries than keys: the first nq - nk rows see nothing
    out, lse = attention_with_lse(q, k[:3], v[:3], 0.1, causal=True)
    assert (lse[:2] == float("-inf")).all() and (out[:2] == 0).all()
    assert torch.isfinite(lse[2:]).all()
    ro, rl = naive_attention(q, k[:3], v[:3], 0.1,
                             torch.arange(3)[None, :] <= torch.arange(5)[:, None] - 2)
    assert_close_state(out, lse, ro, rl, torch.float32)


def test_bad_shapes_raise():
    q = torch.randn(3, 6, 64)
    k = torch.randn(4, 4, 64)
    with pytest.raises(ValueError):
        attention_with_lse(q, k, k, 0.1)  # 6 % 4 != 0
    with pytest.raises(ValueError):
        attention_with_lse(torch.randn(3, 4, 64), k, k, 0.1, mask=torch.ones(3, 5, dtype=torch.bool))


# ----------------------------------------------------------------------------------- merge / LSE
def _state(gen, rows, h, d, empty_frac=0.2):
    o = torch.randn(rows, h, d, generator=gen)
    lse = torch.randn(rows, h, generator=gen) * 3
    empty = torch.rand(rows, h, generator=gen) < empty_frac
    return o.masked_fill(empty[..., None], 0.0), lse.masked_fill(empty, float("-inf"))


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 20))
def test_merge_associative_commutative_and_identity(seed, rows):
    gen = torch.Generator().manual_seed(seed)
    a, b, c = (_state(gen, rows, 3, 16) for _ in range(3))
    ab_c = merge_attention_states(*merge_attention_states(*a, *b), *c)
    a_bc = merge_attention_states(*a, *merge_attention_states(*b, *c))
    for x, y in zip(ab_c, a_bc):
        assert not torch.isnan(x).any()
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    ba = merge_attention_states(*b, *a)
    ab = merge_attention_states(*a, *b)
    torch.testing.assert_close(ab[0], ba[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ab[1], ba[1])
    ident = (torch.zeros_like(a[0]), torch.full_like(a[1], float("-inf")))
    ai = merge_attention_states(*a, *ident)
    torch.testing.assert_close(ai[0], a[0])
    torch.testing.assert_close(ai[1], a[1])
    many = merge_attention_states_many(torch.stack([a[0], b[0], c[0]]), torch.stack([a[1], b[1], c[1]]))
    torch.testing.assert_close(many[0], ab_c[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(many[1], ab_c[1], atol=1e-5, rtol=1e-5)


def test_merge_of_key_partitions_equals_full_attention():
    gen = torch.Generator().manual_seed(4)
    q, k, v = rand_qkv(6, 90, 8, 4, 64, torch.float32, gen)
    parts = [(0, 10), (10, 10), (10, 55), (55, 90)]  # includes an empty part
    states = [attention_with_lse(q, k[s:e], v[s:e], 0.12) for s, e in parts]
    o, l = states[0]
    for so, sl in states[1:]:
        o, l = merge_attention_states(o, l, so, sl)
    ro, rl = naive_attention(q, k, v, 0.12)
    assert_close_state(o, l, ro, rl, torch.float32)


def test_base2_conversion():
    lse = torch.tensor([0.0, 1.5, -3.0, float("-inf")])
    two = lse_to_base2(lse)
    torch.testing.assert_close(torch.exp2(two[:3]), torch.exp(lse[:3]))
    assert two[3] == float("-inf")
    torch.testing.assert_close(lse_from_base2(two), lse)


# --------------------------------------------------------------------------- hybrid attention
@SETTINGS
@given(n=st.integers(1, 64), p=st.one_of(st.just(0), st.integers(1, 2000)), heads=head_cfg,
       d=st.sampled_from([64, 128]), dtype=dtypes,
       kind=st.sampled_from(["chain", "wide", "star", "random"]), seed=st.integers(0, 2**31 - 1))
def test_hybrid_equals_dense_masked(n, p, heads, d, dtype, kind, seed):
    import random

    hq, hkv = heads
    gen = torch.Generator().manual_seed(seed)
    q, kt, vt = rand_qkv(n, n, hq, hkv, d, dtype, gen)
    _, kp, vp = rand_qkv(0, p, hq, hkv, d, dtype, gen)
    tm = tree_mask_from_parents(make_parents(kind, n, random.Random(seed)))
    scale = 1.0 / math.sqrt(d)
    out, lse = hybrid_tree_attention(q, kp, vp, kt, vt, tm, scale, return_lse=True)
    full = torch.cat([torch.ones(n, p, dtype=torch.bool), tm], dim=1)
    ro, rl = naive_attention(q, torch.cat([kp, kt]), torch.cat([vp, vt]), scale, full)
    assert_close_state(out, lse, ro, rl, dtype)
    assert torch.isfinite(lse).all()  # ancestor-or-self: every row sees at least itself
    assert torch.equal(hybrid_tree_attention(q, kp, vp, kt, vt, tm, scale), out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_baseline_equals_hybrid(dtype):
    import random

    gen = torch.Generator().manual_seed(5)
    n, p = 16, 1500
    q, kt, vt = rand_qkv(n, n, 8, 2, 64, dtype, gen)
    _, kp, vp = rand_qkv(0, p, 8, 2, 64, dtype, gen)
    tm = tree_mask_from_parents(make_parents("random", n, random.Random(0)))
    h = hybrid_tree_attention(q, kp, vp, kt, vt, tm, 0.125)
    dn = dense_tree_verify_attention(q, kp, vp, kt, vt, tm, 0.125)
    tol = TOL[dtype]
    torch.testing.assert_close(h.double(), dn.double(), atol=2 * tol["out_atol"], rtol=2 * tol["out_rtol"])


def test_hybrid_with_draft_tree_mask_layout():
    """The mask the verifier builds (sgl_longspec.drafters.draft.Draft.tree_mask, root in slot 0) works as is."""
    np = pytest.importorskip("numpy")
    draft_mod = pytest.importorskip("sgl_longspec.drafters.draft")
    d = draft_mod.Draft(np.arange(6), np.array([-1, 0, 0, 1, -1, 4]))
    tm = torch.from_numpy(d.tree_mask(include_root=True))
    n = tm.shape[0]
    gen = torch.Generator().manual_seed(6)
    q, kt, vt = rand_qkv(n, n, 4, 1, 64, torch.float32, gen)
    _, kp, vp = rand_qkv(0, 33, 4, 1, 64, torch.float32, gen)
    out, lse = hybrid_tree_attention(q, kp, vp, kt, vt, tm, 0.125, return_lse=True)
    ro, rl = naive_attention(q, torch.cat([kp, kt]), torch.cat([vp, vt]), 0.125,
                             torch.cat([torch.ones(n, 33, dtype=torch.bool), tm], 1))
    assert_close_state(out, lse, ro, rl, torch.float32)


def test_hybrid_empty_tree_and_bad_mask():
    q = torch.randn(0, 4, 64)
    e = torch.randn(0, 2, 64)
    kp = torch.randn(10, 2, 64)
    out = hybrid_tree_attention(q, kp, kp, e, e, torch.zeros(0, 0, dtype=torch.bool), 0.1)
    assert out.shape == (0, 4, 64)
    with pytest.raises(ValueError):
        hybrid_tree_attention(torch.randn(3, 4, 64), kp, kp, torch.randn(3, 2, 64),
                              torch.randn(3, 2, 64), torch.ones(2, 2, dtype=torch.bool), 0.1)


# --------------------------------------------------------------------------------- ragged batch
@settings(max_examples=15, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(sizes=st.lists(st.tuples(st.integers(0, 20), st.integers(0, 400)), min_size=1, max_size=5),
       heads=head_cfg, dtype=dtypes, contiguous=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_batch_hybrid_matches_per_request(sizes, heads, dtype, contiguous, seed):
    import random

    hq, hkv = heads
    d = 64
    rnd = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    total_slots = sum(n + p for n, p in sizes) + 7
    k_cache = torch.randn(total_slots, hkv, d, generator=gen).to(dtype)
    v_cache = torch.randn(total_slots, hkv, d, generator=gen).to(dtype)
    perm = torch.arange(total_slots) if contiguous else torch.randperm(total_slots, generator=gen)
    qo, pp, mp = [0], [0], [0]
    prefix_idx, tree_idx, masks, qs = [], [], [], []
    cur = 3
    for n, p in sizes:
        prefix_idx.append(perm[cur:cur + p])
        tree_idx.append(perm[cur + p:cur + p + n])
        cur += p + n
        masks.append(tree_mask_from_parents(make_parents(rnd.choice(["chain", "wide", "random"]), n, rnd)))
        qs.append(torch.randn(n, hq, d, generator=gen).to(dtype))
        qo.append(qo[-1] + n)
        pp.append(pp[-1] + p)
        mp.append(mp[-1] + n * n)
    q = torch.cat(qs)
    out, lse = batch_hybrid_tree_attention(
        q, k_cache, v_cache, torch.tensor(qo, dtype=torch.int32), torch.cat(prefix_idx),
        torch.tensor(pp, dtype=torch.int32), torch.cat(tree_idx),
        torch.cat([m.reshape(-1) for m in masks]), torch.tensor(mp, dtype=torch.int32),
        1.0 / math.sqrt(d), return_lse=True)
    assert out.shape == q.shape and out.dtype == dtype
    for i, (n, p) in enumerate(sizes):
        if n == 0:
            continue
        s, e = qo[i], qo[i + 1]
        kk = torch.cat([k_cache[prefix_idx[i]], k_cache[tree_idx[i]]])
        vv = torch.cat([v_cache[prefix_idx[i]], v_cache[tree_idx[i]]])
        full = torch.cat([torch.ones(n, p, dtype=torch.bool), masks[i]], 1)
        ro, rl = naive_attention(q[s:e], kk, vv, 1.0 / math.sqrt(d), full)
        assert_close_state(out[s:e], lse[s:e], ro, rl, dtype)


def test_batch_accepts_python_lists_and_rejects_bad_mask_sizes():
    k_cache = torch.randn(20, 2, 64)
    q = torch.randn(3, 4, 64)
    tm = tree_mask_from_parents([-1, 0, 1])
    out = batch_hybrid_tree_attention(q, k_cache, k_cache, [0, 3], torch.arange(10), [0, 10],
                                      torch.tensor([12, 10, 11]), tm.reshape(-1), [0, 9], 0.125)
    ro, _ = naive_attention(q, torch.cat([k_cache[:10], k_cache[[12, 10, 11]]]),
                            torch.cat([k_cache[:10], k_cache[[12, 10, 11]]]), 0.125,
                            torch.cat([torch.ones(3, 10, dtype=torch.bool), tm], 1))
    torch.testing.assert_close(out.double(), ro, atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError):
        batch_hybrid_tree_attention(q, k_cache, k_cache, [0, 3], torch.arange(10), [0, 10],
                                    torch.tensor([12, 10, 11]), tm.reshape(-1)[:8], [0, 8], 0.125)


def test_gather_kv_views_contiguous_ranges():
    cache = torch.randn(50, 2, 8)
    g = ref.gather_kv(cache, torch.arange(10, 30))
    assert g.data_ptr() == cache[10].data_ptr() and torch.equal(g, cache[10:30])
    idx = torch.tensor([3, 4, 9])
    assert torch.equal(ref.gather_kv(cache, idx), cache[idx])
    assert ref.gather_kv(cache, torch.tensor([], dtype=torch.long)).shape == (0, 2, 8)


@pytest.mark.parametrize("n,p,hq,hkv,d,kind,dtype", [
    (64, 2000, 32, 4, 128, "random", torch.bfloat16),
    (64, 2000, 8, 8, 64, "chain", torch.float32),
    (1, 2000, 16, 2, 128, "chain", torch.float32),
    (33, 1, 8, 1, 64, "wide", torch.bfloat16),
])
def test_hybrid_edge_shapes(n, p, hq, hkv, d, kind, dtype):
    import random

    gen = torch.Generator().manual_seed(n * 7 + p)
    q, kt, vt = rand_qkv(n, n, hq, hkv, d, dtype, gen)
    _, kp, vp = rand_qkv(0, p, hq, hkv, d, dtype, gen)
    tm = tree_mask_from_parents(make_parents(kind, n, random.Random(1)))
    out, lse = hybrid_tree_attention(q, kp, vp, kt, vt, tm, 1.0 / math.sqrt(d), return_lse=True)
    full = torch.cat([torch.ones(n, p, dtype=torch.bool), tm], dim=1)
    ro, rl = naive_attention(q, torch.cat([kp, kt]), torch.cat([vp, vt]), 1.0 / math.sqrt(d), full)
    assert_close_state(out, lse, ro, rl, dtype)


@pytest.mark.parametrize("kind", ["chain", "random"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hybrid_large_square_part_uses_flash_kernel(kind, dtype, monkeypatch):
    """A prefill chunk through hybrid_tree_attention (n large, causal or arbitrary mask)."""
    import random

    monkeypatch.setattr(ref, "_EXPLICIT_MAX_SCORES", 1000)
    n, p = 80, 50
    gen = torch.Generator().manual_seed(n + len(kind))
    q, kt, vt = rand_qkv(n, n, 8, 2, 64, dtype, gen)
    _, kp, vp = rand_qkv(0, p, 8, 2, 64, dtype, gen)
    tm = tree_mask_from_parents(make_parents(kind, n, random.Random(2)))
    out, lse = hybrid_tree_attention(q, kp, vp, kt, vt, tm, 0.125, return_lse=True)
    full = torch.cat([torch.ones(n, p, dtype=torch.bool), tm], dim=1)
    ro, rl = naive_attention(q, torch.cat([kp, kt]), torch.cat([vp, vt]), 0.125, full)
    assert_close_state(out, lse, ro, rl, dtype)


@pytest.mark.parametrize("pack_min_keys", [0, 10**9])  # both CPU flash layouts (packed / broadcast)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", [(8, 8), (8, 2), (16, 2)])
def test_unmasked_layouts_match(pack_min_keys, dtype, heads, monkeypatch):
    monkeypatch.setattr(ref, "_PACK_MIN_KEYS", pack_min_keys)
    hq, hkv = heads
    gen = torch.Generator().manual_seed(hq * 3 + hkv)
    q, k, v = rand_qkv(11, 600, hq, hkv, 64, dtype, gen)
    out, lse = attention_with_lse(q, k, v, 0.125)
    ro, rl = naive_attention(q, k, v, 0.125)
    assert_close_state(out, lse, ro, rl, dtype)
