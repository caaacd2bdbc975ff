"""Server CPU decode rate, time to first token and greedy agreement: plain vs NGRAM vs LONGSPEC,
fp32 vs bf16.

Starts one SGLang server at a time (`sgl-longspec serve` defaults + the configuration's flags) on the
embedded SmolLM2-135M-Instruct, sends the same prompts one request at a time (greedy, streaming
/generate), stops the server, and goes on with the next configuration. Prints a table and writes
results.json / results.md under --out.

    .venv/bin/python benchmarks/bench_server_basic.py --out benchmarks/results/server_basic

Metrics per request: TTFT (request sent -> first streamed chunk with a token), decode rate
((tokens - 1) / (last chunk - first chunk)), end-to-end rate (tokens / total time), NGRAM accept
length (meta_info spec_accept_length, bonus token included). Agreement: length of the common
prefix of output token ids between two configurations on the same prompt.
The machine is shared: the 1-minute load average is recorded around every configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sgl_longspec.tools.cli import start_server, stop_server, wait_healthy  # noqa: E402
from sgl_longspec.tools.models import ensure_embedded_model  # noqa: E402

NGRAM = ["--speculative-algorithm", "NGRAM", "--speculative-num-draft-tokens", "8"]
LONGSPEC = ["--speculative-algorithm", "LONGSPEC"]
CONFIGS = {
    "fp32-plain": ["--dtype", "float32"],
    "fp32-ngram": ["--dtype", "float32", *NGRAM],
    "bf16-plain": ["--dtype", "bfloat16"],
    "bf16-ngram": ["--dtype", "bfloat16", *NGRAM],
    "fp32-longspec": ["--dtype", "float32", *LONGSPEC],
    "bf16-longspec": ["--dtype", "bfloat16", *LONGSPEC],
}

_CODE = '''import json
from dataclasses import dataclass, field


@dataclass
class Item:
    name: str
    price: float
    quantity: int = 1
    tags: list[str] = field(default_factory=list)

    def total(self) -> float:
        return self.price * self.quantity


class Inventory:
    def __init__(self):
        self.items: dict[str, Item] = {}

    def add(self, item: Item) -> None:
        if item.name in self.items:
            self.items[item.name].quantity += item.quantity
        else:
            self.items[item.name] = item

    def remove(self, name: str, quantity: int = 1) -> None:
        item = self.items[name]
        item.quantity -= quantity
        if item.quantity <= 0:
            del self.items[name]

    def total_value(self) -> float:
        return sum(item.total() for item in self.items.values())

    def by_tag(self, tag: str) -> list[Item]:
        return [item for item in self.items.values() if tag in item.tags]

    def to_json(self) -> str:
        return json.dumps({name: vars(item) for name, item in self.items.items()})

    @classmethod
    def from_json(cls, text: str) -> "Inventory":
        inv = cls()
        for name, data in json.loads(text).items():
            inv.add(Item(**data))
        return inv
'''

# (kind, text). The code prompt is long (~450 tokens) and invites copying, where NGRAM can help.
PROMPTS = [
    ("chat", "Give me three tips for staying focused while studying."),
    ("chat", "Explain what a hash table is to a beginner, with a short example."),
    ("chat", "Here is a Python module:\n```python\n" + _CODE + "```\nAdd a method `count()` to "
             "Inventory that returns the number of distinct items, and show the whole class."),
    ("raw", "The history of the printing press begins"),
]


WARMUP = ("chat", "Say hello.")


def build_prompt_ids(model_path: str, prompts=PROMPTS) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    out = []
    for kind, text in prompts:
        if kind == "chat":
            ids = tok.apply_chat_template([{"role": "user", "content": text}],
                                          add_generation_prompt=True, tokenize=True)
            if hasattr(ids, "keys"):
                ids = ids["input_ids"]
        else:
            ids = tok(text)["input_ids"]
        out.append([int(t) for t in ids])
    return out


def stream_generate(base_url: str, ids: list[int], new_tokens: int) -> dict:
    payload = {"input_ids": ids, "stream": True,
               "sampling_params": {"temperature": 0, "max_new_tokens": new_tokens}}
    t0 = time.perf_counter()
    t_first = t_last = None
    last = None
    with requests.post(base_url + "/generate", json=payload, stream=True, timeout=3600) as r:
        r.raise_for_status()
        for line in r.iter_lines(decode_unicode=True):
            if not line or not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            now = time.perf_counter()
            if chunk.get("output_ids"):
                if t_first is None:
                    t_first = now
                t_last = now
            last = chunk
    n = len(last["output_ids"])
    meta = last["meta_info"]
    return {
        "output_ids": last["output_ids"],
        "tokens": n,
        "ttft_s": t_first - t0,
        "e2e_s": t_last - t0,
        "decode_tok_s": (n - 1) / (t_last - t_first) if n > 1 and t_last > t_first else None,
        "e2e_tok_s": n / (t_last - t0),
        "accept_length": meta.get("spec_accept_length"),
        "prompt_tokens": meta.get("prompt_tokens"),
    }


def run_config(name: str, args: list[str], prompt_ids, warmup_ids, new_tokens: int, port: int,
               log_dir: Path) -> dict:
    log_path = log_dir / f"server-{name}.log"
    load_before = os.getloadavg()[0]
    with open(log_path, "wb") as log:
        t0 = time.time()
        proc, _ = start_server(None, "127.0.0.1", port, args, log_file=log)
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base_url, proc, 1800)
        startup = time.time() - t0
        stream_generate(base_url, warmup_ids, 8)  # warm-up (JIT, allocator, n-gram corpus)
        for _ in range(30):  # may answer 400 while the streamed warm-up still counts as pending
            if requests.post(base_url + "/flush_cache", timeout=60).status_code == 200:
                break
            time.sleep(1)
        runs = []
        for i, ids in enumerate(prompt_ids):
            res = stream_generate(base_url, ids, new_tokens)
            print(f"  [{name}] prompt {i}: {res['tokens']} tok, TTFT {res['ttft_s']:.2f}s, "
                  f"decode {res['decode_tok_s'] or 0:.1f} tok/s"
                  + (f", accept {res['accept_length']:.2f}" if res["accept_length"] else ""),
                  flush=True)
            runs.append(res)
    finally:
        stop_server(proc)
    return {"name": name, "args": args, "startup_s": startup, "runs": runs,
            "load_before": load_before, "load_after": os.getloadavg()[0]}


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def summarise(results: dict) -> tuple[list[dict], list[dict]]:
    rows = []
    for name, r in results.items():
        runs = r["runs"]
        dec = [x["decode_tok_s"] for x in runs if x["decode_tok_s"]]
        acc = [x["accept_length"] for x in runs if x["accept_length"]]
        rows.append({
            "config": name,
            "decode_tok_s_mean": statistics.mean(dec),
            "decode_tok_s_min": min(dec),
            "decode_tok_s_max": max(dec),
            "e2e_tok_s_mean": statistics.mean(x["e2e_tok_s"] for x in runs),
            "ttft_s": [round(x["ttft_s"], 3) for x in runs],
            "accept_length": [round(a, 2) for a in acc] or None,
            "startup_s": round(r["startup_s"], 1),
            "load": f"{r['load_before']:.1f}->{r['load_after']:.1f}",
        })
    agree = []
    pairs = [("fp32-plain", "fp32-ngram"), ("bf16-plain", "bf16-ngram"),
             ("fp32-plain", "fp32-longspec"), ("bf16-plain", "bf16-longspec"),
             ("fp32-plain", "bf16-plain")]
    for a, b in pairs:
        if a in results and b in results:
            prefixes = [common_prefix(x["output_ids"], y["output_ids"])
                        for x, y in zip(results[a]["runs"], results[b]["runs"])]
            totals = [min(len(x["output_ids"]), len(y["output_ids"]))
                      for x, y in zip(results[a]["runs"], results[b]["runs"])]
            agree.append({"a": a, "b": b, "common_prefix": prefixes, "of": totals,
                          "identical": sum(p == t for p, t in zip(prefixes, totals))})
    return rows, agree


def render(rows, agree, meta) -> str:
    lines = [f"# Server decode rate on CPU ({meta['model']})", "",
             f"{meta['new_tokens']} new tokens per request, greedy, one request at a time, "
             f"prompt tokens {meta['prompt_tokens']}; {meta['machine']}; "
             f"{meta['date']}.", "",
             "| config | decode tok/s mean (min-max) | end-to-end tok/s | TTFT s per prompt | "
             "accept length per prompt | server start s | load avg |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        acc = ", ".join(f"{a:.2f}" for a in r["accept_length"]) if r["accept_length"] else "-"
        lines.append(
            f"| {r['config']} | {r['decode_tok_s_mean']:.1f} ({r['decode_tok_s_min']:.1f}-"
            f"{r['decode_tok_s_max']:.1f}) | {r['e2e_tok_s_mean']:.1f} | "
            f"{', '.join(f'{t:.2f}' for t in r['ttft_s'])} | {acc} | {r['startup_s']} | "
            f"{r['load']} |")
    lines += ["", "| A | B | common prefix (tokens) per prompt | identical |", "|---|---|---|---|"]
    for a in agree:
        lines.append(f"| {a['a']} | {a['b']} | "
                     f"{', '.join(f'{p}/{t}' for p, t in zip(a['common_prefix'], a['of']))} | "
                     f"{a['identical']}/{len(a['of'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--port", type=int, default=31877)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/server_basic"))
    args = p.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    model_path = str(ensure_embedded_model())
    prompt_ids = build_prompt_ids(model_path)
    warmup_ids = build_prompt_ids(model_path, [WARMUP])[0]  # unrelated to the measured prompts
    results = {}
    for name in args.configs:
        print(f"== {name}: {' '.join(CONFIGS[name])}", flush=True)
        results[name] = run_config(name, CONFIGS[name], prompt_ids, warmup_ids, args.new_tokens,
                                   args.port, args.out)
    rows, agree = summarise(results)
    meta = {"model": Path(model_path).name, "new_tokens": args.new_tokens,
            "prompt_tokens": [len(x) for x in prompt_ids],
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared)",
            "date": time.strftime("%Y-%m-%d %H:%M")}
    md = render(rows, agree, meta)
    print("\n" + md)
    (args.out / "results.md").write_text(md)
    (args.out / "results.json").write_text(json.dumps(
        {"meta": meta, "summary": rows, "agreement": agree, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
