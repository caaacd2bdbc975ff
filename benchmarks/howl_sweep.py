"""Offline replay: suffix only vs OWL only vs HOWL hybrid at several thresholds, on one recording.

The target (default: SmolLM2-135M-Instruct, float32, Hugging Face transformers) decodes each prompt
greedily once, recording the hidden state behind every generated token
(`sgl_longspec.training.owl_evaluate.greedy_record`). The replay then walks each generation the way the
LONGSPEC worker would: at every step the suffix index (prompt + output so far, plus the global tree
of earlier outputs) and the OWL drafter (from the recorded hidden state) each propose a draft, the
policy picks one, and greedy verification accepts the longest path of the draft that matches the
recorded continuation; the step advances by accepted + 1 (the bonus token). tau = generated tokens
/ steps. The same recording serves every policy, so the comparison is exact and cheap.

Policies: suffix only; OWL only; HOWL(T): the suffix draft when its score >= T, else the OWL tree
(sgl_longspec.step.router.Router.pick). Workloads: code edit (return a stdlib function with a rename),
tool-call JSON, ShareGPT chat, long single-turn prompts (1K/2K/4K/8K tokens, 2 each).

    .venv/bin/python -m benchmarks.howl_sweep [--new-tokens 96] [--out benchmarks/results/howl]
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
import time
from pathlib import Path

import torch

from sgl_longspec.drafters.draft import Draft
from sgl_longspec.training import owl_data, owl_prompts
from sgl_longspec.drafters.owl import shipped_checkpoint
from sgl_longspec.training.owl_evaluate import greedy_record, long_prompt_ids
from sgl_longspec.drafters.owl.checkpoint import load_drafter
from sgl_longspec.training.owl_train import load_target
from sgl_longspec.step.router import Router, RouterConfig
from sgl_longspec.drafters.suffix_index import SuffixIndex, SuffixIndexConfig

THRESHOLDS = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
MAX_SPEC = 15


def prompts(tok, n_per: int, seed: int = 0, long_lengths=(1024, 2048, 4096, 8192),
            n_long: int = 2) -> dict[str, list[list[int]]]:
    rng = random.Random(seed)
    files = [p for p in owl_prompts.stdlib_files() if 2_000 < p.stat().st_size < 200_000]
    rng.shuffle(files)
    code = []
    for p in files[: n_per]:
        lines = p.read_text(encoding="utf-8", errors="replace").splitlines()
        start = rng.randrange(0, max(1, len(lines) - 30))
        snippet = "\n".join(lines[start:start + 25])
        code.append(owl_data.chat_ids(tok, "Return this code unchanged except that every `self` is "
                                      f"renamed to `this`:\n\n{snippet}", 10**9))
    tools = []
    for i in range(n_per):
        calls = [json.dumps({"name": rng.choice(["read_file", "grep", "list_dir"]),
                             "arguments": {"path": f"src/mod{rng.randrange(50)}.py", "line": rng.randrange(400)}})
                 for _ in range(4)]
        tools.append(owl_data.chat_ids(tok, "Earlier tool calls:\n" + "\n".join(calls) +
                                       "\nEmit the same tool calls again, one JSON per line.", 10**9))
    chat = []
    for conv in owl_prompts.sharegpt_conversations(200)[: n_per * 5: 5]:
        first = next((t.get("value") for t in conv if t.get("from") == "human"), "") or "Hello"
        chat.append(owl_data.chat_ids(tok, first[:2000], 10**9))
    out = {"code_edit": code, "tool_json": tools, "chat": chat}
    # long single-turn prompts: per length, alternately a ShareGPT summary and a stdlib code question
    for j, n in enumerate(long_lengths):
        out[f"long[{n // 1024}K]"] = [long_prompt_ids(tok, n, 2 * j + k) for k in range(n_long)]
    return out


def accepted_len(draft: Draft, truth: list[int]) -> int:
    """Longest root-to-node path of the draft whose tokens equal truth[0:depth]."""
    best, depth_ok = 0, {-1: 0}
    for i, (tok, par) in enumerate(zip(draft.token_ids.tolist(), draft.parents.tolist())):
        d = depth_ok.get(par)
        if d is None or d >= len(truth) or truth[d] != tok:
            continue
        depth_ok[i] = d + 1
        best = max(best, d + 1)
    return best


def replay(rec: dict, prompt: list[int], index: SuffixIndex, drafter, rid: str) -> list[dict]:
    """Per step (position t), the suffix and OWL drafts' accepted lengths and the suffix score."""
    gen = rec["gen"].tolist()
    index.start_request(rid, prompt + gen[:1])
    rows, t = [], 1
    hid = rec["hidden"].float()
    while t < len(gen):
        truth = gen[t:]
        s = index.speculate(rid, max_spec_tokens=MAX_SPEC, max_tree_nodes=MAX_SPEC)
        o = drafter.draft_tree(hid[t - 1: t], [gen[t - 1]], top_k=2, max_nodes=8)[0] if drafter else Draft.empty()
        rows.append({"t": t, "s_score": float(s.score) if len(s) else 0.0,
                     "s_acc": accepted_len(s, truth) if len(s) else 0, "s_len": len(s),
                     "o_score": float(o.score) if len(o) else 0.0,
                     "o_acc": accepted_len(o, truth) if len(o) else 0, "o_len": len(o)})
        t += 1  # per-position record; the policies' walks are computed from it
        index.extend(rid, gen[t - 1: t])
    index.finish_request(rid)
    return rows


def walk(rows: list[dict], n_gen: int, choose) -> tuple[int, int, int]:
    """(steps, tokens, drafted tokens) of a policy over one generation's per-position record."""
    by_t = {r["t"]: r for r in rows}
    t, steps, drafted = 1, 0, 0
    while t < n_gen:
        r = by_t[t]
        kind = choose(r)
        acc = r[f"{kind}_acc"] if kind else 0
        drafted += r[f"{kind}_len"] if kind else 0
        t += acc + 1
        steps += 1
    return steps, n_gen - 1, drafted


def policies() -> dict:
    out = {"suffix": lambda r: "s" if r["s_len"] else None,
           "owl": lambda r: "o" if r["o_len"] else None}
    for th in THRESHOLDS:
        router = Router(RouterConfig(howl_threshold=th))

        def pick(r, router=router):
            s = Draft.chain([0] * r["s_len"], score=r["s_score"]) if r["s_len"] else None
            o = Draft.chain([0] * r["o_len"], score=r["o_score"]) if r["o_len"] else None
            d = router.pick(s, o)
            return None if not len(d) else ("s" if d is s else "o")

        out[f"howl@{th:g}"] = pick
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", default=None)
    ap.add_argument("--drafter", default=None, help="OWL checkpoint (default: the shipped one)")
    ap.add_argument("--per-workload", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--long-lengths", default="1024,2048,4096,8192", help="long single-turn prompt lengths")
    ap.add_argument("--per-length", type=int, default=2, help="long prompts per length")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/howl")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    _, tok, model = load_target(args.model_path, "cpu", "float32")
    drafter = load_drafter(args.drafter or shipped_checkpoint(), model.get_input_embeddings(),
                           model.get_output_embeddings(), device="cpu")
    index = SuffixIndex(SuffixIndexConfig(max_spec_tokens=MAX_SPEC, max_tree_nodes=MAX_SPEC))
    records: dict[str, list] = {}
    lengths = [int(x) for x in args.long_lengths.split(",") if x]
    for wl, plist in prompts(tok, args.per_workload, long_lengths=lengths, n_long=args.per_length).items():
        for i, p in enumerate(plist):
            rec = greedy_record(model, p, args.new_tokens, "cpu")
            rows = replay(rec, p, index, drafter, f"{wl}-{i}")
            records.setdefault(wl, []).append((len(rec["gen"]), rows))
            print(f"[howl] {wl} {i}: prompt {len(p)} tokens, {time.time() - t0:.0f} s", flush=True)
    pols = policies()
    table = {}
    groups = list(records.items())
    groups.append(("long", [r for k, v in records.items() if k.startswith("long[") for r in v]))
    groups.append(("mixed", [r for v in records.values() for r in v]))
    for wl, recs in groups:
        for name, choose in pols.items():
            steps = tokens = drafted = 0
            for n_gen, rows in recs:
                s, tk, dr = walk(rows, n_gen, choose)
                steps, tokens, drafted = steps + s, tokens + tk, drafted + dr
            table.setdefault(wl, {})[name] = {"tau": round(tokens / max(steps, 1), 3),
                                               "drafted_per_step": round(drafted / max(steps, 1), 2)}
    names = list(pols)
    md = (f"Command: `python -m benchmarks.howl_sweep {shlex.join(sys.argv[1:] if argv is None else argv)}`\n\n"
          "tau (tokens per verify step incl. the bonus token), greedy replay of one recording per "
          f"prompt, {args.new_tokens} new tokens, {args.per_workload} prompt(s) per workload\n\n"
          "| workload | " + " | ".join(names) + " |\n|---|" + "---|" * len(names) + "\n")
    for wl, row in table.items():
        best_single = max(row["suffix"]["tau"], row["owl"]["tau"])
        md += f"| {wl} | " + " | ".join(
            f"{row[n]['tau']:.2f}" + (f" ({row[n]['tau'] / best_single:.2f}x)" if n.startswith("howl") else "")
            for n in names) + " |\n"
    md += ("\n(x) = HOWL tau over the better single drafter on that workload. `long` pools the "
           "long[*] prompts; `mixed` pools every prompt.\n")
    print(md)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "howl_sweep.md").write_text(md)
    (out / "howl_sweep.json").write_text(json.dumps({"table": table, "seconds": time.time() - t0}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
