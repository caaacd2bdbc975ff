"""Where the time of a LONGSPEC decode step goes, measured inside the real server.

Starts one LONGSPEC server (float32, default model) with the worker's stats snapshot enabled,
replays a few prompts (one copy-heavy, one chat) one at a time, and prints per-step costs from the
worker's own timers: drafting (suffix index + router), the verify forward (target model over
1 + n_i tokens per request), verification + KV compaction, and plain decode steps (steps where
no draft was worth verifying, run through SGLang's own decode path).

    .venv/bin/python -m benchmarks.profile_verify_step [--model-path M] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import requests

from sgl_longspec.tools.cli import start_server, stop_server, wait_healthy

CODE = Path(os.__file__).read_text()[:3000]
PROMPTS = {
    "copy": f"<|im_start|>user\nRepeat this code exactly:\n{CODE[:1500]}<|im_end|>\n<|im_start|>assistant\n",
    "chat": "<|im_start|>user\nWrite a short story about a lighthouse keeper.<|im_end|>\n<|im_start|>assistant\n",
}


BUCKETS = [(1, 1), (2, 5), (6, 9), (10, 13), (14, 17)]  # tokens in the forward (root + draft)


def step_table(profile: dict) -> tuple[str, list[str]]:
    """Aggregate the worker's per-size step profile into size buckets, relative to a plain step."""
    agg = {}
    for key, (n, ms, fwd, attn) in profile.items():
        kind, tokens = key.split(":")
        tokens = int(tokens)
        lo, hi = next(((lo, hi) for lo, hi in BUCKETS if lo <= tokens <= hi), (tokens, tokens))
        a = agg.setdefault((kind, lo, hi), [0, 0.0, 0.0, 0.0, 0])
        a[0] += n
        a[1] += ms
        a[2] += fwd
        a[3] += attn
        a[4] += n * tokens
    plain = agg.get(("plain", 1, 1))
    plain_ms = plain[1] / plain[0] if plain else None
    head = ("| step | tokens | steps | ms/step | forward ms | attention ms | verify+KV ms | x plain step |\n"
            "|---|---|---|---|---|---|---|---|\n")
    lines, ratios = [], []
    for (kind, lo, hi), (n, ms, fwd, attn, tok) in sorted(agg.items()):
        per = ms / n
        x = f"{per / plain_ms:.2f}" if plain_ms else "-"
        lines.append(f"| {kind} | {lo}-{hi} (mean {tok / n:.1f}) | {n} | {per:.1f} | {fwd / n:.1f} | "
                     f"{attn / n:.1f} | {(ms - fwd) / n:.1f} | {x} |\n")
        if kind == "verify" and plain_ms:
            ratios.append(f"verify step of {tok / n:.1f} tokens ({tok / n - 1:.1f} drafted) = "
                          f"{per / plain_ms:.2f}x a plain decode step ({per:.1f} vs {plain_ms:.1f} ms); "
                          f"attention {attn / n:.1f} ms, verification + KV move {(ms - fwd) / n:.1f} ms")
    return head + "".join(lines), ratios


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model-path", default=None)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--port", type=int, default=31777)
    ap.add_argument("--out", default="benchmarks/results/verify_step")
    ap.add_argument("--server-args", default="", help="extra server flags, e.g. '--longspec-cost-aware false'")
    args = ap.parse_args(argv)
    stats_file = Path(tempfile.mkdtemp()) / "stats.json"
    os.environ["LONGSPEC_STATS_FILE"] = str(stats_file)
    log = open(Path(tempfile.mkdtemp()) / "server.log", "wb")
    proc, path = start_server(args.model_path, "127.0.0.1", args.port,
                              ["--speculative-algorithm", "LONGSPEC", *shlex.split(args.server_args)],
                              log_file=log)
    base = f"http://127.0.0.1:{args.port}"
    rows = []
    try:
        wait_healthy(base, proc, 900)
        for name, prompt in PROMPTS.items():
            before = json.loads(stats_file.read_text()) if stats_file.exists() else None
            t0 = time.time()
            r = requests.post(base + "/generate", timeout=900, json={
                "text": prompt, "sampling_params": {"temperature": 0, "max_new_tokens": args.max_new_tokens}})
            wall = time.time() - t0
            meta = r.json()["meta_info"]
            after = json.loads(stats_file.read_text())
            d = {k: after[k] - (before[k] if before else 0) for k in
                 ("drafted", "accepted", "verify_steps", "plain_steps", "draft_ms", "verify_ms",
                  "verify_forward_ms", "verify_tokens", "plain_ms")}
            steps = d["verify_steps"] + d["plain_steps"]
            rows.append({
                "workload": name, "tokens": meta["completion_tokens"], "wall_s": round(wall, 2),
                "tau": round(meta["completion_tokens"] / max(steps, 1), 2),
                "verify_steps": d["verify_steps"], "plain_steps": d["plain_steps"],
                "tokens_per_verify": round(d["verify_tokens"] / max(d["verify_steps"], 1), 1),
                "draft_ms_per_step": round(d["draft_ms"] / max(steps, 1), 2),
                "verify_forward_ms": round(d["verify_forward_ms"] / max(d["verify_steps"], 1), 1),
                "verify_other_ms": round((d["verify_ms"] - d["verify_forward_ms"]) / max(d["verify_steps"], 1), 1),
                "plain_step_ms": round(d["plain_ms"] / max(d["plain_steps"], 1), 1),
            })
        final_stats = json.loads(stats_file.read_text())
    finally:
        stop_server(proc)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cols = list(rows[0])
    table = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    table += "".join("| " + " | ".join(str(r[c]) for c in cols) + " |\n" for r in rows)
    steps_table, ratios = step_table(final_stats.get("step_profile", {}))
    report = (f"Command: `python -m benchmarks.profile_verify_step {shlex.join(sys.argv[1:] if argv is None else argv)}`\n\n"
              f"## Per workload\n\n{table}\n## Per step size (bs = 1)\n\n{steps_table}\n"
              f"Router cost model (a, r, b, c) ms: {final_stats.get('cost_model_ms')}\n\n"
              + "".join(f"- {line}\n" for line in ratios))
    print(report)
    (out / "profile.json").write_text(json.dumps({"workloads": rows, "stats": final_stats}, indent=2))
    (out / "profile.md").write_text(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
