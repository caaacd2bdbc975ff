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
(sgl_longspec.step.router.Router.pick); and `oracle`, the bound: at each step the recorded draft
that is accepted furthest. With shapes (issue 30): each drafter proposes several
shapes at every position (suffix: a chain and a tree of the same node budget; OWL: a chain and
trees of width 2 and 3) and a real Router, one record per request fed by the walk's outcomes,
picks as the LONGSPEC controller does: Router.better_shape per drafter, Router.pick between them,
Router.plan_batch's pruning, Router.observe with the tree's side nodes. Its step cost model is the
router's prior (a verify token costs COST_PER_TOKEN of a plain step), so the table also gives
tau per cost (tokens over the steps' costs, 1 + COST_PER_TOKEN x verified tokens each).
Workloads: code edit (return a stdlib function with a rename), tool-call JSON, ShareGPT chat, long
single-turn prompts (1K/2K/4K/8K tokens, 2 each).

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
from typing import Optional

import numpy as np
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
SHAPE_THRESHOLDS = [1.0, 1.5, 2.0]
MAX_SPEC = 15
# A verify token's cost relative to a plain decode step: the router's own prior (StepCostModel
# prior_token_cost), the figure it prices drafts with before it has measured any step.
COST_PER_TOKEN = 0.05
# OWL shapes (top_k, max_nodes): a chain, today's tree (width 2), a wider one.
OWL_SHAPES = {"o1": (1, 8), "o2": (2, 8), "o3": (3, 15)}


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


def accepted_nodes(draft: Draft, truth: list[int]) -> np.ndarray:
    """Bool [n]: the nodes on the longest accepted path (what greedy verification keeps)."""
    depth_ok, best = {-1: 0}, -1
    for i, (tok, par) in enumerate(zip(draft.token_ids.tolist(), draft.parents.tolist())):
        d = depth_ok.get(par)
        if d is None or d >= len(truth) or truth[d] != tok:
            continue
        depth_ok[i] = d + 1
        if best < 0 or d + 1 > depth_ok[best]:
            best = i
    on = np.zeros(len(draft), dtype=bool)
    while best >= 0:
        on[best] = True
        best = int(draft.parents[best])
    return on


def position_row(t: int, truth: list[int], drafts: dict[str, Draft]) -> dict:
    """One position's record: each named draft, with its score, accepted length and size."""
    row = {"t": t, "truth": truth, "drafts": drafts}
    for name, d in drafts.items():
        row[f"{name}_score"] = float(d.score) if len(d) else 0.0
        row[f"{name}_acc"] = accepted_len(d, truth) if len(d) else 0
        row[f"{name}_len"] = len(d)
    return row


def replay(rec: dict, prompt: list[int], index: SuffixIndex, drafter, rid: str) -> list[dict]:
    """Per step (position t): every shape's draft of each drafter, its accepted length, and the
    truth (the recorded continuation)."""
    gen = rec["gen"].tolist()
    index.start_request(rid, prompt + gen[:1])
    rows, t = [], 1
    hid = rec["hidden"].float()
    while t < len(gen):
        truth = gen[t:]
        drafts = {"s": index.speculate(rid, max_spec_tokens=MAX_SPEC, max_tree_nodes=MAX_SPEC),
                  "st": index.speculate(rid, max_spec_tokens=MAX_SPEC, max_tree_nodes=MAX_SPEC,
                                        use_tree=True)}
        for name, (k, n) in OWL_SHAPES.items():
            drafts[name] = (drafter.draft_tree(hid[t - 1: t], [gen[t - 1]], top_k=k, max_nodes=n)[0]
                            if drafter else Draft.empty())
        rows.append(position_row(t, truth[:MAX_SPEC + 1], drafts))
        t += 1  # per-position record; the policies' walks are computed from it
        index.extend(rid, gen[t - 1: t])
    index.finish_request(rid)
    return rows


def walk(rows: list[dict], n_gen: int, choose) -> tuple[int, int, int, dict]:
    """(steps, tokens, drafted tokens, verified shapes) of a policy over one generation's
    per-position record. `choose(row)` returns the name of a recorded draft (or None), or a
    Draft it made itself (then `choose.observe(draft, accepted nodes)` learns the outcome)."""
    by_t = {r["t"]: r for r in rows}
    t, steps, drafted, shapes = 1, 0, 0, {"chain": 0, "tree": 0, "none": 0}
    while t < n_gen:
        r = by_t[t]
        kind = choose(r)
        if isinstance(kind, Draft):
            on = accepted_nodes(kind, r["truth"]) if len(kind) else np.zeros(0, dtype=bool)
            acc, n = int(on.sum()), len(kind)
            choose.observe(kind, on)
            shapes[kind.shape if n else "none"] += 1
        else:
            acc = r[f"{kind}_acc"] if kind else 0
            n = r[f"{kind}_len"] if kind else 0
            shapes[r["drafts"][kind].shape if kind and n else "none"] += 1
        drafted += n
        t += acc + 1
        steps += 1
    return steps, n_gen - 1, drafted, shapes


class ShapePolicy:
    """The LONGSPEC controller's choice for one request, replayed: a Router of its own whose step
    cost model is its prior (COST_PER_TOKEN), fed each step's outcome. The drafters offer the
    shapes named (default: every recorded shape; FIXED_SHAPES: today's, a suffix chain and OWL's
    width-2 tree, so that the router's other decisions (calibration, pruning, backoff) are the
    same in both and the difference is the shape choice)."""

    FIXED_SHAPES = (("s",), ("o2",))

    def __init__(self, threshold: float, suffix_shapes=("s", "st"), owl_shapes=tuple(OWL_SHAPES)):
        self.suffix_shapes, self.owl_shapes = suffix_shapes, owl_shapes
        self.router = Router(RouterConfig(howl_threshold=threshold, max_draft_tokens=MAX_SPEC))
        for tokens in (1, 2, 4, 8, 16, 1, 9, 17):  # a plain step costs 1, a verify token 0.05
            self.router.observe_step(1, tokens, 1.0 + COST_PER_TOKEN * tokens, tokens > 1)
        self.rid = "r"

    def __call__(self, r: dict) -> Draft:
        d = r["drafts"]
        wants = {src: self.router.wants_source(self.rid, src, 1, MAX_SPEC) for src in ("suffix", "owl")}
        suffix = (self.router.better_shape(self.rid, [d[k] for k in self.suffix_shapes], 1)
                  if wants["suffix"] else Draft.empty())
        owl = (self.router.better_shape(self.rid, [d[k] for k in self.owl_shapes], 1)
               if wants["owl"] else Draft.empty())
        picked = self.router.pick(suffix if len(suffix) else None, owl if len(owl) else None,
                                  self.rid)
        return self.router.plan_batch([self.rid], [picked], budget=MAX_SPEC)[0]

    def observe(self, d: Draft, on: np.ndarray) -> None:
        if not len(d):
            return
        side = None
        if d.shape == "tree":
            off = d.side_mask()
            side = (int(off.sum()), int((on & off).sum()), float(d.probs[off].sum()))
        self.router.observe(self.rid, len(d), int(on.sum()), expected=float(d.probs.sum()),
                            source=d.source, side=side)


class OraclePlan:
    """The bound, not a policy: the fewest steps through one generation when each step may verify
    any of the recorded drafts (either drafter, any shape) or none, knowing the continuation
    (shortest path by dynamic programming over positions; ties: fewer draft tokens). No choice
    among these drafts, per request or per step, can beat its tau."""

    SHAPES = ("s", "st", *OWL_SHAPES)

    def __init__(self, rows: list[dict], n_gen: int):
        by_t = {r["t"]: r for r in rows}
        best = {t: (0, 0) for t in range(n_gen, n_gen + MAX_SPEC + 2)}  # (steps, tokens) to the end
        self.choice = {}
        for t in range(n_gen - 1, 0, -1):
            r = by_t[t]
            options = [((best[t + 1][0] + 1, best[t + 1][1]), None)]
            for k in self.SHAPES:
                nxt = t + r[f"{k}_acc"] + 1
                steps, tokens = best[min(nxt, n_gen)]
                options.append(((steps + 1, tokens + r[f"{k}_len"]), k))
            best[t], self.choice[t] = min(options, key=lambda o: o[0])

    def __call__(self, r: dict) -> Optional[str]:
        return self.choice[r["t"]]


def policies() -> dict:
    out = {"suffix": lambda r: "s" if r["s_len"] else None,
           "owl": lambda r: "o2" if r["o2_len"] else None,
           "suffix-tree": lambda r: "st" if r["st_len"] else None,
           "owl-w3": lambda r: "o3" if r["o3_len"] else None}
    for th in THRESHOLDS:
        router = Router(RouterConfig(howl_threshold=th))

        def pick(r, router=router):
            s = Draft.chain([0] * r["s_len"], score=r["s_score"]) if r["s_len"] else None
            o = Draft.chain([0] * r["o2_len"], score=r["o2_score"]) if r["o2_len"] else None
            d = router.pick(s, o)
            return None if not len(d) else ("s" if d is s else "o2")

        out[f"howl@{th:g}"] = pick
    out["oracle"] = OraclePlan
    for th in SHAPE_THRESHOLDS:  # a fresh router per generation (one request)
        out[f"router@{th:g}"] = lambda th=th: ShapePolicy(th, *ShapePolicy.FIXED_SHAPES)
        out[f"shape@{th:g}"] = lambda th=th: ShapePolicy(th)
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
            shapes = {"chain": 0, "tree": 0, "none": 0}
            for n_gen, rows in recs:
                policy = (choose() if name.startswith(("shape@", "router@"))
                          else choose(rows, n_gen) if name == "oracle" else choose)
                s, tk, dr, sh = walk(rows, n_gen, policy)
                steps, tokens, drafted = steps + s, tokens + tk, drafted + dr
                shapes = {k: shapes[k] + sh[k] for k in shapes}
            table.setdefault(wl, {})[name] = {
                "tau": round(tokens / max(steps, 1), 3),
                "tau_per_cost": round(tokens / max(steps + COST_PER_TOKEN * drafted, 1e-9), 3),
                "drafted_per_step": round(drafted / max(steps, 1), 2), "steps_by_shape": shapes}
    md = (f"Command: `python -m benchmarks.howl_sweep {shlex.join(sys.argv[1:] if argv is None else argv)}`\n\n"
          f"Greedy replay of one recording per prompt, {args.new_tokens} new tokens, "
          f"{args.per_workload} prompt(s) per workload. `long` pools the long[*] prompts; `mixed` "
          "pools every prompt.\n\n"
          + markdown_table(table, "tau", "tau (tokens per verify step incl. the bonus token)")
          + "\n" + markdown_table(table, "tau_per_cost", "tau per cost (tokens over the steps' "
                                   f"costs: 1 + {COST_PER_TOKEN} x verified draft tokens each)")
          + "\n" + shape_table(table))
    print(md)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "howl_sweep.md").write_text(md)
    (out / "howl_sweep.json").write_text(json.dumps({"table": table, "seconds": time.time() - t0}, indent=1))
    return 0


def markdown_table(table: dict, key: str, title: str) -> str:
    """One column per policy; (x) = over the better of today's single drafters (suffix chains,
    OWL width-2 trees) on that workload, and for shape@T also [x] = over router@T (the same
    router with today's fixed shapes)."""
    names = list(next(iter(table.values())))
    md = (f"**{title}**. (x): over the better of suffix / owl; [x] for shape@T: over router@T "
          "(the same router, today's fixed shapes).\n\n| workload | " + " | ".join(names)
          + " |\n|---|" + "---|" * len(names) + "\n")
    for wl, row in table.items():
        best = max(row["suffix"][key], row["owl"][key])
        cells = []
        for n in names:
            v = row[n][key]
            cell = f"{v:.2f}"
            if n.startswith(("howl", "shape", "router", "oracle")):
                cell += f" ({v / best:.2f}x)"
            if n.startswith("shape"):
                cell += f" [{v / row['router' + n[len('shape'):]][key]:.2f}x]"
            cells.append(cell)
        md += f"| {wl} | " + " | ".join(cells) + " |\n"
    return md


def shape_table(table: dict) -> str:
    """Which shape the shape@T router verified, per workload (steps with a chain / a tree / none)."""
    names = [n for n in next(iter(table.values())) if n.startswith(("shape@", "router@"))]
    md = ("**Shapes the router verified** (steps: chain / tree / no draft)\n\n| workload | "
          + " | ".join(names) + " |\n|---|" + "---|" * len(names) + "\n")
    for wl, row in table.items():
        md += f"| {wl} | " + " | ".join(
            "{chain} / {tree} / {none}".format(**row[n]["steps_by_shape"]) for n in names) + " |\n"
    return md


if __name__ == "__main__":
    raise SystemExit(main())
