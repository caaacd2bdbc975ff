"""The example agents (examples/agents/) on a real code model, plain decoding vs LONGSPEC.

    python -m benchmarks.bench_agents --out benchmarks/results/agents

Both agents (the `openai` tool-calling one and the SGLang frontend one) work on the same toy
repository task (add `unique_words` to `textstats.summary` so that the failing unit test passes).
Each runs to completion, once against a plain server and once against a LONGSPEC server, both on
the embedded Qwen2.5-Coder-0.5B-Instruct (float32, greedy) with SGLang's Qwen tool-call parser.
Each server is started fresh, so LONGSPEC drafts only from what the agent itself sent and produced.
`--model qwen2.5-coder-1.5b-instruct --agents openai_tool_agent` runs the tool-calling agent on the
1.5B model (bfloat16): the 0.5B model does not write a whole file inside a JSON tool call (it drops
the lines above `def`), while it does finish the frontend agent's code-block edit.

Saved: one log per (agent, server) with the agent's own per-turn lines (tokens, tok/s, tau, action),
results.json, and README.md with a per-turn side-by-side table, whether the agent finished its task
(the repository's tests pass afterwards) and whether every reply equals plain decoding's.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import shlex
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path

from benchmarks import run as R

EXAMPLES = R.REPO / "examples" / "agents"
AGENTS = ("openai_tool_agent", "sglang_frontend_agent")
MODEL = R.CODER_MODEL
COMMON_ARGS = ["--tool-call-parser", "qwen25", "--mem-fraction-static", "0.95", "--max-total-tokens", "16384"]
SERVERS = {"plain": [], "longspec": ["--speculative-algorithm", "LONGSPEC"]}


def load_agent(name: str):
    sys.path.insert(0, str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(f"agent_{name}", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


class _Tee(io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, s):
        for st in self.streams:
            st.write(s)
        return len(s)

    def flush(self):
        for st in self.streams:
            st.flush()


def run_one(name: str, base_url: str, repo: Path, max_turns: int, max_tokens: int, log: Path) -> dict:
    agent = load_agent(name)
    buf = io.StringIO()
    with contextlib.redirect_stdout(_Tee(sys.stdout, buf)):
        print(f"$ python examples/agents/{name}.py --base-url {base_url} --max-turns {max_turns} "
              f"--max-tokens {max_tokens}")
        res = agent.run_agent(base_url, max_turns=max_turns, max_tokens=max_tokens, repo=repo)
    log.write_text(buf.getvalue())
    return res


def _totals(turns: list[dict]) -> tuple[int, float, float | None]:
    tok, sec = sum(t["tokens"] for t in turns), sum(t["seconds"] for t in turns)
    ver = sum(t["verify_ct"] or 0 for t in turns)
    return tok, tok / max(sec, 1e-9), (tok / ver if ver else None)


def table(runs: dict, name: str) -> str:
    plain, spec = runs["plain"][name]["turns"], runs["longspec"][name]["turns"]
    out = ["| turn | action (LONGSPEC run) | tokens plain / LONGSPEC | plain tok/s | LONGSPEC tok/s | "
           "speedup | tau | same reply |", "|---|---|---|---|---|---|---|---|"]
    for i in range(max(len(plain), len(spec))):
        p = plain[i] if i < len(plain) else None
        s = spec[i] if i < len(spec) else None
        ptps = p["tokens"] / max(p["seconds"], 1e-9) if p else None
        stps = s["tokens"] / max(s["seconds"], 1e-9) if s else None
        cells = [str(i + 1), ((s or p)["what"][:60]).replace("|", "/"),
                 f"{p['tokens'] if p else '-'} / {s['tokens'] if s else '-'}",
                 f"{ptps:.1f}" if p else "-", f"{stps:.1f}" if s else "-",
                 f"{stps / ptps:.2f}x" if p and s else "-",
                 f"{s['tau']:.2f}" if s and s["tau"] else "-",
                 "yes" if p and s and p["text"] == s["text"] else "no"]
        out.append("| " + " | ".join(cells) + " |")
    (pt, ptps, _), (st, stps, stau) = _totals(plain), _totals(spec)
    same = len(plain) == len(spec) and all(a["text"] == b["text"] for a, b in zip(plain, spec))
    out.append(f"| **all** | | {pt} / {st} | {ptps:.1f} | {stps:.1f} | **{stps / ptps:.2f}x** | "
               f"{f'{stau:.2f}' if stau else '-'} | {'yes' if same else 'no'} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/agents"))
    ap.add_argument("--max-turns", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--startup-timeout", type=float, default=900)
    ap.add_argument("--model", default=MODEL, help="embedded model name or path (default: %(default)s)")
    ap.add_argument("--agents", nargs="+", choices=AGENTS, default=list(AGENTS))
    args = ap.parse_args(argv)
    out: Path = args.out
    (out / "logs").mkdir(parents=True, exist_ok=True)
    runs: dict = {cfg: {} for cfg in SERVERS}
    for cfg, extra in SERVERS.items():
        with R.Server(args.model, extra + COMMON_ARGS, out / "logs" / f"server-{cfg}.log", R.free_port(),
                      args.startup_timeout) as srv:
            for name in args.agents:
                repo = out / "work" / cfg / name
                shutil.rmtree(repo, ignore_errors=True)
                runs[cfg][name] = run_one(name, srv.base_url, repo, args.max_turns, args.max_tokens,
                                          out / f"{name}-{cfg}.log")
    shutil.rmtree(out / "work", ignore_errors=True)  # the toy repositories (the logs show them)
    cmd = "python -m benchmarks.bench_agents " + shlex.join(argv if argv is not None else sys.argv[1:])
    parts = [f"# Example agents on {args.model}: plain decoding vs LONGSPEC\n",
             f"Command: `{cmd}`\n",
             f"Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}; machine: {R.machine_desc()}; "
             f"server flags (both): `{shlex.join(COMMON_ARGS)}`, LONGSPEC adds "
             f"`{shlex.join(SERVERS['longspec'])}`; a fresh server per configuration; greedy.\n"]
    for name in args.agents:
        p, s = runs["plain"][name], runs["longspec"][name]
        parts.append(f"## {name}\n")
        parts.append(f"Task finished (tests pass afterwards): plain **{'yes' if p['tests_passed'] else 'no'}**, "
                     f"LONGSPEC **{'yes' if s['tests_passed'] else 'no'}**. Full logs: "
                     f"[`{name}-plain.log`]({name}-plain.log), [`{name}-longspec.log`]({name}-longspec.log).\n")
        parts.append(table(runs, name) + "\n")
    parts.append("tok/s is per turn (the client's wall time of the request, prefill included); tau = output "
                 "tokens / verify steps from SGLang's per-request `spec_verify_ct`; \"same reply\" compares the "
                 "whole reply text (and parsed tool calls) of the turn with plain decoding's.\n")
    (out / "README.md").write_text("\n".join(parts))
    (out / "results.json").write_text(json.dumps({"command": cmd, "runs": runs}, indent=1))
    print((out / "README.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
