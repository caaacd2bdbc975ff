"""The suite's agent traffic replayed by SGLang's own load generator: ``sglang.bench_serving`` with
its ``agentic-trace`` dataset, against vanilla SGLang and LONGSPEC, side by side.

    python -m benchmarks.bench_agentic_trace --out benchmarks/results/agentic_trace

1. ``python -m benchmarks.run --export-agentic-trace <out>/trace.json`` writes the suite's code-edit
   and tool-JSON sessions (seeded, the same ones ``benchmarks.run`` replays) as multi-turn
   conversations; the file is kept next to the results so the run can be repeated by hand.
2. For every server (vanilla, ``--speculative-algorithm LONGSPEC``) and concurrency (1, 4) a fresh
   server is started (LONGSPEC's global suffix tree keeps past outputs by design, so a warm server
   would draft a conversation from its own earlier replay), warmed up with one unrelated request,
   and driven by::

       python -m sglang.bench_serving --backend sglang-oai-chat --dataset-name agentic-trace \\
           --dataset-path trace.json --max-concurrency C --sharegpt-output-len M \\
           --disable-ignore-eos --warmup-requests 0 --output-details ...

   bench_serving replays every conversation round by round and feeds the server's own reply back
   into the next round (greedy: temperature 0 is its default). ``--disable-ignore-eos`` lets a turn
   end where the model ends it, as an agent's would; ``--warmup-requests 0`` because its warm-up
   replays the first conversation, which LONGSPEC would then have seen.
3. Printed and saved: output tok/s, mean TPOT and TTFT, SGLang's average accept length
   (``/get_server_info``), the speedup, and whether every generated text equals vanilla's;
   results.json, results.md, README.md with the commands, a plot, and bench_serving's own logs.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from benchmarks import run as R
from benchmarks import workloads as W

SERVERS = {"vanilla": [], "longspec": ["--speculative-algorithm", "LONGSPEC"]}
KEEP = ("completed", "total_output_tokens", "output_throughput", "request_throughput", "mean_ttft_ms",
        "median_ttft_ms", "mean_tpot_ms", "median_tpot_ms", "mean_e2e_latency_ms", "accept_length",
        "duration", "max_concurrency")


def bench_serving_cmd(base_url: str, model_folder: str, trace: Path, concurrency: int, output_len: int,
                      result_file: Path, seed: int) -> list[str]:
    return [sys.executable, "-m", "sglang.bench_serving", "--backend", "sglang-oai-chat",
            "--base-url", base_url, "--dataset-name", "agentic-trace", "--dataset-path", str(trace),
            "--tokenizer", model_folder, "--num-prompts", "0", "--max-concurrency", str(concurrency),
            "--sharegpt-output-len", str(output_len), "--disable-ignore-eos", "--warmup-requests", "0",
            "--seed", str(seed), "--output-file", str(result_file), "--output-details", "--disable-tqdm"]


def run_cell(srv, trace: Path, concurrency: int, output_len: int, out: Path, tag: str, seed: int) -> dict:
    result_file = out / "raw" / f"{tag}.jsonl"
    result_file.parent.mkdir(parents=True, exist_ok=True)
    result_file.unlink(missing_ok=True)
    cmd = bench_serving_cmd(srv.base_url, srv.model_folder, trace, concurrency, output_len, result_file, seed)
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    (out / "logs" / f"bench_serving_{tag}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not result_file.exists():
        raise RuntimeError(f"bench_serving failed ({tag}, rc {proc.returncode}): {proc.stderr[-2000:]}")
    full = json.loads([ln for ln in result_file.read_text().splitlines() if ln.strip()][-1])
    # The per-turn texts are kept in results.json, not in the (large) raw file.
    texts = full.pop("generated_texts", [])
    for k in ("input_lens", "output_lens", "ttfts", "itls", "errors"):
        full.pop(k, None)
    result_file.write_text(json.dumps(full) + "\n")
    row = {k: full.get(k) for k in KEEP}
    row.update(command=shlex.join(["python"] + cmd[1:]), wall_s=time.time() - t0, texts=texts)
    return row


def compare(results: dict, cells: list[str]) -> dict:
    rows = {}
    for cell in cells:
        v, s = results["vanilla"][cell], results["longspec"][cell]
        same = sum(a == b for a, b in zip(v["texts"], s["texts"]))
        rows[cell] = {
            "vanilla_tok_s": v["output_throughput"], "longspec_tok_s": s["output_throughput"],
            "speedup": s["output_throughput"] / v["output_throughput"],
            "vanilla_tpot_ms": v["mean_tpot_ms"], "longspec_tpot_ms": s["mean_tpot_ms"],
            "vanilla_ttft_ms": v["mean_ttft_ms"], "longspec_ttft_ms": s["mean_ttft_ms"],
            "accept_length": s["accept_length"], "turns": len(v["texts"]),
            "identical": f"{same}/{len(v['texts'])}",
            "completed": f"{v['completed']}/{s['completed']}",
        }
    return rows


def markdown(rows: dict) -> str:
    out = ["| cell | vanilla tok/s | LONGSPEC tok/s | speedup | TPOT ms (vanilla / LONGSPEC) | "
           "TTFT ms (vanilla / LONGSPEC) | accept length | turns identical |",
           "|---|---|---|---|---|---|---|---|"]
    for cell, r in rows.items():
        al = "-" if r["accept_length"] is None else f"{r['accept_length']:.2f}"
        out.append(f"| {cell} | {r['vanilla_tok_s']:.1f} | {r['longspec_tok_s']:.1f} | **{r['speedup']:.2f}x** | "
                   f"{r['vanilla_tpot_ms']:.0f} / {r['longspec_tpot_ms']:.0f} | "
                   f"{r['vanilla_ttft_ms']:.0f} / {r['longspec_ttft_ms']:.0f} | {al} | {r['identical']} |")
    return "\n".join(out)


def plot(rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    x = range(len(names))
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar([i - 0.2 for i in x], [rows[n]["vanilla_tok_s"] for n in names], 0.4, label="vanilla")
    ax.bar([i + 0.2 for i in x], [rows[n]["longspec_tok_s"] for n in names], 0.4, label="LONGSPEC")
    for i, n in enumerate(names):
        ax.text(i + 0.2, rows[n]["longspec_tok_s"], f"{rows[n]['speedup']:.2f}x", ha="center",
                va="bottom", fontsize=8)
    ax.set_xticks(list(x), names)
    ax.set_ylabel("output tok/s (bench_serving)")
    ax.set_title("Agent trace via sglang.bench_serving (greedy, float32)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/agentic_trace"))
    ap.add_argument("--model-path", default=None, help="default: the embedded SmolLM2-135M (the suite's)")
    ap.add_argument("--sessions", type=int, default=4, help="sessions per workload (code edit, tool JSON)")
    ap.add_argument("--output-len", type=int, default=192, help="max tokens per turn")
    ap.add_argument("--concurrency", nargs="+", type=int, default=[1, 4])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--startup-timeout", type=float, default=900)
    args = ap.parse_args(argv)
    out: Path = args.out
    (out / "logs").mkdir(parents=True, exist_ok=True)
    trace = out / "trace.json"
    export = ["--export-agentic-trace", str(trace), "--sessions", str(args.sessions), "--seed", str(args.seed)]
    if args.model_path:
        export += ["--model-path", args.model_path]
    if R.main(export) != 0:
        return 2
    cells = [f"c{c}" for c in args.concurrency]
    results: dict = {name: {} for name in SERVERS}
    for name, extra in SERVERS.items():
        for conc, cell in zip(args.concurrency, cells):
            with R.Server(args.model_path, extra, out / "logs" / f"server-{name}-{cell}.log", R.free_port(),
                          args.startup_timeout) as srv:
                R.warmup(srv.base_url, W.load_tokenizer(srv.model_folder))
                r = run_cell(srv, trace, conc, args.output_len, out, f"{name}-{cell}", args.seed)
            results[name][cell] = r
            print(f"{name:9s} {cell}: {r['output_throughput']:.1f} tok/s, TPOT {r['mean_tpot_ms']:.0f} ms, "
                  f"accept length {r['accept_length']}", flush=True)
    rows = compare(results, cells)
    md = markdown(rows)
    print(md)
    cmd = "python -m benchmarks.bench_agentic_trace " + shlex.join(argv if argv is not None else sys.argv[1:])
    (out / "results.json").write_text(json.dumps({"rows": rows, "raw": results}, indent=1))
    (out / "results.md").write_text(md + "\n")
    plot(rows, out / "throughput.png")
    data = json.loads(trace.read_text())
    meta = data["metadata"]
    counts: dict = {}
    for sess in meta["sessions"]:
        counts[sess["workload"]] = counts.get(sess["workload"], 0) + 1
    kinds = ", ".join(f"{n} {w.replace('_', '-')}" for w, n in counts.items())
    turns = sum(len(c) for c in data["conversations"])
    example = results["longspec"][cells[0]]["command"]
    (out / "README.md").write_text(
        f"# Agent traffic through `sglang.bench_serving` (agentic-trace)\n\n"
        f"Command: `{cmd}`\n\n"
        f"Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}; machine: {R.machine_desc()}; model: "
        f"{meta['model']} (float32); {len(meta['sessions'])} conversations ({kinds}, seed {args.seed}), "
        f"{turns} turns, at most {args.output_len} tokens per turn, a fresh server per cell.\n\n"
        f"The trace (`trace.json`) was written by `python -m benchmarks.run {shlex.join(export)}`; each "
        f"cell ran (server URL and paths differ per run):\n\n```\n{example}\n```\n\n{md}\n\n"
        f"tok/s is bench_serving's output throughput; accept length is SGLang's own "
        f"(`/get_server_info`, average over the run); \"turns identical\" compares every generated "
        f"turn's text with vanilla's.\n\n![throughput](throughput.png)\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
