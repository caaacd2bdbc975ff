"""Constrained agent traffic: LONGSPEC against vanilla SGLang with a JSON-schema constraint on every
request, with logprobs, and in mixed batches.

    python -m benchmarks.bench_constrained --out benchmarks/results/constrained

Workload: the tool-JSON agent of ``benchmarks.workloads`` (a real standard-library module's
function index as a tool result; the reply is a JSON tool call carrying an updated copy of it),
first turns only, every request constrained to the tool-call JSON schema below (xgrammar, SGLang's
default grammar backend). Both servers (``sgl_longspec.tools.cli.start_server``: vanilla, then
``--speculative-algorithm LONGSPEC``) replay the same requests in the same order, greedy. Every
cell runs on a freshly started server: LONGSPEC's global suffix tree keeps past outputs (across
requests, by design), so a request replayed on a warm server would draft its own earlier output.
The schema cells use different (seeded) requests. Cells:

- ``schema@c1`` / ``schema@c4``: every request constrained, 1 / 4 in flight;
- ``schema+logprobs@c1``: the same with ``return_logprob`` and top-2 logprobs;
- ``mixed@c4``: half the requests constrained, half not, interleaved, 4 in flight; against
  ``free@c2``, the unconstrained half alone at 2 in flight: the unconstrained requests' tau in the
  mix must stay within 10% of their tau alone.

Printed and saved: tok/s per cell and server, speedup, tau (completion tokens / decode steps),
output identity (token ids) and the largest logprob difference; results.json, results.md, a plot.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

from benchmarks import workloads as W
from benchmarks.run import DEFAULT_MODEL, Server, _post, flush_cache, free_port, machine_desc, warmup

TOOL_CALL_SCHEMA = {
    "type": "object",
    "properties": {
        "tool": {"type": "string", "enum": ["get_index", "put_index"]},
        "arguments": {
            "type": "object",
            "properties": {
                "module": {"type": "string"},
                "index": {
                    "type": "object",
                    "properties": {
                        "module": {"type": "string"},
                        "functions": {"type": "array", "items": {
                            "type": "object",
                            "properties": {"name": {"type": "string"}, "line": {"type": "integer"},
                                           "args": {"type": "array", "items": {"type": "string"}},
                                           "doc": {"type": "string"},
                                           "private": {"type": "boolean"}},
                            "required": ["name"]}},
                    },
                    "required": ["module", "functions"],
                },
            },
            "required": ["module", "index"],
        },
    },
    "required": ["tool", "arguments"],
}

SERVERS = {"vanilla": [], "longspec": ["--speculative-algorithm", "LONGSPEC"]}


def requests_for(tok, n: int, max_new: int, seed: int) -> list[list[int]]:
    sessions = W.tool_json_sessions(tok, n, 1, max_new, seed=seed)
    return [W.chat_prompt_ids(tok, s.first_messages()) for s in sessions]


def one(base_url: str, ids: list[int], max_new: int, constrained: bool, logprobs: bool) -> dict:
    sp = {"temperature": 0, "max_new_tokens": max_new}
    if constrained:
        sp["json_schema"] = json.dumps(TOOL_CALL_SCHEMA)
    body = {"input_ids": ids, "sampling_params": sp}
    if logprobs:
        body.update(return_logprob=True, top_logprobs_num=2)
    t0 = time.perf_counter()
    out = _post(base_url + "/generate", body)
    mi = out["meta_info"]
    return {"output_ids": out["output_ids"], "latency": time.perf_counter() - t0,
            "completion_tokens": mi["completion_tokens"],
            "steps": mi.get("spec_verify_ct") or mi["completion_tokens"],
            "logprobs": [x[0] for x in mi.get("output_token_logprobs", [])],
            "constrained": constrained, "text_head": out["text"][:120]}


def run_cell(base_url: str, jobs: list[tuple[list[int], bool]], concurrency: int, max_new: int,
             logprobs: bool) -> dict:
    flush_cache(base_url)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as ex:
        outs = list(ex.map(lambda j: one(base_url, j[0], max_new, j[1], logprobs), jobs))
    wall = time.perf_counter() - t0
    tokens = sum(o["completion_tokens"] for o in outs)
    return {"wall_s": wall, "tokens": tokens, "tok_s": tokens / wall, "outputs": outs,
            "tau": tokens / sum(o["steps"] for o in outs)}


def cells(tok, n: int, max_new: int, seed: int) -> dict:
    def reqs(k):
        return requests_for(tok, n, max_new, seed + k)

    mixed = [(ids, i % 2 == 0) for i, ids in enumerate(reqs(3))]
    return {
        "schema@c1": ([(ids, True) for ids in reqs(0)], 1, False),
        "schema@c4": ([(ids, True) for ids in reqs(1)], 4, False),
        "schema+logprobs@c1": ([(ids, True) for ids in reqs(2)], 1, True),
        "mixed@c4": (mixed, 4, False),
        "free@c2": ([j for j in mixed if not j[1]], 2, False),
    }


def tau_of(outs, constrained: bool) -> float:
    sel = [o for o in outs if o["constrained"] == constrained]
    return sum(o["completion_tokens"] for o in sel) / max(1, sum(o["steps"] for o in sel))


def compare(results: dict) -> dict:
    rows = {}
    for cell in results["vanilla"]:
        v, s = results["vanilla"][cell], results["longspec"][cell]
        same = sum(a["output_ids"] == b["output_ids"] for a, b in zip(v["outputs"], s["outputs"]))
        lp = [abs(x - y) for a, b in zip(v["outputs"], s["outputs"])
              if a["output_ids"] == b["output_ids"] for x, y in zip(a["logprobs"], b["logprobs"])]
        rows[cell] = {"vanilla_tok_s": v["tok_s"], "longspec_tok_s": s["tok_s"],
                      "speedup": s["tok_s"] / v["tok_s"], "tau": s["tau"],
                      "identical": f"{same}/{len(v['outputs'])}",
                      "max_logprob_diff": max(lp) if lp else None}
    mixed, alone = results["longspec"]["mixed@c4"], results["longspec"]["free@c2"]
    rows["mixed@c4"]["tau_free_in_mix"] = tau_of(mixed["outputs"], False)
    rows["mixed@c4"]["tau_free_alone"] = tau_of(alone["outputs"], False)
    rows["mixed@c4"]["tau_constrained_in_mix"] = tau_of(mixed["outputs"], True)
    return rows


def markdown(rows: dict) -> str:
    out = ["| cell | vanilla tok/s | LONGSPEC tok/s | speedup | tau | identical | max |dlogprob| |",
           "|---|---|---|---|---|---|---|"]
    for cell, r in rows.items():
        lp = "-" if r["max_logprob_diff"] is None else f"{r['max_logprob_diff']:.1e}"
        out.append(f"| {cell} | {r['vanilla_tok_s']:.1f} | {r['longspec_tok_s']:.1f} | "
                   f"**{r['speedup']:.2f}x** | {r['tau']:.2f} | {r['identical']} | {lp} |")
    m = rows["mixed@c4"]
    out.append("")
    out.append(f"Mixed batch: unconstrained requests' tau {m['tau_free_in_mix']:.2f} in the mix vs "
               f"{m['tau_free_alone']:.2f} alone ({m['tau_free_in_mix'] / m['tau_free_alone']:.2f}); "
               f"constrained requests' tau in the mix {m['tau_constrained_in_mix']:.2f}.")
    return "\n".join(out)


def plot(rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.bar(names, [rows[n]["speedup"] for n in names], color="#3a7")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_ylabel("LONGSPEC / vanilla tok/s")
    ax.set_title("Constrained tool-JSON traffic (greedy, float32)")
    for i, n in enumerate(names):
        ax.text(i, rows[n]["speedup"] + 0.03, f"{rows[n]['speedup']:.2f}x", ha="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/constrained"))
    ap.add_argument("--model", default=None)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=192)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--startup-timeout", type=float, default=900)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {name: {} for name in SERVERS}
    plan = None
    for name, extra in SERVERS.items():
        for cell in ("schema@c1", "schema@c4", "schema+logprobs@c1", "mixed@c4", "free@c2"):
            with Server(args.model, extra, args.out / "logs" / f"{name}-{cell}.log", free_port(),
                        args.startup_timeout) as srv:
                if plan is None:
                    tok = W.load_tokenizer(srv.model_folder)
                    plan = cells(tok, args.requests, args.max_new_tokens, args.seed)
                warmup(srv.base_url, tok)
                jobs, conc, lp = plan[cell]
                r = run_cell(srv.base_url, jobs, conc, args.max_new_tokens, lp)
                results[name][cell] = r
                print(f"{name:9s} {cell:20s} {r['tok_s']:6.1f} tok/s tau {r['tau']:.2f}",
                      flush=True)
    rows = compare(results)
    md = markdown(rows)
    print(md)
    cmd = "python -m benchmarks.bench_constrained " + " ".join(argv if argv is not None else sys.argv[1:])
    (args.out / "results.json").write_text(json.dumps({"rows": rows, "raw": results}, indent=1))
    (args.out / "results.md").write_text(md + "\n")
    plot(rows, args.out / "speedup.png")
    (args.out / "README.md").write_text(
        f"# Constrained tool-JSON traffic\n\nCommand: `{cmd}`\n\n"
        f"Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}; machine: {machine_desc()}; model: "
        f"{args.model or DEFAULT_MODEL} (float32); {args.requests} requests, "
        f"max_new_tokens {args.max_new_tokens}.\n\n{md}\n\n![speedup](speedup.png)\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
