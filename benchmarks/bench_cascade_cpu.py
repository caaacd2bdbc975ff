"""CPU micro-benchmark: the cascade (shared-prefix) level of the longspec_cpu backend.

A decode or verify batch of N requests that share L slots of KV (what SGLang's radix cache gives a
fleet of agents over one system prompt and repository) plus R slots of their own. For each (mode,
N, L, layout) it times one layer's attention through the real backend (init_forward_metadata +
forward_decode / forward_extend on a stand-in model runner) with the shared level off
(LONGSPEC_CASCADE_MIN_SHARED=0: every request reads the shared run itself) and on (the group's
rows read it once), on the embedded model's shape (9 query heads, 3 KV heads of 64, float32), and
prints the ratio. The smallest L at which the shared level pays is the backend's threshold.

    python -m benchmarks.bench_cascade_cpu --out benchmarks/results/cascade_cpu
    python -m benchmarks.bench_cascade_cpu --fleet 4 --shared 256 2048 --reps 3     # quick
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from sgl_longspec.verify.layout import VerifyLayout

HQ, HKV, D = 9, 3, 64  # SmolLM2-135M-Instruct
OWN = 64  # slots of each request's own (recent turns) beyond the shared run
TREE = 8  # verify: draft-tree size per request


class _Pool:
    def __init__(self, k, v):
        self.k, self.v = k, v

    def get_key_buffer(self, layer_id):
        return self.k

    def get_value_buffer(self, layer_id):
        return self.v

    def set_kv_buffer(self, layer, loc, k, v):
        self.k[loc.loc] = k.view(-1, *self.k.shape[1:])
        self.v[loc.loc] = v.view(-1, *self.v.shape[1:])


def time_cell(attn, mode: str, n_req: int, shared: int, scattered: bool, min_shared: int, reps: int) -> float:
    """ms per layer-call of the backend's attention."""
    from sglang.srt.layers.radix_attention import AttentionType
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    attn.CASCADE_MIN_SHARED = min_shared
    rng = random.Random(0)
    new = 1 if mode == "decode" else TREE
    slots = shared + n_req * (OWN + new) + 1
    order = list(range(1, slots))
    if scattered:
        rng.shuffle(order)
    it = iter(order)
    run = [next(it) for _ in range(shared)]
    width = shared + OWN + new
    req_to_token = torch.zeros(n_req + 1, width, dtype=torch.int32)
    news = []
    for r in range(1, n_req + 1):
        own = [next(it) for _ in range(OWN + new)]
        req_to_token[r] = torch.tensor(run + own, dtype=torch.int32)
        news.append(own[OWN:])
    g = torch.Generator().manual_seed(0)
    k = torch.randn(slots, HKV, D, generator=g)
    v = torch.randn(slots, HKV, D, generator=g)
    runner = SimpleNamespace(device="cpu", req_to_token_pool=SimpleNamespace(req_to_token=req_to_token),
                             token_to_kv_pool=_Pool(k, v))
    backend = attn.LongSpecCPUAttnBackend(runner)
    rows = torch.arange(1, n_req + 1)
    if mode == "decode":
        seq = torch.full((n_req,), width)
        fb = SimpleNamespace(forward_mode=ForwardMode.DECODE, encoder_lens=None, req_pool_indices=rows,
                             seq_lens=seq, seq_lens_cpu=seq, out_cache_loc=torch.tensor([o[-1] for o in news]))
    else:
        seq = torch.full((n_req,), shared + OWN)
        tri = torch.ones(new, new, dtype=torch.bool).tril()
        fb = SimpleNamespace(forward_mode=ForwardMode.TARGET_VERIFY, encoder_lens=None, req_pool_indices=rows,
                             seq_lens=seq, seq_lens_cpu=seq, out_cache_loc=torch.tensor([x for o in news for x in o]),
                             spec_info=SimpleNamespace(layout=VerifyLayout([tri] * n_req, seq.tolist())))
    layer = SimpleNamespace(tp_q_head_num=HQ, tp_k_head_num=HKV, qk_head_dim=D, v_head_dim=D,
                            scaling=D ** -0.5, layer_id=0, is_cross_attention=False,
                            attn_type=AttentionType.DECODER, sliding_window_size=None, logit_cap=0)
    q = torch.randn(n_req * new, HQ * D, generator=g)
    kn, vn = torch.randn(n_req * new, HKV * D, generator=g), torch.randn(n_req * new, HKV * D, generator=g)
    backend.init_forward_metadata(fb)
    fwd = backend.forward_decode if mode == "decode" else backend.forward_extend
    fwd(q, kn, vn, layer, fb, save_kv_cache=False)  # warm-up
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fwd(q, kn, vn, layer, fb, save_kv_cache=False)
        best = min(best, time.perf_counter() - t0)
    return 1e3 * best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", nargs="+", default=["decode", "verify"])
    ap.add_argument("--fleet", nargs="+", type=int, default=[2, 4, 8, 16])
    ap.add_argument("--shared", nargs="+", type=int, default=[32, 64, 128, 256, 512, 1024, 4096, 7168])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    from sgl_longspec import cpu

    cpu.prepare_environment()
    from sgl_longspec.attention import cpu_hybrid as attn

    torch.set_num_threads(2)
    rows = []
    print(f"{'mode':7s} {'N':>3s} {'shared':>6s} {'layout':9s} {'off ms':>8s} {'on ms':>8s} {'speedup':>8s}")
    for mode in args.modes:
        for n in args.fleet:
            for shared in args.shared:
                for scattered in (False, True):
                    off = time_cell(attn, mode, n, shared, scattered, 0, args.reps)
                    on = time_cell(attn, mode, n, shared, scattered, 1, args.reps)
                    lay = "scattered" if scattered else "contig"
                    rows.append({"mode": mode, "requests": n, "shared": shared, "layout": lay,
                                 "off_ms": off, "on_ms": on, "speedup": off / on})
                    print(f"{mode:7s} {n:3d} {shared:6d} {lay:9s} {off:8.3f} {on:8.3f} {off / on:7.2f}x",
                          flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        cmd = "python -m benchmarks.bench_cascade_cpu " + shlex.join(argv if argv is not None else sys.argv[1:])
        (args.out / "results.json").write_text(json.dumps({"command": cmd, "rows": rows}, indent=1))
        lines = [f"# Cascade level of the longspec_cpu backend, one layer (SmolLM2-135M shape, float32)\n",
                 f"Command: `{cmd}`\n", "Each request also has 64 slots of its own; verify trees of 8. "
                 "ms per layer-call, best of reps; off = every request reads the shared run, on = the "
                 "group reads it once.\n",
                 "| mode | requests | shared | layout | off ms | on ms | speedup |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['mode']} | {r['requests']} | {r['shared']} | {r['layout']} | {r['off_ms']:.3f} | "
                  f"{r['on_ms']:.3f} | {r['speedup']:.2f}x |" for r in rows]
        (args.out / "README.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
