"""sgl_longspec.cpu.ops (pure-torch sgl_kernel CPU ops) against plain Python-loop references, and
the CPU attention backend's verify planning for both NGRAM custom-mask layouts.

The references follow the contracts of SGLang's Triton/CUDA twins of each op
(sglang/kernels/ops/speculative/*.py, srt/mem_cache/allocation.py, kernels/ops/kvcache/cache_move.py).
"""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest
import torch

from sgl_longspec.cpu import ops
from sgl_longspec.verify.layout import VerifyLayout

SEEDS = list(range(12))


def _rand_segments(rng: random.Random, bs: int, pool_len: int, max_len: int):
    start, end = [], []
    for _ in range(bs):
        s = rng.randrange(0, pool_len)
        e = min(pool_len, s + rng.randrange(0, max_len + 1))  # empty segments included
        start.append(s)
        end.append(e)
    return torch.tensor(start, dtype=torch.int64), torch.tensor(end, dtype=torch.int64)


# ------------------------------------------------------------ req_to_token / cache locations


@pytest.mark.parametrize("seed", SEEDS)
def test_assign_req_to_token_pool_cpu(seed):
    rng = random.Random(seed)
    n_rows, pool_len, bs = rng.randint(4, 12), rng.randint(8, 64), rng.randint(1, 4)
    req_to_token = torch.randint(0, 10_000, (n_rows, pool_len), dtype=torch.int32,
                                 generator=torch.Generator().manual_seed(seed))
    rows = torch.tensor(rng.sample(range(n_rows), bs), dtype=torch.int64)
    start, end = _rand_segments(rng, bs, pool_len, 20)
    total = int((end - start).sum())
    out_cache_loc = torch.randint(0, 1 << 20, (total + rng.randint(0, 5),), dtype=torch.int64)

    expect = req_to_token.clone()
    k = 0
    for i in range(bs):
        for c in range(int(start[i]), int(end[i])):
            expect[rows[i], c] = int(out_cache_loc[k])
            k += 1

    ops.assign_req_to_token_pool_cpu(rows, req_to_token, start, end, out_cache_loc, pool_len)
    assert torch.equal(req_to_token, expect)


@pytest.mark.parametrize("seed", SEEDS)
def test_assign_extend_cache_locs_cpu(seed):
    rng = random.Random(seed)
    n_rows, pool_len, bs = rng.randint(4, 12), rng.randint(8, 64), rng.randint(1, 4)
    req_to_token = torch.randint(0, 10_000, (n_rows, pool_len), dtype=torch.int32,
                                 generator=torch.Generator().manual_seed(seed))
    rows = torch.tensor([rng.randrange(n_rows) for _ in range(bs)], dtype=torch.int64)
    start, end = _rand_segments(rng, bs, pool_len, 12)
    total = int((end - start).sum())
    out = torch.full((total + rng.randint(0, 6),), -7, dtype=torch.int64)

    expect = out.clone()
    k = 0
    for i in range(bs):
        for c in range(int(start[i]), int(end[i])):
            expect[k] = int(req_to_token[rows[i], c])
            k += 1

    ops.assign_extend_cache_locs_cpu(rows, req_to_token, start, end, out, pool_len)
    assert torch.equal(out, expect)  # the tail past the packed slices is untouched


def test_assign_ops_empty_batch():
    req_to_token = torch.zeros(2, 4, dtype=torch.int32)
    empty = torch.zeros(0, dtype=torch.int64)
    ops.assign_req_to_token_pool_cpu(empty, req_to_token, empty, empty, empty, 4)
    ops.assign_extend_cache_locs_cpu(empty, req_to_token, empty, empty, empty, 4)
    assert not req_to_token.any()


@pytest.mark.parametrize("seed", SEEDS)
def test_fill_accept_out_cache_loc_cpu(seed):
    rng = random.Random(seed)
    bs, width = rng.randint(1, 5), rng.randint(1, 8)
    n = bs * width
    # accepted entries first, -1 padding after (SGLang's layout), plus arbitrary -1 holes
    accept_index = torch.full((bs, width), -1, dtype=torch.int32)
    for b in range(bs):
        k = rng.randint(1, width)
        accept_index[b, :k] = torch.tensor(rng.sample(range(n), k), dtype=torch.int32)
        if seed % 3 == 0 and k > 1:
            accept_index[b, rng.randrange(k)] = -1
    out_cache_loc = torch.randint(0, 1 << 20, (n,), dtype=torch.int64)
    dst = torch.full((n + 2,), -5, dtype=torch.int64)

    expect = dst.clone()
    flat = accept_index.reshape(-1).tolist()
    for pid, src in enumerate(flat):  # the Triton kernel's per-element formula
        if src > -1:
            expect[sum(1 for x in flat[:pid] if x != -1)] = int(out_cache_loc[src])

    ops.fill_accept_out_cache_loc_cpu(accept_index, out_cache_loc, dst)
    assert torch.equal(dst, expect)


@pytest.mark.parametrize("seed", SEEDS)
def test_fill_bonus_tokens_cpu(seed):
    rng = random.Random(seed)
    bs, stride = rng.randint(1, 6), rng.randint(1, 9)
    accept_tokens = torch.randint(0, 50_000, (bs, stride), dtype=torch.int64)
    accept_lens = torch.tensor([rng.randint(1, stride) for _ in range(bs)], dtype=torch.int32)
    bonus = torch.full((bs + 1,), -1, dtype=torch.int64)

    expect = bonus.clone()
    for i in range(bs):
        expect[i] = int(accept_tokens.reshape(-1)[stride * i + int(accept_lens[i]) - 1])

    ops.fill_bonus_tokens_cpu(accept_tokens, accept_lens, bonus, stride)
    assert torch.equal(bonus, expect)


# ------------------------------------------------------------ draft trees


def _random_tree_mask(rng: random.Random, n: int) -> tuple[list[int], list[list[int]]]:
    """A random draft tree in NGRAM's layout: node 0 is the root (last committed token), every
    node's parent has a smaller index; mask[i][j] = 1 iff j is i or an ancestor of i."""
    parent = [-1] + [rng.randrange(0, i) for i in range(1, n)]
    mask = [[0] * n for _ in range(n)]
    for i in range(n):
        j = i
        while j != -1:
            mask[i][j] = 1
            j = parent[j]
    return parent, mask


def _reconstruct_reference(mask, seq_len, n):
    """The op's contract written as loops (see sglang reconstruct_tree.py docstring)."""
    anc = [[bool(mask[i][j]) and j < i for j in range(n)] for i in range(n)]
    positions = [sum(anc[i]) + seq_len for i in range(n)]
    parent = [max((j for j in range(n) if anc[i][j]), default=-1) for i in range(n)]
    next_token = [min((k for k in range(n) if anc[k][t]), default=-1) for t in range(n)]
    next_sib = []
    for t in range(n):
        if parent[t] < 0:
            next_sib.append(-1)
        else:
            next_sib.append(min((k for k in range(t + 1, n) if parent[k] == parent[t]),
                                default=-1))
    return positions, next_token, next_sib


def _run_reconstruct(masks, seq_lens, n, mask_dtype=torch.bool):
    bs = len(masks)
    tree_mask = torch.tensor(masks, dtype=mask_dtype).reshape(-1)
    positions = torch.full((bs * n,), -9, dtype=torch.int64)
    r_index = torch.full((bs, n), -9, dtype=torch.int64)
    r_next = torch.full((bs, n), -9, dtype=torch.int64)
    r_sib = torch.full((bs, n), -9, dtype=torch.int64)
    ops.reconstruct_indices_from_tree_mask(tree_mask, torch.tensor(seq_lens, dtype=torch.int64),
                                           positions, r_index, r_next, r_sib, bs, n)
    return positions, r_index, r_next, r_sib


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", ["tree", "arbitrary"])
def test_reconstruct_indices_from_tree_mask(seed, shape):
    rng = random.Random(seed)
    bs, n = rng.randint(1, 4), rng.choice([1, 2, 4, 8, 9])
    masks = []
    for _ in range(bs):
        if shape == "tree":
            masks.append(_random_tree_mask(rng, n)[1])
        else:  # any 0/1 matrix: the op's formulas must hold regardless
            masks.append([[rng.random() < 0.4 for _ in range(n)] for _ in range(n)])
    seq_lens = [rng.randint(1, 500) for _ in range(bs)]
    positions, r_index, r_next, r_sib = _run_reconstruct(masks, seq_lens, n,
                                                         torch.bool if seed % 2 else torch.uint8)
    for b in range(bs):
        pos, nxt, sib = _reconstruct_reference(masks[b], seq_lens[b], n)
        assert positions.view(bs, n)[b].tolist() == pos
        assert r_index[b].tolist() == [b * n + i for i in range(n)]
        assert r_next[b].tolist() == nxt
        assert r_sib[b].tolist() == sib


def test_reconstruct_chain_and_star():
    n = 5
    chain = [[1 if j <= i else 0 for j in range(n)] for i in range(n)]
    star = [[1 if j in (0, i) else 0 for j in range(n)] for i in range(n)]
    positions, _, r_next, r_sib = _run_reconstruct([chain, star], [10, 20], n)
    assert positions.tolist() == [10, 11, 12, 13, 14, 20, 21, 21, 21, 21]
    assert r_next.tolist() == [[1, 2, 3, 4, -1], [1, -1, -1, -1, -1]]
    assert r_sib.tolist() == [[-1] * 5, [-1, 2, 3, 4, -1]]


def _greedy_path_reference(parent, cand, target, num_spec):
    """Accepted nodes of a tree, from explicit parent links: starting at the root, move to the
    smallest-index child whose draft token equals the target's prediction at the current node."""
    n = len(parent)
    children = [[k for k in range(n) if parent[k] == u] for u in range(n)]
    path = [0]
    while len(path) < num_spec:
        want = target[path[-1]]
        nxt = next((c for c in children[path[-1]] if cand[c] == want), None)
        if nxt is None:
            break
        path.append(nxt)
    return path


@pytest.mark.parametrize("seed", SEEDS)
def test_verify_tree_greedy_cpu(seed):
    rng = random.Random(seed)
    bs, n = rng.randint(1, 4), rng.choice([2, 4, 8])
    num_spec = rng.randint(2, n)  # accept_index width (SGLang uses n)
    vocab = rng.choice([2, 3, 5])  # small vocabulary: plenty of matches and sibling choices
    parents, masks, cands, targets = [], [], [], []
    for _ in range(bs):
        parent, mask = _random_tree_mask(rng, n)
        parents.append(parent)
        masks.append(mask)
        cands.append([rng.randrange(vocab) for _ in range(n)])
        targets.append([rng.randrange(vocab) for _ in range(n)])
    _, r_index, r_next, r_sib = _run_reconstruct(masks, [7] * bs, n)

    candidates = torch.tensor(cands, dtype=torch.int64)
    target_predict = torch.tensor(targets, dtype=torch.int64)
    predicts = torch.full((bs * n,), -1, dtype=torch.int32)
    accept_index = torch.full((bs, num_spec), -1, dtype=torch.int32)
    accept_num = torch.full((bs,), -1, dtype=torch.int32)
    ops.verify_tree_greedy_cpu(predicts, accept_index, accept_num, candidates, r_index, r_next,
                               r_sib, target_predict)

    exp_predicts = [-1] * (bs * n)
    for b in range(bs):
        path = _greedy_path_reference(parents[b], cands[b], targets[b], num_spec)
        assert accept_num[b].item() == len(path) - 1
        assert accept_index[b].tolist() == [b * n + u for u in path] + [-1] * (num_spec - len(path))
        for u in path:  # every accepted node (and the last one, for the bonus token)
            exp_predicts[b * n + u] = targets[b][u]
    assert predicts.tolist() == exp_predicts


def test_verify_tree_greedy_cpu_sibling_choice():
    # root -> {1: 'a', 2: 'b'}; 2 -> {3: 'c'}; target says 'b' after the root, then 'c', then 'z'
    parent = [-1, 0, 0, 2]
    mask = [[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 1]]
    _, r_index, r_next, r_sib = _run_reconstruct([mask], [3], 4)
    a, b, c, z = 10, 11, 12, 13
    candidates = torch.tensor([[99, a, b, c]])
    target = torch.tensor([[b, z, c, z]])
    predicts = torch.full((4,), -1, dtype=torch.int64)
    accept_index = torch.full((1, 4), -1, dtype=torch.int64)
    accept_num = torch.zeros(1, dtype=torch.int64)
    ops.verify_tree_greedy_cpu(predicts, accept_index, accept_num, candidates, r_index, r_next,
                               r_sib, target)
    assert accept_num.tolist() == [2]
    assert accept_index.tolist() == [[0, 2, 3, -1]]
    assert predicts.tolist() == [b, -1, c, z]
    assert _greedy_path_reference(parent, [99, a, b, c], [b, z, c, z], 4) == [0, 2, 3]


# ------------------------------------------------------------ KV copy through raw pointers


@pytest.mark.parametrize("seed", SEEDS[:6])
def test_copy_all_layer_kv_cache_cpu(seed):
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    slots = rng.randint(8, 40)
    shapes = [(slots, 3, 64), (slots, 2, 16), (slots, 1, 8)]
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    bufs = [torch.randn(s, generator=g).to(dt) for s, dt in zip(shapes, dtypes)]
    bufs.append(torch.randint(0, 255, (slots, 24), dtype=torch.uint8, generator=g))
    orig = [b.clone() for b in bufs]

    k = rng.randint(1, slots // 2)
    tgt = rng.sample(range(slots), k)  # distinct targets; sources may overlap the targets
    src = [rng.randrange(slots) for _ in range(k)]
    data_ptrs = torch.tensor([b.data_ptr() for b in bufs], dtype=torch.uint64)
    strides = torch.tensor([b.stride(0) * b.element_size() for b in bufs], dtype=torch.int64)
    ops.copy_all_layer_kv_cache_cpu(data_ptrs, strides, torch.tensor(tgt, dtype=torch.int64),
                                    torch.tensor(src, dtype=torch.int32))

    for b, o in zip(bufs, orig):
        expect = o.clone()
        for t, s in zip(tgt, src):
            expect[t] = o[s]  # all reads before writes (the GPU kernel is safe in place)
        assert torch.equal(b.view(torch.uint8), expect.view(torch.uint8))


def test_copy_all_layer_kv_cache_cpu_noop():
    buf = torch.arange(12, dtype=torch.float32).view(4, 3)
    before = buf.clone()
    ptrs = torch.tensor([buf.data_ptr()], dtype=torch.uint64)
    strides = torch.tensor([12], dtype=torch.int64)
    empty = torch.zeros(0, dtype=torch.int64)
    ops.copy_all_layer_kv_cache_cpu(ptrs, strides, empty, empty)
    ops.copy_all_layer_kv_cache_cpu(ptrs, strides, torch.tensor([2]), torch.tensor([2]))
    assert torch.equal(buf, before)


def test_eagle_only_ops_raise_clearly():
    with pytest.raises(NotImplementedError, match="build_tree_kernel_efficient_cpu"):
        ops.build_tree_kernel_efficient_cpu()


# ------------------------------------------------------------ CPU attention backend (verify plan)


@pytest.fixture(scope="module")
def attn():
    pytest.importorskip("sglang")
    from sgl_longspec import cpu

    cpu.prepare_environment()
    from sgl_longspec.attention import cpu_hybrid as attention

    return attention


def _ngram_masks(rng, bs, n):
    return [torch.tensor(_random_tree_mask(rng, n)[1], dtype=torch.bool) for _ in range(bs)]


def _cpu_layout(masks):
    """NGRAM on CPU: one flat [bs * n * n] tree mask."""
    return torch.stack(masks).reshape(-1)


def _full_mask_layout(masks, seq_lens):
    """NGRAM's GPU FULL_MASK layout: per request [n, seq_len + n], prefix columns all true."""
    return torch.cat([torch.cat([torch.ones(m.shape[0], s, dtype=torch.bool), m], 1).reshape(-1)
                      for m, s in zip(masks, seq_lens)])


@pytest.mark.parametrize("seed", range(4))
def test_verify_layout_both_ngram_layouts(attn, seed):
    rng = random.Random(seed)
    bs, n = rng.randint(1, 4), rng.choice([1, 4, 8])
    seq_lens = [rng.randint(1, 50) for _ in range(bs)]
    masks = _ngram_masks(rng, bs, n)
    for flat in (_cpu_layout(masks), _full_mask_layout(masks, seq_lens)):
        spec = SimpleNamespace(draft_token_num=n, custom_mask=flat)
        q_lens, got = attn._verify_layout(spec, seq_lens)
        assert q_lens == [n] * bs
        assert len(got) == bs
        for g_, m in zip(got, masks):
            assert g_.dtype == torch.bool and torch.equal(g_, m)
    # LONGSPEC's compact ragged masks are passed through
    ragged = [torch.ones(k, k, dtype=torch.bool).tril() for k in (3, 1, 5)[:bs]]
    layout = VerifyLayout(ragged, list(seq_lens[: len(ragged)]))
    q_lens, got = attn._verify_layout(SimpleNamespace(layout=layout), seq_lens[: len(ragged)])
    assert q_lens == [m.shape[0] for m in ragged]
    assert all(g_ is m for g_, m in zip(got, ragged))


class _FakeKVPool:
    def __init__(self, k, v):
        self.k, self.v = k, v

    def get_key_buffer(self, layer_id):
        return self.k

    def get_value_buffer(self, layer_id):
        return self.v

    def set_kv_buffer(self, layer, loc, k, v):
        idx = loc.loc
        self.k[idx] = k.view(-1, *self.k.shape[1:])
        self.v[idx] = v.view(-1, *self.v.shape[1:])


def _dense_reference(q, k_all, v_all, allowed, scale):
    """q [n, Hq, D], k/v [m, Hkv, D], allowed [n, m] -> softmax attention in float64."""
    hq, hkv = q.shape[1], k_all.shape[1]
    rep = hq // hkv
    k_all = k_all.double().repeat_interleave(rep, 1)
    v_all = v_all.double().repeat_interleave(rep, 1)
    s = torch.einsum("nhd,mhd->hnm", q.double(), k_all) * scale
    s = s.masked_fill(~allowed[None], -math.inf)
    return torch.einsum("hnm,mhd->nhd", torch.softmax(s, -1), v_all)


@pytest.mark.parametrize("layout", ["cpu", "full_mask"])
@pytest.mark.parametrize("max_keys,single,moved", [(0, 0, False), (12, 2, False), (1536, 3, False),
                                                   (1536, 0, True)])
def test_backend_target_verify_plan_and_output(attn, monkeypatch, layout, max_keys, single, moved):
    """init_forward_metadata + forward_extend in TARGET_VERIFY mode on a fake model runner: the
    draft tokens attend to the whole committed prefix (scattered KV slots included) and to their
    tree ancestors only, for both NGRAM mask layouts, whether a request takes one attention call
    over its whole KV (prefix + draft keys <= max_keys: the requests of 9 and 7 keys at 12, all three
    at 1536) or the split path (the one of 15 keys at 12; all at 0; all when the draft KV was
    written to other slots than its req_to_token row's, `moved`)."""
    monkeypatch.setattr(attn, "VERIFY_SINGLE_PASS_MAX_KEYS", max_keys)
    from sglang.srt.layers.radix_attention import AttentionType
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    rng = random.Random(1)
    torch.manual_seed(0)
    hq, hkv, d, n, slots = 4, 2, 16, 4, 256
    seq_lens = [5, 11, 3]
    bs = len(seq_lens)
    req_to_token = torch.zeros(8, 64, dtype=torch.int32)
    free = list(range(1, slots))
    rng.shuffle(free)
    rows = [6, 2, 4]
    for r, s in zip(rows, seq_lens):
        if r == 2:  # one contiguous request (zero-copy path), the others scattered
            base = 200
            req_to_token[r, : s + n] = torch.arange(base, base + s + n, dtype=torch.int32)
            free = [x for x in free if not base <= x < base + s + n]
        else:
            req_to_token[r, : s + n] = torch.tensor([free.pop() for _ in range(s + n)],
                                                    dtype=torch.int32)
    k_cache = torch.randn(slots, hkv, d)
    v_cache = torch.randn(slots, hkv, d)
    pool = _FakeKVPool(k_cache, v_cache)
    runner = SimpleNamespace(device="cpu", req_to_token_pool=SimpleNamespace(req_to_token=req_to_token),
                             token_to_kv_pool=pool)
    backend = attn.LongSpecCPUAttnBackend(runner)

    masks = _ngram_masks(rng, bs, n)
    flat = _cpu_layout(masks) if layout == "cpu" else _full_mask_layout(masks, seq_lens)
    out_cache_loc = torch.cat([req_to_token[r, s: s + n] for r, s in zip(rows, seq_lens)]).long()
    if moved:
        out_cache_loc = torch.tensor([free.pop() for _ in range(bs * n)], dtype=torch.int64)
    fb = SimpleNamespace(
        forward_mode=ForwardMode.TARGET_VERIFY, encoder_lens=None, out_cache_loc=out_cache_loc,
        req_pool_indices=torch.tensor(rows), seq_lens=torch.tensor(seq_lens),
        seq_lens_cpu=torch.tensor(seq_lens),
        spec_info=SimpleNamespace(draft_token_num=n, custom_mask=flat))
    before = dict(attn.VERIFY_PATH_COUNTS)
    backend.init_forward_metadata(fb)
    plan = backend.plan
    assert attn.VERIFY_PATH_COUNTS["single_pass"] - before["single_pass"] == single
    assert attn.VERIFY_PATH_COUNTS["split"] - before["split"] == bs - single
    assert len(plan.single_pass) == single
    assert plan.mode == "verify" and plan.q_lens == [n] * bs
    assert [p.length for p in plan.prefix] == seq_lens
    assert plan.prefix[1].index is None  # contiguous slots -> zero-copy slice
    assert all(torch.equal(a, b) for a, b in zip(plan.masks, masks))

    layer = SimpleNamespace(tp_q_head_num=hq, tp_k_head_num=hkv, qk_head_dim=d, v_head_dim=d,
                            scaling=d ** -0.5, layer_id=0, is_cross_attention=False,
                            attn_type=AttentionType.DECODER, sliding_window_size=None, logit_cap=0)
    q = torch.randn(bs * n, hq * d)
    k_new = torch.randn(bs * n, hkv * d)
    v_new = torch.randn(bs * n, hkv * d)
    out = backend.forward_extend(q, k_new, v_new, layer, fb).view(bs * n, hq, d)

    for b, (r, s) in enumerate(zip(rows, seq_lens)):
        slots_b = req_to_token[r, : s + n].long()
        new_b = slice(b * n, (b + 1) * n)
        assert torch.equal(k_cache[out_cache_loc[new_b]], k_new[new_b].view(n, hkv, d))
        allowed = torch.cat([torch.ones(n, s, dtype=torch.bool), masks[b]], 1)
        keys = torch.cat([k_cache[slots_b[:s]], k_new[new_b].view(n, hkv, d)])
        values = torch.cat([v_cache[slots_b[:s]], v_new[new_b].view(n, hkv, d)])
        ref = _dense_reference(q[new_b].view(n, hq, d), keys, values, allowed, d ** -0.5)
        torch.testing.assert_close(out[new_b].double(), ref, atol=2e-5, rtol=1e-4)
