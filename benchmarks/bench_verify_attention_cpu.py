"""CPU micro-benchmark: hybrid tree attention vs dense-masked verify attention (one layer, one request).

For each (context P, tree size n, dtype) it times the verify-pass attention of n draft-tree queries:

- hybrid:     flashinfer_ext.reference.hybrid_tree_attention (prefix without mask + tree with mask,
              merged by LSE);
- dense:      flashinfer_ext.reference.dense_tree_verify_attention: concat K/V, build the dense
              [n, P + n] mask, one masked attention (blocked CPU flash kernel with an additive mask);
- sdpa_dense: torch scaled_dot_product_attention with a boolean [n, P + n] mask and enable_gqa,
              which is what a plain PyTorch backend does for a verify pass;
- single_pass: what the longspec_cpu backend does for a short verify request
              (VERIFY_SINGLE_PASS_MAX_KEYS): one scaled_dot_product_attention over K/V that already
              lie in one run of cache slots (prefix then draft), under an additive [n, P + n] mask
              made once per step (neither is timed).

Usage:
    python benchmarks/bench_verify_attention_cpu.py                       # full table
    python benchmarks/bench_verify_attention_cpu.py --contexts 1024 --trees 8 --reps 2   # quick
    python benchmarks/bench_verify_attention_cpu.py --save benchmarks/results/verify_attention_cpu
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from flashinfer_ext.reference import (  # noqa: E402
    dense_tree_verify_attention, hybrid_tree_attention, tree_mask_from_parents)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def random_tree_mask(n: int, seed: int) -> torch.Tensor:
    rnd = random.Random(seed)
    parents = [-1] + [rnd.randrange(0, i) for i in range(1, n)]  # a tree rooted at node 0
    return tree_mask_from_parents(parents)


def sdpa_dense(q, kp, vp, kt, vt, tm, scale):
    n, p = q.shape[0], kp.shape[0]
    mask = torch.ones(n, p + n, dtype=torch.bool)
    mask[:, p:] = tm
    k = torch.cat([kp, kt]).transpose(0, 1)  # [Hkv, P+n, D]
    v = torch.cat([vp, vt]).transpose(0, 1)
    o = F.scaled_dot_product_attention(q.transpose(0, 1), k, v, attn_mask=mask, scale=scale,
                                       enable_gqa=True)
    return o.transpose(0, 1)


def single_pass_inputs(kp, vp, kt, vt, tm):
    """K/V as the cache holds them for a request whose draft slots follow its prefix (one run),
    and the additive mask the backend plans once per step."""
    n, p = tm.shape[0], kp.shape[0]
    bias = torch.zeros(n, p + n, dtype=kp.dtype)
    bias[:, p:].masked_fill_(~tm, float("-inf"))
    k = torch.cat([kp, kt]).transpose(0, 1)  # [Hkv, P+n, D]
    v = torch.cat([vp, vt]).transpose(0, 1)
    return k, v, bias


def single_pass(q, k, v, bias, scale):
    o = F.scaled_dot_product_attention(q.transpose(0, 1), k, v, attn_mask=bias, scale=scale,
                                       enable_gqa=True)
    return o.transpose(0, 1)


def time_interleaved(fns: dict, reps: int) -> dict:
    """Min wall time and min process CPU time (ms) of each fn over reps rounds.

    The methods take turns inside each round, so that load from other processes on a shared
    machine hits all of them alike, and min filters it out. CPU time (all threads of this process)
    counts work, not waiting for a core, so its ratios are the more stable on a loaded machine.
    """
    for fn in fns.values():
        fn()  # warm-up
    wall = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    out = {f"{k}_ms": min(v) * 1e3 for k, v in wall.items()}
    out.update({f"{k}_cpu_ms": min(v) * 1e3 for k, v in cpu.items()})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--trees", type=int, nargs="+", default=[8, 16, 64])
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    ap.add_argument("--heads", type=int, nargs=2, default=[32, 8], metavar=("HQ", "HKV"),
                    help="query / kv heads (default: Llama-3.1-8B, one layer)")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5, help="timed rounds (min is reported), after 1 warm-up")
    ap.add_argument("--no-sdpa", action="store_true", help="skip the torch SDPA dense baseline")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    ap.add_argument("--save", default="", help="folder to write results.json and results.md into")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    hq, hkv = args.heads
    d = args.head_dim
    scale = 1.0 / math.sqrt(d)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for dname in args.dtypes:
        dt = DTYPES[dname]
        for p in args.contexts:
            kp = torch.randn(p, hkv, d, generator=gen).to(dt)
            vp = torch.randn(p, hkv, d, generator=gen).to(dt)
            for n in args.trees:
                q = torch.randn(n, hq, d, generator=gen).to(dt)
                kt = torch.randn(n, hkv, d, generator=gen).to(dt)
                vt = torch.randn(n, hkv, d, generator=gen).to(dt)
                tm = random_tree_mask(n, n)
                fns = {"hybrid": lambda: hybrid_tree_attention(q, kp, vp, kt, vt, tm, scale),
                       "dense": lambda: dense_tree_verify_attention(q, kp, vp, kt, vt, tm, scale)}
                if not args.no_sdpa:
                    fns["sdpa_dense"] = lambda: sdpa_dense(q, kp, vp, kt, vt, tm, scale)
                k1, v1, bias = single_pass_inputs(kp, vp, kt, vt, tm)
                fns["single_pass"] = lambda: single_pass(q, k1, v1, bias, scale)
                r = dict(dtype=dname, P=p, n=n, **time_interleaved(fns, args.reps))
                rows.append(r)
                print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}),
                      flush=True)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    head = (f"CPU verify attention, one layer: Hq={hq} Hkv={hkv} D={d}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
            f"min of {args.reps} interleaved rounds, 1-min load average at the end {load:.1f}; "
            f"wall = elapsed ms, cpu = process CPU ms (all threads)")
    meths = ["hybrid", "dense"] + ([] if args.no_sdpa else ["sdpa_dense"]) + ["single_pass"]
    cols = ["dtype", "P", "n"] + [f"{m} wall" for m in meths] + [f"{m} cpu" for m in meths]
    cols += [f"{m}/hybrid wall" for m in meths[1:]] + [f"{m}/hybrid cpu" for m in meths[1:]]
    lines = [head, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [r["dtype"], str(r["P"]), str(r["n"])]
        cells += [f"{r[m + '_ms']:.2f}" for m in meths] + [f"{r[m + '_cpu_ms']:.2f}" for m in meths]
        cells += [f"{r[m + '_ms'] / r['hybrid_ms']:.2f}x" for m in meths[1:]]
        cells += [f"{r[m + '_cpu_ms'] / r['hybrid_cpu_ms']:.2f}x" for m in meths[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print()
    print(table)
    if args.save:
        os.makedirs(args.save, exist_ok=True)
        with open(os.path.join(args.save, "results.json"), "w") as f:
            json.dump(dict(config=dict(vars(args), torch=torch.__version__,
                                       threads=torch.get_num_threads()), rows=rows), f, indent=1)
        with open(os.path.join(args.save, "results.md"), "w") as f:
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
