"""A multi-turn code-editing agent on the official `openai` client with tool calls.

    python examples/agents/openai_tool_agent.py --base-url http://127.0.0.1:30000

It creates a small repository in a temporary folder (a Python package and a failing unittest),
gives the model three tools (`read_file`, `write_file`, `run_tests`) and loops: model turn -> tool
calls -> tool results, until the model answers without a tool call or --max-turns is reached.
Every turn prints output tokens, tokens/s and tau (accepted tokens per verify step, from SGLang's
per-request speculative stats: `extra_body={"return_spec_tokens_details": True}`).

Server: a model that follows tool calls, e.g. the embedded Qwen2.5-Coder with SGLang's Qwen tool
parser so that tool calls come back as structured `tool_calls`:

    .venv/bin/sgl-longspec serve --model-path qwen2.5-coder-0.5b-instruct \\
        --speculative-algorithm LONGSPEC --tool-call-parser qwen25

Without `--tool-call-parser` the agent also understands tool calls written in the reply text
(`<tool_call>{"name": ..., "arguments": ...}</tool_call>` or a bare JSON object). The default
SmolLM2-135M model runs the loop but does not solve the task, nor does Qwen2.5-Coder-0.5B (it drops
the file's first lines inside the JSON tool call); Qwen2.5-Coder-1.5B (`--model-path
qwen2.5-coder-1.5b-instruct`) finishes it in two turns (benchmarks/results/agents_1.5b).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import TASK, TOOLS, Stats, call_tool, create_repo, parse_text_tool_calls, run_tests  # noqa: E402

SYSTEM = ("You are a coding agent working in a Python repository. Use the tools to read files, "
          "write complete files and run the tests. When the tests pass, reply with a short summary "
          "and no tool call.")

# One worked exchange before the real task (few-shot): small models such as Qwen2.5-Coder-0.5B
# otherwise call write_file with a placeholder instead of the whole changed file.
_HELLO = '"""Greetings."""\n\nfrom hello.names import clean\n\n\ndef greet(name):\n    return "Hello " + clean(name)\n'
EXAMPLE = [
    {"role": "user", "content": f"hello/greet.py:\n```python\n{_HELLO}```\n\n"
                                "Task: make greet add a comma and an exclamation mark."},
    {"role": "assistant", "content": "", "tool_calls": [{"id": "example_1", "type": "function", "function": {
        "name": "write_file", "arguments": json.dumps({"path": "hello/greet.py", "content": _HELLO.replace(
            '"Hello " + clean(name)', '"Hello, " + clean(name) + "!"')})}}]},
    {"role": "tool", "tool_call_id": "example_1",
     "content": "wrote 107 characters to hello/greet.py\nTests after this change: PASSED. Reply DONE with a short summary."},
    {"role": "assistant", "content": 'DONE: greet now returns "Hello, <name>!".'},
]


def spec_verify_ct(resp) -> int | None:
    """SGLang's per-request verify step count (None without speculation or on other servers)."""
    data = resp.model_dump() if hasattr(resp, "model_dump") else dict(resp)
    ext = data.get("sglext") or {}
    det = ext.get("spec_tokens_details")
    if isinstance(det, list):
        det = det[0] if det else None
    if isinstance(det, dict) and det.get("spec_verify_ct"):
        return int(det["spec_verify_ct"])
    for choice in data.get("choices", []):  # older layouts: per-choice meta_info
        mi = choice.get("meta_info") or {}
        if mi.get("spec_verify_ct"):
            return int(mi["spec_verify_ct"])
    return None


def run_agent(base_url: str, model: str = "default", max_turns: int = 6, max_tokens: int = 512,
              repo: Path | None = None, timeout: float = 1800) -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=base_url.rstrip("/") + "/v1", api_key="EMPTY", timeout=timeout, max_retries=0)
    root = create_repo(repo)
    print(f"repository: {root}", flush=True)
    # The agent starts the way coding agents usually do: the file to edit is already in the
    # context (first), the task follows it.
    messages = [
        {"role": "system", "content": SYSTEM},
        *EXAMPLE,
        {"role": "user", "content": f"textstats/summary.py:\n```python\n"
                                    f"{call_tool(root, 'read_file', {'path': 'textstats/summary.py'})}```"
                                    f"\n\nTask: {TASK}"},
    ]
    stats = Stats()
    final = None
    passed = False
    seen = [("read_file", {"path": "textstats/summary.py"})]
    for turn in range(1, max_turns + 1):
        t0 = time.perf_counter()
        # Until the tests pass every turn must be a tool call: `tool_choice="required"` makes SGLang
        # constrain the reply to the tools' JSON schemas (small models otherwise answer in free
        # text); once they pass, the model writes its summary with no tool.
        resp = client.chat.completions.create(
            model=model, messages=messages, tools=TOOLS, temperature=0, max_tokens=max_tokens,
            tool_choice="none" if passed else "required", extra_body={"return_spec_tokens_details": True})
        dt = time.perf_counter() - t0
        msg = resp.choices[0].message
        n = resp.usage.completion_tokens if resp.usage else 0
        calls = [(c.id, c.function.name, json.loads(c.function.arguments or "{}")) for c in (msg.tool_calls or [])]
        if not calls:  # no server-side parser: read tool calls from the text
            calls = [(f"call_{turn}_{i}", name, args)
                     for i, (name, args) in enumerate(parse_text_tool_calls(msg.content or ""))]
        what = ", ".join(f"{name}({', '.join(f'{k}=' + repr(v)[:30] for k, v in args.items())})"
                         for _, name, args in calls) or f"answer: {(msg.content or '').strip()[:80]!r}"
        stats.add(turn, n, dt, spec_verify_ct(resp), what,
                  text=(msg.content or "") + json.dumps([c[1:] for c in calls]))
        if not calls:
            final = msg.content
            break
        messages.append({"role": "assistant", "content": msg.content or "", "tool_calls": [
            {"id": cid, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}
            for cid, name, args in calls]})
        for cid, name, args in calls:
            if (name, args) in seen:  # small models loop; point them at the next step
                result = (f"You already called {name} with these arguments; its result is above. "
                          "Take the next step: call write_file with the complete changed file.")
            else:
                result = call_tool(root, name, args)
                if name == "write_file":  # the repository changed: earlier reads and tests are stale
                    seen.clear()
                seen.append((name, args))
            passed = passed or result.startswith("PASSED") or "Tests after this change: PASSED" in result
            messages.append({"role": "tool", "tool_call_id": cid, "content": result})
    ok, out = run_tests(root)
    print(f"tests after the agent: {'PASSED' if ok else 'FAILED'}", flush=True)
    print(stats.summary(), flush=True)
    return {"repo": str(root), "tests_passed": ok, "turns": stats.turns, "final": final}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:30000")
    p.add_argument("--model", default="default")
    p.add_argument("--max-turns", type=int, default=6)
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--repo", default=None, help="folder for the toy repository (default: a temp dir)")
    args = p.parse_args(argv)
    run_agent(args.base_url, args.model, args.max_turns, args.max_tokens,
              Path(args.repo) if args.repo else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
