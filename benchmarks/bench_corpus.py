"""Corpus-backed code edits: LONGSPEC with and without an external corpus (the repository), against
vanilla SGLang, on the same requests.

    python -m benchmarks.bench_corpus --out benchmarks/results/corpus

Workload (``benchmarks.workloads.numbered_edit_sessions``): an agent shows the model a chunk of a
real standard-library module the way agent file viewers do (a line number and a tab before every
line) and asks for a rename, the code returned without line numbers. The request's own suffix
tree then matches only inside a line (every line of the prompt starts with a number the output
does not have), while the repository on disk holds the code exactly as the model writes it back.
The repository is a folder with a copy of every module of ``workloads.STDLIB_MODULES`` (~80 files),
indexed at start with ``--longspec-corpus``; no prompt holds its text in that form.

Servers (each freshly started, ``sgl_longspec.tools.cli.start_server``, the same requests in the same
order, greedy, float32): ``vanilla``; ``longspec`` (defaults); ``longspec+corpus`` (defaults +
``--longspec-corpus <repository>``). Cells: c1 (one request at a time) and c4 (four in flight,
other seeded requests). Printed and saved: tok/s, speedup over vanilla, tau (completion tokens /
decode steps), the corpus's share of the accepted tokens (the worker's stats file), and output
identity with vanilla (token ids); results.json, results.md, a plot, the server logs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

from benchmarks import workloads as W
from benchmarks.run import CODER_MODEL, Server, _post, flush_cache, free_port, machine_desc, warmup

CELLS = {"c1": 1, "c4": 4}


def write_repository(folder: Path) -> int:
    """A copy of the benchmark's source modules, laid out as in the standard library."""
    if folder.exists():
        shutil.rmtree(folder)
    for rel, text in W.source_files():
        p = folder / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")
    return sum(1 for _ in folder.rglob("*.py"))


def one(base_url: str, ids: list[int], max_new: int) -> dict:
    t0 = time.perf_counter()
    out = _post(base_url + "/generate", {"input_ids": ids,
                                          "sampling_params": {"temperature": 0, "max_new_tokens": max_new}})
    mi = out["meta_info"]
    return {"output_ids": out["output_ids"], "latency": time.perf_counter() - t0,
            "completion_tokens": mi["completion_tokens"],
            "steps": mi.get("spec_verify_ct") or mi["completion_tokens"], "text_head": out["text"][:160]}


def run_cell(base_url: str, prompts: list[list[int]], concurrency: int, max_new: int) -> dict:
    flush_cache(base_url)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as ex:
        outs = list(ex.map(lambda ids: one(base_url, ids, max_new), prompts))
    wall = time.perf_counter() - t0
    tokens = sum(o["completion_tokens"] for o in outs)
    return {"wall_s": wall, "tokens": tokens, "tok_s": tokens / wall,
            "tau": tokens / sum(o["steps"] for o in outs), "outputs": outs}


def by_source(stats_file: Path) -> dict:
    try:
        return json.loads(stats_file.read_text()).get("by_source", {})
    except (OSError, ValueError):
        return {}


def compare(results: dict) -> dict:
    rows = {}
    for cell in CELLS:
        v = results["vanilla"][cell]
        row = {"vanilla_tok_s": v["tok_s"]}
        for name in ("longspec", "longspec+corpus"):
            r = results[name][cell]
            same = sum(a["output_ids"] == b["output_ids"] for a, b in zip(v["outputs"], r["outputs"]))
            src = r.get("by_source", {})
            accepted = sum(x[2] for x in src.values()) or 1
            row[name] = {"tok_s": r["tok_s"], "speedup": r["tok_s"] / v["tok_s"], "tau": r["tau"],
                         "identical": f"{same}/{len(v['outputs'])}",
                         "accepted_by_source": {k: x[2] for k, x in src.items()},
                         "corpus_share": src.get("corpus", [0, 0, 0])[2] / accepted}
        row["tau_ratio"] = row["longspec+corpus"]["tau"] / row["longspec"]["tau"]
        rows[cell] = row
    return rows


def markdown(rows: dict) -> str:
    out = ["| cell | vanilla tok/s | LONGSPEC tok/s (tau) | LONGSPEC + corpus tok/s (tau) | "
           "corpus vs no corpus: tau | speedup over vanilla: LONGSPEC / + corpus | corpus share of "
           "accepted | identical to vanilla |",
           "|---|---|---|---|---|---|---|---|"]
    for cell, r in rows.items():
        a, b = r["longspec"], r["longspec+corpus"]
        out.append(f"| {cell} | {r['vanilla_tok_s']:.1f} | {a['tok_s']:.1f} ({a['tau']:.2f}) | "
                   f"{b['tok_s']:.1f} ({b['tau']:.2f}) | **{r['tau_ratio']:.2f}x** | "
                   f"{a['speedup']:.2f}x / **{b['speedup']:.2f}x** | {100 * b['corpus_share']:.0f}% | "
                   f"{a['identical']} / {b['identical']} |")
    return "\n".join(out)


def plot(rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = list(rows)
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    width = 0.38
    for k, (name, color) in enumerate((("longspec", "#79a"), ("longspec+corpus", "#3a7"))):
        xs = [i + (k - 0.5) * width for i in range(len(cells))]
        axes[0].bar(xs, [rows[c][name]["tau"] for c in cells], width, color=color, label=name)
        axes[1].bar(xs, [rows[c][name]["speedup"] for c in cells], width, color=color, label=name)
    for ax, title in ((axes[0], "tau (tokens / decode step)"), (axes[1], "tok/s over vanilla")):
        ax.set_xticks(range(len(cells)), cells)
        ax.set_title(title, fontsize=10)
    axes[1].axhline(1.0, color="k", lw=0.8)
    axes[0].legend(fontsize=8)
    fig.suptitle("Line-numbered code edits, Qwen2.5-Coder-0.5B (greedy, float32)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/corpus"))
    ap.add_argument("--model", default=CODER_MODEL)
    ap.add_argument("--requests", type=int, default=8, help="requests per cell")
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--startup-timeout", type=float, default=900)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    cache = Path(os.environ.get("LONGSPEC_CACHE", Path.home() / ".cache" / "sgl_longspec")) / "bench"
    repo = cache / "corpus_repository"
    n_files = write_repository(repo)
    servers = {"vanilla": [], "longspec": ["--speculative-algorithm", "LONGSPEC"],
               "longspec+corpus": ["--speculative-algorithm", "LONGSPEC", "--longspec-corpus", str(repo)]}
    results: dict = {name: {} for name in servers}
    plan = None
    t_start = time.time()
    for name, extra in servers.items():
        stats_file = args.out / "logs" / f"{name}-stats.json"
        os.environ["LONGSPEC_STATS_FILE"] = str(stats_file.resolve())
        for cell, conc in CELLS.items():
            stats_file.unlink(missing_ok=True)
            with Server(args.model, extra, args.out / "logs" / f"{name}-{cell}.log", free_port(),
                        args.startup_timeout) as srv:
                if plan is None:
                    tok = W.load_tokenizer(srv.model_folder)
                    plan = {c: [W.chat_prompt_ids(tok, s.first_messages()) for s in
                                W.numbered_edit_sessions(tok, args.requests, args.max_new_tokens,
                                                         seed=args.seed + k)]
                            for k, c in enumerate(CELLS)}
                warmup(srv.base_url, tok)
                r = run_cell(srv.base_url, plan[cell], conc, args.max_new_tokens)
                r["by_source"] = by_source(stats_file)
                results[name][cell] = r
                print(f"{name:16s} {cell}: {r['tok_s']:6.1f} tok/s  tau {r['tau']:.2f}  "
                      f"accepted by source {r['by_source']}", flush=True)
    os.environ.pop("LONGSPEC_STATS_FILE", None)
    rows = compare(results)
    md = markdown(rows)
    print(md)
    prompt_tokens = [len(ids) for ids in plan["c1"]]
    meta = {"command": "python -m benchmarks.bench_corpus " + " ".join(argv or sys.argv[1:]),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_desc(), "model": args.model, "requests_per_cell": args.requests,
            "max_new_tokens": args.max_new_tokens, "repository_files": n_files,
            "prompt_tokens_c1": prompt_tokens, "minutes": (time.time() - t_start) / 60}
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows, "results": results}, indent=1))
    (args.out / "results.md").write_text(md + "\n")
    plot(rows, args.out / "corpus.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
