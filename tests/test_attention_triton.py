"""Triton tree/prefix kernel and HybridTreeVerifyWrapper against the PyTorch reference.

Without CUDA the Triton kernel runs in the Triton interpreter on CPU tensors (small shapes). Triton
3.x needs TRITON_INTERPRET=1 in the environment BEFORE triton is first imported, so this module sets
it at import; if some earlier test module already imported triton in compiled mode, the in-process
tests skip and `test_interpreter_suite_in_subprocess` reruns this file in a fresh interpreter.
FlashInfer tests need CUDA + flashinfer and are skipped otherwise (with the reason shown by -ra).

Tolerances vs the reference (same rounded inputs): float32 out/lse atol 2e-5 / 1e-4;
float16 out atol 4e-3 (fp16 output + fp16 probabilities into P@V), lse 2e-3; bfloat16 (GPU only)
out atol 2e-2, lse 1e-2.
"""

from __future__ import annotations

import os

try:
    import torch as _t

    _HAS_CUDA = _t.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import math
import random
import subprocess
import sys

import pytest
import torch

from flashinfer_ext import reference as ref
from flashinfer_ext.wrapper import HybridTreeVerifyWrapper, flashinfer_available, reference_with_shared_prefix

triton_tree = pytest.importorskip("flashinfer_ext.triton_tree")
if not triton_tree.triton_available():  # pragma: no cover
    pytest.skip("triton is not importable", allow_module_level=True)

INTERP_OK = _HAS_CUDA or triton_tree.interpreter_ready()
needs_kernel = pytest.mark.skipif(
    not INTERP_OK, reason="triton was imported before TRITON_INTERPRET=1 was set (another test module); "
                          "covered by test_interpreter_suite_in_subprocess")
DEVICES = ["cuda"] if _HAS_CUDA else ["cpu"]
# numpy (the interpreter) has no bfloat16: bf16 kernel checks run on a GPU only
KERNEL_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if _HAS_CUDA else [])
TOL = {
    torch.float32: (2e-5, 1e-4),
    torch.float16: (4e-3, 2e-3),
    torch.bfloat16: (2e-2, 1e-2),
}


def tree_mask(parents):
    return ref.tree_mask_from_parents(parents)


def parents_of(kind, n, rnd):
    if n == 0:
        return []
    if kind == "chain":
        return list(range(-1, n - 1))
    if kind == "wide":
        return [-1] + [0] * (n - 1)
    if kind == "star":
        return [-1] * n
    return [-1] + [rnd.randrange(-1, i) for i in range(1, n)]


def make_batch(sizes, hq, hkv, d, dtype, device, seed, kinds=("chain", "wide", "random", "star"),
               contiguous=False):
    """Ragged batch over a shuffled token pool. sizes: [(n_i, P_i)]."""
    rnd = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    slots = sum(n + p for n, p in sizes) + 5
    k_cache = torch.randn(slots, hkv, d, generator=gen).to(dtype)
    v_cache = torch.randn(slots, hkv, d, generator=gen).to(dtype)
    perm = torch.arange(slots) if contiguous else torch.randperm(slots, generator=gen)
    qo, pp, mp, pidx, tidx, masks = [0], [0], [0], [], [], []
    cur = 2
    for i, (n, p) in enumerate(sizes):
        pidx.append(perm[cur:cur + p])
        tidx.append(perm[cur + p:cur + p + n])
        cur += n + p
        masks.append(tree_mask(parents_of(kinds[i % len(kinds)], n, rnd)).reshape(-1))
        qo.append(qo[-1] + n)
        pp.append(pp[-1] + p)
        mp.append(mp[-1] + n * n)
    q = torch.randn(qo[-1], hq, d, generator=gen).to(dtype)
    i32 = dict(dtype=torch.int32)
    b = dict(q=q, k_cache=k_cache, v_cache=v_cache, qo_indptr=torch.tensor(qo, **i32),
             prefix_kv_indices=torch.cat(pidx).to(torch.int32), prefix_kv_indptr=torch.tensor(pp, **i32),
             tree_kv_indices=torch.cat(tidx).to(torch.int32), tree_mask_flat=torch.cat(masks),
             tree_mask_indptr=torch.tensor(mp, dtype=torch.int64))
    return {k: v.to(device) for k, v in b.items()}


def reference_state(b, sm_scale, with_prefix=True):
    """The CPU reference on float32 copies of the same inputs (so only the kernel's error shows)."""
    cpu = {k: v.cpu() for k, v in b.items()}
    f = {k: (v.float() if v.is_floating_point() else v) for k, v in cpu.items()}
    if not with_prefix:
        f["prefix_kv_indices"] = f["prefix_kv_indices"][:0]
        f["prefix_kv_indptr"] = torch.zeros_like(f["prefix_kv_indptr"])
    return ref.batch_hybrid_tree_attention(
        f["q"], f["k_cache"], f["v_cache"], f["qo_indptr"], f["prefix_kv_indices"].long(),
        f["prefix_kv_indptr"], f["tree_kv_indices"].long(), f["tree_mask_flat"], f["tree_mask_indptr"],
        sm_scale, return_lse=True)


def check(out, lse, ref_out, ref_lse, dtype):
    o_tol, l_tol = TOL[dtype]
    out, lse = out.cpu(), lse.cpu()
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(out.float(), ref_out.float(), atol=o_tol, rtol=o_tol)
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), fin)
    torch.testing.assert_close(lse[fin], ref_lse[fin], atol=l_tol, rtol=0)


BATCHES = [
    [(5, 0)],                               # one tree, no prefix
    [(1, 0), (7, 0), (0, 0), (12, 0)],      # ragged, single node, an empty request
    [(16, 0), (3, 0)],
]


# ------------------------------------------------------------------------------ tree kernel
@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (4, 1)])
@pytest.mark.parametrize("sizes", BATCHES, ids=["single", "ragged", "two"])
def test_tree_kernel_matches_reference(device, dtype, heads, sizes):
    hq, hkv = heads
    d = 64
    b = make_batch(sizes, hq, hkv, d, dtype, device, seed=len(sizes) * 31 + hq)
    scale = 1.0 / math.sqrt(d)
    out, lse = triton_tree.tree_attention_with_lse(
        b["q"], b["k_cache"], b["v_cache"], b["qo_indptr"], b["tree_kv_indices"], b["tree_mask_flat"],
        b["tree_mask_indptr"], scale)
    ro, rl = reference_state(b, scale, with_prefix=False)
    check(out, lse, ro.to(dtype), rl, dtype)


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
def test_tree_kernel_wide_tree_head_dim_80_and_base2(device):
    """A 40-node wide tree (several row/column blocks), D=80 (masked head dim), base-2 LSE."""
    b = make_batch([(40, 0), (9, 0)], 4, 2, 80, torch.float32, device, seed=3, kinds=("wide", "random"))
    out, lse2 = triton_tree.tree_attention_with_lse(
        b["q"], b["k_cache"], b["v_cache"], b["qo_indptr"], b["tree_kv_indices"], b["tree_mask_flat"],
        b["tree_mask_indptr"], 0.1, lse_base2=True)
    ro, rl = reference_state(b, 0.1, with_prefix=False)
    check(out, ref.lse_from_base2(lse2), ro, rl, torch.float32)


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
def test_empty_rows_and_empty_batch(device):
    b = make_batch([(4, 0)], 4, 2, 64, torch.float32, device, seed=4)
    m = b["tree_mask_flat"].clone().view(4, 4)
    m[2] = False  # a row that attends to nothing
    out, lse = triton_tree.tree_attention_with_lse(
        b["q"], b["k_cache"], b["v_cache"], b["qo_indptr"], b["tree_kv_indices"], m.reshape(-1),
        b["tree_mask_indptr"], 0.125)
    assert (out[2] == 0).all() and (lse[2] == float("-inf")).all()
    assert torch.isfinite(lse[[0, 1, 3]]).all()
    e = make_batch([(0, 0), (0, 0)], 4, 2, 64, torch.float32, device, seed=5)
    out, lse = triton_tree.tree_attention_with_lse(
        e["q"], e["k_cache"], e["v_cache"], e["qo_indptr"], e["tree_kv_indices"], e["tree_mask_flat"],
        e["tree_mask_indptr"], 0.125)
    assert out.shape == (0, 4, 64) and lse.shape == (0, 4)


# --------------------------------------------------------------------------- prefix / hybrid
@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_prefix_split_kv_matches_reference(device, dtype, num_splits):
    sizes = [(3, 70), (0, 20), (6, 0), (2, 130)]
    b = make_batch(sizes, 8, 2, 64, dtype, device, seed=6)
    out, lse = triton_tree.ragged_attention_with_lse(
        b["q"], b["k_cache"], b["v_cache"], b["qo_indptr"], b["prefix_kv_indptr"], b["prefix_kv_indices"],
        None, None, 0.125, num_splits=num_splits)
    cpu = {k: v.cpu() for k, v in b.items()}
    qo, pp = cpu["qo_indptr"].tolist(), cpu["prefix_kv_indptr"].tolist()
    for i in range(len(sizes)):
        s, e = qo[i], qo[i + 1]
        if e == s:
            continue
        idx = cpu["prefix_kv_indices"][pp[i]:pp[i + 1]].long()
        ro, rl = ref.attention_with_lse(cpu["q"][s:e].float(), cpu["k_cache"][idx].float(),
                                        cpu["v_cache"][idx].float(), 0.125)
        check(out[s:e], lse[s:e], ro.to(dtype), rl, dtype)  # empty prefix: out 0, lse -inf


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_triton_batch_hybrid_matches_reference(device, dtype):
    sizes = [(4, 50), (0, 10), (9, 0), (1, 90)]
    b = make_batch(sizes, 8, 2, 64, dtype, device, seed=7)
    out, lse = triton_tree.triton_batch_hybrid_tree_attention(**b, sm_scale=0.125, return_lse=True,
                                                              num_splits=2)
    ro, rl = reference_state(b, 0.125)
    check(out, lse, ro.to(dtype), rl, dtype)


# --------------------------------------------------------------------------------- wrapper
def _plan(w, b, hq, hkv, d, dtype, **kw):
    w.plan(b["qo_indptr"], b["prefix_kv_indptr"], b["prefix_kv_indices"], b["tree_kv_indices"],
           b["tree_mask_flat"], b["tree_mask_indptr"], num_qo_heads=hq, num_kv_heads=hkv, head_dim=d,
           sm_scale=1.0 / math.sqrt(d), q_data_type=dtype, **kw)


def _shared_layout(b, sizes, groups, shared_lens, seed):
    """Append shared-prefix slots to the pool; groups = number of consecutive requests per group."""
    gen = torch.Generator().manual_seed(seed)
    base = b["k_cache"].shape[0]
    extra = sum(shared_lens)
    hkv, d = b["k_cache"].shape[1:]
    dt, dev = b["k_cache"].dtype, b["k_cache"].device
    b["k_cache"] = torch.cat([b["k_cache"], torch.randn(extra, hkv, d, generator=gen).to(dt).to(dev)])
    b["v_cache"] = torch.cat([b["v_cache"], torch.randn(extra, hkv, d, generator=gen).to(dt).to(dev)])
    qo = b["qo_indptr"].tolist()
    sq, sk, r = [0], [0], 0
    for g in groups:
        r += g
        sq.append(qo[r])
    for L in shared_lens:
        sk.append(sk[-1] + L)
    idx = (base + torch.randperm(extra, generator=gen)).to(torch.int32).to(dev)
    return dict(shared_qo_indptr=torch.tensor(sq, dtype=torch.int32),
                shared_kv_indptr=torch.tensor(sk, dtype=torch.int32), shared_kv_indices=idx)


def test_wrapper_torch_backend_matches_reference_and_shared_prefix():
    sizes = [(5, 40), (3, 0), (0, 7), (8, 25), (2, 11)]
    hq, hkv, d = 8, 2, 64
    for dtype in (torch.float32, torch.bfloat16):
        b = make_batch(sizes, hq, hkv, d, dtype, "cpu", seed=8)
        w = HybridTreeVerifyWrapper()
        assert w.backend == "torch"
        _plan(w, b, hq, hkv, d, dtype)
        out, lse = w.run(b["q"], (b["k_cache"], b["v_cache"]), return_lse=True)
        ro, rl = ref.batch_hybrid_tree_attention(**b, sm_scale=1.0 / math.sqrt(d), return_lse=True)
        assert torch.equal(out, ro) and torch.equal(lse, rl)
        # the combined [num_slots, 2, Hkv, D] cache form gives the same result
        out2 = w.run(b["q"], torch.stack([b["k_cache"], b["v_cache"]], dim=1))
        assert torch.equal(out2, out)
        # shared prefix (cascade level 0): groups of 2, 2, 1 requests; the last group has none
        sh = _shared_layout(b, sizes, [2, 2, 1], [30, 17, 0], seed=9)
        w2 = HybridTreeVerifyWrapper()
        _plan(w2, b, hq, hkv, d, dtype, **sh)
        out, lse = w2.run(b["q"], (b["k_cache"], b["v_cache"]), return_lse=True)
        ro = reference_with_shared_prefix(**b, sm_scale=1.0 / math.sqrt(d), **sh)
        tol = 2e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out.float(), ro.float(), atol=tol, rtol=tol)
        assert torch.isfinite(lse).all()


def test_wrapper_rejects_bad_plans():
    b = make_batch([(3, 5), (2, 4)], 4, 2, 64, torch.float32, "cpu", seed=10)
    w = HybridTreeVerifyWrapper()
    with pytest.raises(ValueError):
        w.plan(b["qo_indptr"], b["prefix_kv_indptr"], b["prefix_kv_indices"], b["tree_kv_indices"],
               b["tree_mask_flat"], torch.tensor([0, 9, 12]), 4, 2, 64)  # wrong mask sizes
    with pytest.raises(ValueError):  # a request straddling two shared groups
        _plan(w, b, 4, 2, 64, torch.float32, shared_qo_indptr=[0, 2, 5], shared_kv_indptr=[0, 1, 2],
              shared_kv_indices=torch.tensor([0, 1]))
    with pytest.raises(RuntimeError):
        HybridTreeVerifyWrapper().run(b["q"], (b["k_cache"], b["v_cache"]))


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
def test_wrapper_triton_backend_matches_torch_backend(device):
    sizes = [(5, 40), (3, 0), (0, 7), (6, 25)]
    hq, hkv, d = 8, 2, 64
    dtype = torch.float32
    b = make_batch(sizes, hq, hkv, d, dtype, device, seed=11)
    sh = _shared_layout(b, sizes, [2, 2], [20, 9], seed=12)
    w = HybridTreeVerifyWrapper(backend="triton", device=device)
    _plan(w, b, hq, hkv, d, dtype, num_splits=2, **sh)
    out, lse = w.run(b["q"], (b["k_cache"], b["v_cache"]), return_lse=True)
    cpu = {k: v.cpu() for k, v in b.items()}
    wt = HybridTreeVerifyWrapper()
    _plan(wt, cpu, hq, hkv, d, dtype, **{k: v.cpu() for k, v in sh.items()})
    ro, rl = wt.run(cpu["q"], (cpu["k_cache"], cpu["v_cache"]), return_lse=True)
    check(out, lse, ro, rl, dtype)


# ----------------------------------------------------------------------- FlashInfer (CUDA only)
def _need_flashinfer():
    if not torch.cuda.is_available():
        pytest.skip("FlashInfer path needs a CUDA GPU (none here); CPU runs use the torch reference")
    if not flashinfer_available():
        pytest.skip("FlashInfer path needs the flashinfer package (pip install flashinfer-python)")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shared", [False, True])
def test_flashinfer_wrapper_matches_reference(dtype, shared):
    _need_flashinfer()
    sizes = [(16, 3000), (1, 0), (0, 100), (64, 700), (8, 1)]
    hq, hkv, d = 32, 8, 128
    b = make_batch(sizes, hq, hkv, d, dtype, "cuda", seed=13)
    sh = _shared_layout(b, sizes, [2, 3], [1000, 0], seed=14) if shared else {}
    w = HybridTreeVerifyWrapper(torch.empty(128 << 20, dtype=torch.uint8, device="cuda"))
    assert w.backend == "flashinfer"
    _plan(w, b, hq, hkv, d, dtype, **sh)
    out, lse = w.run(b["q"], (b["k_cache"], b["v_cache"]), return_lse=True)
    cpu = {k: v.cpu() for k, v in b.items()}
    wt = HybridTreeVerifyWrapper()
    f = {k: (v.float() if v.is_floating_point() else v) for k, v in cpu.items()}
    _plan(wt, f, hq, hkv, d, torch.float32, **{k: v.cpu() for k, v in sh.items()})
    ro, rl = wt.run(f["q"], (f["k_cache"], f["v_cache"]), return_lse=True)
    check(out, lse, ro.to(dtype), rl, dtype)


# ---------------------------------------------------------------- interpreter isolation fallback
@pytest.mark.skipif(INTERP_OK, reason="the interpreter tests ran in this process")
def test_interpreter_suite_in_subprocess():
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
