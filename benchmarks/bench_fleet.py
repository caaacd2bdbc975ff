"""A fleet of agents over one repository, on a real server: N requests that share a system prompt
and repository files (S tokens, radix-cached) and each ask for a different function of them.

Configurations, side by side on the same prompts (a fresh server each, greedy, float32):
- stock: plain SGLang with its own CPU attention backend (torch_native): what a user runs instead;
- vanilla: plain SGLang on LONGSPEC's CPU backend (longspec_cpu), whose decode steps also read a
  shared prefix once per group (the suite's "vanilla");
- longspec-no-cascade: LONGSPEC with the shared level off (LONGSPEC_CASCADE_MIN_SHARED=0: every
  request reads the shared prefix itself, as stock's backend does);
- longspec: LONGSPEC as shipped (the shared level where the group's shared run is long enough,
  sgl_longspec.attention.cascade.MinShared).

Per cell (S, N): the shared prefix is prefilled once by a one-token request (the radix cache then
holds it), then the N requests run concurrently; output tok/s over the cell's wall time, mean
TPOT, tau from SGLang's per-request verify counts, the LONGSPEC stats' cascade counters, and
whether every output equals vanilla's.

    python -m benchmarks.bench_fleet --out benchmarks/results/fleet
    python -m benchmarks.bench_fleet --shared 2048 --fleet 4 --out /tmp/fleet   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

from benchmarks import run as R
from benchmarks import workloads as W

SYSTEM = ("You are a coding agent working in the repository below. Answer with code only: when "
          "asked for a function, return it exactly as it is in the repository.")
NO_CASCADE = {"LONGSPEC_CASCADE_MIN_SHARED": "0"}
CONFIGS = {
    # what a user runs instead: plain SGLang with its own CPU attention backend
    "stock": (["--attention-backend", "torch_native"], {}),
    # plain SGLang on LONGSPEC's CPU backend, whose decode steps read a shared prefix once too
    "vanilla": ([], {}),
    "longspec-no-cascade": (["--speculative-algorithm", "LONGSPEC"], NO_CASCADE),
    "longspec": (["--speculative-algorithm", "LONGSPEC"], {}),
}
COMMON_ARGS = ["--max-total-tokens", "65536", "--max-running-requests", "16",
               "--longspec-cost-aware", "true"]


def repository(tok, budget: int) -> tuple[str, list[tuple[str, str]]]:
    """The shared context (whole files while they fit, then the head of the next one, up to
    `budget` tokens) and the (file, function) pairs it holds whole."""
    parts, funcs, used = [], [], W.ntok(tok, SYSTEM) + 32
    for rel, text in W.source_files():
        block = f"### {rel}\n{text}\n"
        n = W.ntok(tok, block)
        if used + n > budget:
            block = W.truncate_tokens(tok, block, budget - used)
            text = block.split("\n", 1)[1] if "\n" in block else ""
        parts.append(block)
        used += W.ntok(tok, block)
        whole = text.rsplit("\n", 1)[0]  # the last line may be cut
        funcs += [(rel, name) for name, a, b in W.top_level_defs(whole) if 2 <= b - a <= 40]
        if used >= budget - 8:
            break
    return "".join(parts), funcs


# What each member of the fleet asks of one function (more members than functions: other asks).
ASKS = ("Return the function `{name}` of {rel} exactly as it is.",
        "Copy the function `{name}` from {rel}, unchanged, into your answer.",
        "Show me `{name}` ({rel}) verbatim.",
        "I need the exact source of `{name}` in {rel}.")


def requests_for(tok, shared_tokens: int, fleet: int) -> tuple[list[int], list[list[int]]]:
    """(the shared token prefix of every request, each request's prompt)."""
    repo, funcs = repository(tok, shared_tokens)
    head = [{"role": "system", "content": SYSTEM + "\n\n" + repo}]
    prefix = W.chat_prompt_ids(tok, head + [{"role": "user", "content": "ready?"}])
    prompts = []
    for i in range(fleet):
        rel, name = funcs[i % len(funcs)]
        q = ASKS[(i // len(funcs)) % len(ASKS)].format(name=name, rel=rel)
        prompts.append(W.chat_prompt_ids(tok, head + [{"role": "user", "content": q}]))
    common = os.path.commonprefix([prefix] + prompts)
    return list(common), prompts


def run_cell(srv, prompts, warm_ids, max_new: int) -> dict:
    R.flush_cache(srv.base_url)
    R._post(srv.base_url + "/generate",
            {"input_ids": warm_ids, "sampling_params": {"temperature": 0, "max_new_tokens": 1}})

    def one(ids):
        t0 = time.perf_counter()
        out = R._post(srv.base_url + "/generate",
                      {"input_ids": ids, "sampling_params": {"temperature": 0, "max_new_tokens": max_new}})
        return out, time.perf_counter() - t0

    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(prompts)) as ex:
        results = list(ex.map(one, prompts))
    wall = time.perf_counter() - t0
    toks = [o["meta_info"]["completion_tokens"] for o, _ in results]
    verify = [o["meta_info"].get("spec_verify_ct") or 0 for o, _ in results]
    tpot = [(dt - (o["meta_info"].get("e2e_latency", dt) - dt)) / max(n, 1)
            for (o, dt), n in zip(results, toks)]
    return {"wall_s": wall, "output_tokens": sum(toks), "throughput": sum(toks) / wall,
            "mean_tpot_ms": 1e3 * sum(tpot) / len(tpot),
            "tau": sum(toks) / sum(verify) if sum(verify) else None,
            "texts": [o["text"] for o, _ in results],
            "cached_tokens": [o["meta_info"].get("cached_tokens") for o, _ in results]}


CONFIG_LABELS = {"stock": "stock SGLang (torch_native)", "vanilla": "plain on longspec_cpu",
                 "longspec-no-cascade": "LONGSPEC, no shared level", "longspec": "LONGSPEC"}


def report(results: dict, cmd: str, max_new: int) -> str:
    """One row per cell: each configuration's output tok/s as a multiple of stock SGLang's (and
    LONGSPEC's of LONGSPEC without the shared level), TPOT, tau, the shared level's groups, and
    how many outputs equal stock's."""
    configs = [c for c in CONFIGS if any(c in row for row in results.values())]
    base = configs[0]
    lines = ["# Agent fleet over one repository: stock SGLang, plain on longspec_cpu, LONGSPEC "
             "without / with the shared level\n",
             f"Command: `{cmd}`\n",
             f"Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}; machine: {R.machine_desc()}; "
             f"model {R.DEFAULT_MODEL}, float32, greedy, {max_new} new tokens per request; "
             f"server flags (all): `{shlex.join(COMMON_ARGS)}`; configurations: "
             + "; ".join(f"{c}: `{shlex.join(CONFIGS[c][0]) or '(none)'}`"
                         + (f" with {CONFIGS[c][1]}" if CONFIGS[c][1] else "") for c in configs)
             + ".\n",
             f"Output tok/s (x {base}); TPOT in ms; tau = output tokens per verify step; groups = "
             "the shared level's groups in LONGSPEC's decode / verify / prefill batches; identical = "
             f"outputs equal to {base}'s.\n",
             "| cell | shared tokens | " + " | ".join(configs)
             + " | LONGSPEC x no-shared-level | TPOT (" + " / ".join(configs) + ") | tau | groups "
             "| identical |", "|---" * (len(configs) + 6) + "|"]

    def x(a, b):
        return f"{a['throughput'] / b['throughput']:.2f}x" if a and b else "-"

    for key, row in results.items():
        b = row.get(base)
        cells = [f"{row[c]['throughput']:.1f} ({x(row[c], b)})" if c in row else "-" for c in configs]
        ls, nc = row.get("longspec"), row.get("longspec-no-cascade")
        casc = (ls or {}).get("cascade", {})
        groups = "/".join(str(casc.get(f"cascade_{m}_groups", 0)) for m in ("decode", "verify", "extend"))
        ident = ", ".join(f"{c} {sum(a == t for a, t in zip(row[c]['texts'], b['texts']))}/"
                          f"{len(b['texts'])}" for c in configs[1:] if c in row and b)
        tpot = " / ".join(f"{row[c]['mean_tpot_ms']:.0f}" if c in row else "-" for c in configs)
        shared = next(iter(row.values()))["shared_tokens"]
        lines.append(f"| {key} | {shared} | " + " | ".join(cells) + f" | {x(ls, nc)} | {tpot} | "
                     f"{(ls or {}).get('tau') or 0:.2f} | {groups if ls else '-'} | {ident or '-'} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """Output tok/s against fleet size, one panel per shared-prefix length, one line per config."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_shared: dict[int, dict[int, dict]] = {}
    for key, row in results.items():
        s, n = (int(part[1:]) for part in key.split("/"))
        by_shared.setdefault(s, {})[n] = row
    fig, axes = plt.subplots(1, len(by_shared), figsize=(4 * len(by_shared), 3.4), squeeze=False)
    for ax, (s, cells) in zip(axes[0], sorted(by_shared.items())):
        fleets = sorted(cells)
        for cfg, label in CONFIG_LABELS.items():
            pts = [(n, cells[n][cfg]["throughput"]) for n in fleets if cfg in cells[n]]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        ax.set_title(f"shared prefix {s} tokens")
        ax.set_xlabel("fleet size (concurrent requests)")
        ax.set_xticks(fleets)
    axes[0][0].set_ylabel("output tok/s")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def save(out: Path, results: dict, cmd: str, max_new: int) -> None:
    """Written after every cell, so that a run cut short keeps what it measured."""
    (out / "results.json").write_text(json.dumps({"command": cmd, "results": results}, indent=1))
    (out / "README.md").write_text(report(results, cmd, max_new))
    plot(results, out / "fleet.png")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", type=int, nargs="+", default=[2048, 4096, 7168])
    ap.add_argument("--fleet", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--startup-timeout", type=float, default=900)
    args = ap.parse_args(argv)
    out: Path = args.out
    (out / "logs").mkdir(parents=True, exist_ok=True)
    from sgl_longspec.tools.models import resolve_model_path

    folder = resolve_model_path(R.DEFAULT_MODEL)
    tok = W.load_tokenizer(str(folder))
    cells = {(s, n): requests_for(tok, s, n) for s in args.shared for n in args.fleet}
    results: dict = {}
    cmd = "python -m benchmarks.bench_fleet " + shlex.join(argv if argv is not None else sys.argv[1:])
    for cfg in args.configs:
        flags, env = CONFIGS[cfg]
        stats = out / "logs" / f"stats-{cfg}.json"
        saved = {k: os.environ.get(k) for k in list(env) + ["LONGSPEC_STATS_FILE"]}
        os.environ.update(env)
        os.environ["LONGSPEC_STATS_FILE"] = str(stats)
        try:
            with R.Server(R.DEFAULT_MODEL, flags + COMMON_ARGS, out / "logs" / f"server-{cfg}.log",
                          R.free_port(), args.startup_timeout) as srv:
                for (s, n), (common, prompts) in cells.items():
                    before = json.loads(stats.read_text()) if stats.exists() else {}
                    cell = run_cell(srv, prompts, common, args.max_new_tokens)
                    after = json.loads(stats.read_text()) if stats.exists() else {}
                    cell["cascade"] = {k: v - before.get(k, 0) for k, v in after.items()
                                       if k.startswith("cascade_") and isinstance(v, (int, float))}
                    cell["shared_tokens"] = len(common)
                    results.setdefault(f"S{s}/N{n}", {})[cfg] = cell
                    print(f"{cfg} S={s} N={n}: {cell['throughput']:.1f} tok/s, tau {cell['tau']}, "
                          f"shared {len(common)}, cascade {cell['cascade']}", flush=True)
                    save(out, results, cmd, args.max_new_tokens)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    print(report(results, cmd, args.max_new_tokens))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
