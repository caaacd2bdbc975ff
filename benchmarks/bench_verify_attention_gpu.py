"""GPU benchmark: verify-pass attention (one layer) at long context, hybrid tree attention vs baselines.

For each (batch B, context P, tree size n) it times one layer's attention for B requests, each with
P committed tokens and an n-token draft tree, on a token-indexed KV pool (page size 1, SGLang's
layout):

- hybrid      HybridTreeVerifyWrapper, backend flashinfer: prefix via FlashInfer paged prefill
              (no mask, return_lse) + Triton tree kernel + flashinfer.merge_state;
- hybrid_tri  the same wrapper, backend triton (prefix with the Triton split-KV kernel);
- dense       (a) FlashInfer BatchPrefillWithPagedKVCacheWrapper with a custom mask over
              [n, P + n] per request: what SGLang's NGRAM verify does today;
- decode      (b) one decode step's attention at the same context: FlashInfer
              BatchDecodeWithPagedKVCacheWrapper, one query per request over P + 1 keys.

With --shared-frac F > 0, the first F*P tokens of every request's context are one shared prefix
(agent traffic): hybrid then plans it as a cascade level that all B requests read once, while dense
and decode still see it as part of each request's pages.

Reports the median of --reps CUDA-event timings after --warmup runs, plan() times (once per
verify step, host side), and max |hybrid - dense| as a correctness check. Prints a table last.

    python benchmarks/bench_verify_attention_gpu.py --dry-run            # tiny, CPU, checks the script
    python benchmarks/bench_verify_attention_gpu.py --save benchmarks/results/verify_attention_gpu
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from flashinfer_ext import reference as ref  # noqa: E402
from flashinfer_ext.wrapper import HybridTreeVerifyWrapper, flashinfer_available  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def tree_mask(n: int, rnd: random.Random) -> torch.Tensor:
    parents = [-1] + [rnd.randrange(0, i) for i in range(1, n)]
    return ref.tree_mask_from_parents(parents)


class Case:
    """One (B, P, n) problem laid out in a token pool."""

    def __init__(self, bs, ctx, n, hq, hkv, d, dtype, device, shared_frac, seed=0):
        g = torch.Generator(device="cpu").manual_seed(seed)
        rnd = random.Random(seed)
        shared = int(ctx * shared_frac) if bs > 1 else 0
        uniq = ctx - shared
        slots = shared + bs * (uniq + n)
        if device.type == "cuda":  # generate on the device: the pool can be tens of GiB
            torch.cuda.manual_seed(seed)
            self.k = torch.randn(slots, hkv, d, dtype=dtype, device=device)
            self.v = torch.randn(slots, hkv, d, dtype=dtype, device=device)
        else:
            self.k = torch.randn(slots, hkv, d, generator=g).to(dtype)
            self.v = torch.randn(slots, hkv, d, generator=g).to(dtype)
        self.q = torch.randn(bs * n, hq, d, generator=g).to(dtype).to(device)
        self.q_dec = torch.randn(bs, hq, d, generator=g).to(dtype).to(device)
        # slot layout: [shared | req0 unique | req0 tree | req1 unique | req1 tree | ...]
        shared_idx = torch.arange(shared)
        pre, tre, full = [], [], []
        cur = shared
        for _ in range(bs):
            u = torch.arange(cur, cur + uniq)
            t = torch.arange(cur + uniq, cur + uniq + n)
            cur += uniq + n
            pre.append(u)
            tre.append(t)
            full.append(torch.cat([shared_idx, u, t]))
        masks = [tree_mask(n, rnd) for _ in range(bs)]
        i32 = dict(dtype=torch.int32)
        self.bs, self.ctx, self.n, self.shared = bs, ctx, n, shared
        self.hq, self.hkv, self.d, self.dtype, self.device = hq, hkv, d, dtype, device
        self.qo_indptr = torch.arange(0, bs * n + 1, n, **i32)
        self.tree_idx = torch.cat(tre).to(torch.int32)
        self.tree_mask_flat = torch.cat([m.reshape(-1) for m in masks])
        self.tree_mask_indptr = torch.arange(0, bs * n * n + 1, n * n, dtype=torch.int64)
        if shared:
            # hybrid sees the shared part as its own level; its per-request prefix is the unique part
            self.prefix_idx = torch.cat(pre).to(torch.int32)
            self.prefix_indptr = torch.arange(0, bs * uniq + 1, uniq, **i32) if uniq else torch.zeros(bs + 1, **i32)
            self.shared_kw = dict(shared_qo_indptr=torch.tensor([0, bs * n], **i32),
                                  shared_kv_indptr=torch.tensor([0, shared], **i32),
                                  shared_kv_indices=shared_idx.to(torch.int32))
        else:
            self.prefix_idx = torch.cat(pre).to(torch.int32)
            self.prefix_indptr = torch.arange(0, bs * uniq + 1, uniq, **i32)
            self.shared_kw = {}
        # dense baseline: one page list [prefix (shared + unique) | tree] per request + custom mask
        self.full_idx = torch.cat(full).to(torch.int32)
        self.full_indptr = torch.arange(0, bs * (ctx + n) + 1, ctx + n, **i32)
        self.dense_mask = torch.cat([torch.cat([torch.ones(n, ctx, dtype=torch.bool), m], 1).reshape(-1)
                                     for m in masks])
        # decode baseline: one query per request over its P committed tokens + itself
        self.dec_idx = torch.cat([torch.cat([shared_idx, p, t[:1]]) for p, t in zip(pre, tre)]).to(torch.int32)
        self.dec_indptr = torch.arange(0, bs * (ctx + 1) + 1, ctx + 1, **i32)
        self.scale = 1.0 / math.sqrt(d)

    def kv_bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


# ------------------------------------------------------------------------------------- methods
def make_hybrid(c: Case, backend: str, workspace):
    w = HybridTreeVerifyWrapper(workspace, backend=backend, device=c.device)
    dev = c.device

    def plan():
        w.plan(c.qo_indptr.to(dev), c.prefix_indptr.to(dev), c.prefix_idx.to(dev), c.tree_idx.to(dev),
               c.tree_mask_flat.to(dev), c.tree_mask_indptr.to(dev), c.hq, c.hkv, c.d, c.scale,
               q_data_type=c.dtype, **{k: v.to(dev) for k, v in c.shared_kw.items()})

    return plan, lambda: w.run(c.q, (c.k, c.v))


def make_dense_flashinfer(c: Case, workspace):
    import flashinfer

    w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD")
    dev = c.device
    paged = (c.k.unsqueeze(1), c.v.unsqueeze(1))

    def plan():
        w.plan(qo_indptr=c.qo_indptr.to(dev), paged_kv_indptr=c.full_indptr.to(dev),
               paged_kv_indices=c.full_idx.to(dev),
               paged_kv_last_page_len=torch.ones(c.bs, dtype=torch.int32, device=dev),
               num_qo_heads=c.hq, num_kv_heads=c.hkv, head_dim_qk=c.d, page_size=1,
               custom_mask=c.dense_mask.to(dev), causal=False, sm_scale=c.scale,
               q_data_type=c.dtype, kv_data_type=c.dtype)

    return plan, lambda: w.run(c.q, paged)


def make_decode_flashinfer(c: Case, workspace):
    import flashinfer

    w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD", use_tensor_cores=c.hq != c.hkv)
    dev = c.device
    paged = (c.k.unsqueeze(1), c.v.unsqueeze(1))

    def plan():
        w.plan(c.dec_indptr.to(dev), c.dec_idx.to(dev), torch.ones(c.bs, dtype=torch.int32, device=dev),
               c.hq, c.hkv, c.d, 1, q_data_type=c.dtype, kv_data_type=c.dtype, sm_scale=c.scale)

    return plan, lambda: w.run(c.q_dec, paged)


def make_dense_torch(c: Case):
    """Fallback dense path (no FlashInfer): the reference with a dense [n, P + n] mask per request."""
    qo, fp = c.qo_indptr.tolist(), c.full_indptr.tolist()

    def run():
        out = torch.empty_like(c.q)
        for i in range(c.bs):
            idx = c.full_idx[fp[i]:fp[i + 1]].to(c.device).long()
            mask = c.dense_mask[i * c.n * (c.ctx + c.n):(i + 1) * c.n * (c.ctx + c.n)].view(c.n, c.ctx + c.n)
            out[qo[i]:qo[i + 1]], _ = ref.attention_with_lse(c.q[qo[i]:qo[i + 1]], c.k[idx], c.v[idx], c.scale,
                                                             mask=mask.to(c.device))
        return out

    return (lambda: None), run


def make_decode_torch(c: Case):
    dp = c.dec_indptr.tolist()

    def run():
        out = torch.empty_like(c.q_dec)
        for i in range(c.bs):
            idx = c.dec_idx[dp[i]:dp[i + 1]].to(c.device).long()
            out[i:i + 1], _ = ref.attention_with_lse(c.q_dec[i:i + 1], c.k[idx], c.v[idx], c.scale)
        return out

    return (lambda: None), run


# -------------------------------------------------------------------------------------- timing
def time_fn(fn, reps: int, warmup: int, cuda: bool) -> float:
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
        ts = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b))
        return statistics.median(ts)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def time_host(fn, cuda: bool) -> float:
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, nargs="+", default=[8192, 16384, 32768, 65536, 131072])
    ap.add_argument("--trees", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16, 32])
    ap.add_argument("--heads", type=int, nargs=2, default=[32, 8], metavar=("HQ", "HKV"),
                    help="default Llama-3.1-8B (one layer)")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--shared-frac", type=float, default=0.0,
                    help="fraction of each context that is one prefix shared by the whole batch")
    ap.add_argument("--methods", nargs="+", default=["hybrid", "hybrid_tri", "dense", "decode"])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--max-kv-gib", type=float, default=40.0, help="skip cases whose KV pool is larger")
    ap.add_argument("--dry-run", action="store_true",
                    help="tiny sizes on CPU (torch backend; Triton only under TRITON_INTERPRET=1)")
    ap.add_argument("--save", default="", help="folder for results.json / results.md")
    args = ap.parse_args(argv)

    if args.dry_run:
        device = torch.device("cpu")
        args.contexts, args.trees, args.batch = [64, 256], [4, 8], [1, 3]
        args.heads, args.head_dim, args.reps, args.warmup = [4, 2], 64, 2, 1
        if args.dtype == "bf16":
            args.dtype = "fp32"
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: use --dry-run on CPU", file=sys.stderr)
            return 2
        device = torch.device("cuda")
    cuda = device.type == "cuda"
    have_fi = cuda and flashinfer_available()
    methods = list(args.methods)
    if "hybrid_tri" in methods and not cuda:
        from flashinfer_ext.triton_tree import interpreter_ready

        if not interpreter_ready():
            methods.remove("hybrid_tri")
            print("(dry run: hybrid_tri skipped; set TRITON_INTERPRET=1 to run the Triton kernel "
                  "in the interpreter)")
    if cuda and not have_fi:
        print("WARNING: flashinfer not importable: 'hybrid' uses the Triton backend, dense/decode use "
              "the slow PyTorch fallback", file=sys.stderr)
    hq, hkv = args.heads
    dt = DTYPES[args.dtype]
    workspace = torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device=device) if cuda else None
    rows = []
    for bs in args.batch:
        for ctx in args.contexts:
            for n in args.trees:
                est = 2 * (ctx + n) * bs * hkv * args.head_dim * dt.itemsize / 2**30
                if est > args.max_kv_gib:
                    print(f"skip B={bs} P={ctx} n={n}: KV pool {est:.1f} GiB > --max-kv-gib")
                    continue
                c = Case(bs, ctx, n, hq, hkv, args.head_dim, dt, device, args.shared_frac)
                r = dict(B=bs, P=ctx, n=n, shared=c.shared)
                outs = {}
                for m in methods:
                    if m == "hybrid":
                        plan, run = make_hybrid(c, "flashinfer" if have_fi else ("triton" if cuda else "torch"),
                                                workspace)
                    elif m == "hybrid_tri":
                        plan, run = make_hybrid(c, "triton", workspace)
                    elif m == "dense":
                        plan, run = make_dense_flashinfer(c, workspace) if have_fi else make_dense_torch(c)
                    elif m == "decode":
                        plan, run = make_decode_flashinfer(c, workspace) if have_fi else make_decode_torch(c)
                    else:
                        raise SystemExit(f"unknown method {m}")
                    try:
                        r[f"{m}_plan_ms"] = time_host(plan, cuda)
                        outs[m] = run()
                        r[f"{m}_ms"] = time_fn(run, args.reps, args.warmup, cuda)
                    except Exception as e:  # keep going: one failing method must not lose the table
                        r[f"{m}_error"] = f"{type(e).__name__}: {e}"[:300]
                        print(f"  {m} failed: {r[f'{m}_error']}", file=sys.stderr)
                for m in ("hybrid", "hybrid_tri"):
                    if m in outs and "dense" in outs:
                        r[f"{m}_maxdiff"] = (outs[m].float() - outs["dense"].float()).abs().max().item()
                rows.append(r)
                print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}),
                      flush=True)
                del c, outs
                if cuda:
                    torch.cuda.empty_cache()

    dev_name = torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu"
    head = (f"verify attention, one layer, Hq={hq} Hkv={hkv} D={args.head_dim} {args.dtype}, "
            f"shared_frac={args.shared_frac}, device={dev_name}, torch {torch.__version__}, "
            f"flashinfer={'yes' if have_fi else 'no'}, median of {args.reps}"
            + (" [DRY RUN: tiny CPU sizes, timings meaningless]" if args.dry_run else ""))

    def cell(r, k, fmt="{:.3f}"):
        return fmt.format(r[k]) if k in r else ("ERR" if k.replace("_ms", "_error") in r else "-")

    def ratio(r, a, b):
        return f"{r[a] / r[b]:.2f}x" if a in r and b in r and r[b] > 0 else "-"

    cols = ["B", "P", "n", "hybrid ms", "hybrid_tri ms", "dense ms", "decode ms", "dense/hybrid",
            "hybrid/decode", "max|hyb-dense|"]
    lines = [head, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join([
            str(r["B"]), str(r["P"]), str(r["n"]), cell(r, "hybrid_ms"), cell(r, "hybrid_tri_ms"),
            cell(r, "dense_ms"), cell(r, "decode_ms"), ratio(r, "dense_ms", "hybrid_ms"),
            ratio(r, "hybrid_ms", "decode_ms"), cell(r, "hybrid_maxdiff", "{:.2e}")]) + " |")
    table = "\n".join(lines)
    print()
    print(table)
    if args.save:
        os.makedirs(args.save, exist_ok=True)
        tag = f"_shared{args.shared_frac:g}" if args.shared_frac else ""
        with open(os.path.join(args.save, f"results{tag}.json"), "w") as f:
            json.dump(dict(config=vars(args), device=dev_name, torch=torch.__version__,
                           flashinfer=have_fi, rows=rows), f, indent=1)
        with open(os.path.join(args.save, f"results{tag}.md"), "w") as f:
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
