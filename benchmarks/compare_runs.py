"""Two runs of `benchmarks.run` side by side, request by request: is every output the same, and
what did speculation do per cell (tau, verify steps, throughput). For checking that a change
kept behaviour (the same command before and after it), or that two configurations agree.

    python -m benchmarks.compare_runs BEFORE/results.json:longspec AFTER/results.json:longspec \
        --names before after --out benchmarks/results/SOMEWHERE

Requests are matched by (workload, label, concurrency, session, turn). Saved: comparison.json and
README.md (a table per cell and the command).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

KEY_FIELDS = ("workload", "label", "concurrency", "sid", "turn")


def load_run(spec: str) -> tuple[dict, dict]:
    """'path/results.json:config' -> (that configuration's run, the file's metadata)."""
    path, _, config = spec.rpartition(":")
    data = json.loads(Path(path).read_text())
    runs = {}
    for phase in data["phases"].values():
        runs.update(phase["runs"])
    if config not in runs:
        raise SystemExit(f"{path} has no configuration {config!r} (it has {sorted(runs)})")
    return runs[config], {k: data.get(k) for k in ("command", "date", "git_commit", "machine")}


def compare(a: dict, b: dict) -> dict:
    """Per cell of `a`: requests matched in `b`, identical outputs, and each run's figures."""
    by_key = {tuple(r[k] for k in KEY_FIELDS): r for r in b["requests"]}
    cells: dict[str, dict] = {}
    for r in a["requests"]:
        cell = f"{r['workload']}@c{r['concurrency']}"
        row = cells.setdefault(cell, {"requests": 0, "matched": 0, "identical": 0, "differ": []})
        row["requests"] += 1
        other = by_key.get(tuple(r[k] for k in KEY_FIELDS))
        if other is None:
            continue
        row["matched"] += 1
        if other["text_sha"] == r["text_sha"]:
            row["identical"] += 1
        else:
            row["differ"].append(f"{r['sid']} turn {r['turn']}")
    for cell, row in cells.items():
        for name, run in (("a", a), ("b", b)):
            res = run["results"].get(cell, {})
            reqs = [r for r in run["requests"] if f"{r['workload']}@c{r['concurrency']}" == cell]
            row[name] = {"tau": res.get("tau"), "throughput": res.get("throughput"),
                         "verify_steps": sum(r.get("spec_verify_ct") or 0 for r in reqs),
                         "output_tokens": res.get("output_tokens")}
    return cells


def report(cells: dict, names: tuple[str, str], meta: tuple[dict, dict], cmd: str) -> str:
    na, nb = names
    lines = [f"# {na} vs {nb}: the same benchmark, request by request\n",
             f"Command: `{cmd}`\n",
             f"- {na}: commit {meta[0].get('git_commit')}, {meta[0].get('date')}, `{meta[0].get('command')}`",
             f"- {nb}: commit {meta[1].get('git_commit')}, {meta[1].get('date')}, `{meta[1].get('command')}`\n",
             f"| cell | identical outputs | tau {na} / {nb} | verify steps {na} / {nb} | "
             f"tok/s {na} / {nb} |", "|---|---|---|---|---|"]

    def f(x, fmt):
        return "-" if x is None else format(x, fmt)

    for cell, row in cells.items():
        a, b = row["a"], row["b"]
        lines.append(f"| {cell} | {row['identical']}/{row['requests']} | {f(a['tau'], '.2f')} / "
                     f"{f(b['tau'], '.2f')} | {a['verify_steps']} / {b['verify_steps']} | "
                     f"{f(a['throughput'], '.1f')} / {f(b['throughput'], '.1f')} |")
    differ = [f"{cell}: {', '.join(row['differ'])}" for cell, row in cells.items() if row["differ"]]
    lines.append("\nOutputs that differ: " + ("; ".join(differ) if differ else "none") + ".")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a", help="results.json:config")
    ap.add_argument("b", help="results.json:config")
    ap.add_argument("--names", nargs=2, default=("a", "b"))
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    (a, ma), (b, mb) = load_run(args.a), load_run(args.b)
    cells = compare(a, b)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "comparison.json").write_text(json.dumps(
        {"a": args.a, "b": args.b, "names": args.names, "cells": cells}, indent=1))
    cmd = "python -m benchmarks.compare_runs " + shlex.join(argv if argv is not None else sys.argv[1:])
    text = report(cells, tuple(args.names), (ma, mb), cmd)
    (args.out / "README.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
