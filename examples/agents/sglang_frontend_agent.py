"""The same code-editing agent loop as an SGLang frontend program (`@sgl.function`).

    python examples/agents/sglang_frontend_agent.py --base-url http://127.0.0.1:30000

The whole multi-turn loop is one `@sgl.function`: each turn is `sgl.gen` inside an assistant
message; Python code between the turns parses the action, runs the tool on the toy repository
(temporary folder, see common.py) and appends the observation as the next user message. The
program state is one growing conversation, so SGLang's radix cache reuses the prefix of every
turn, and a suffix-tree drafter sees the file it is asked to write back.

Actions use a plain-text protocol (no server-side tool parser needed):
    READ <path> | WRITE <path> + a ```python block with the complete file | TEST | DONE <summary>

Server: any model; the embedded Qwen2.5-Coder follows the protocol, e.g.
    .venv/bin/sgl-longspec serve --model-path qwen2.5-coder-0.5b-instruct --speculative-algorithm LONGSPEC
Per turn it prints output tokens, tokens/s and tau (from the request's `meta_info`).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import TASK, Stats, call_tool, create_repo, read_file, run_tests  # noqa: E402

import sglang as sgl  # noqa: E402

# Small models follow a worked example far better than a list of commands (given only the list,
# Qwen2.5-Coder-0.5B echoes it back); the example uses a file the repository does not have, so
# that its path is not copied.
SYSTEM = (
    "You are a coding agent in a Python repository. You act by replying with exactly one command, "
    "nothing else.\n\n"
    "Commands:\n"
    "- `READ path` shows a file.\n"
    "- `WRITE path` on the first line, then the complete new content of the file in one ```python "
    "block. This replaces the file.\n"
    "- `TEST` runs the unit tests.\n"
    "- `DONE summary` ends the task once the tests pass.\n\n"
    "For example, to replace the file hello.py with a new version, reply:\n"
    "WRITE hello.py\n```python\nprint(\"hello, world\")\n```")

_WRITE_RE = re.compile(r"WRITE\s+(\S+)\s*```(?:python)?\n(.*?)```", re.S)


def parse_action(reply: str) -> tuple[str, dict]:
    text = reply.strip()
    m = _WRITE_RE.search(text)
    if m:
        return "write_file", {"path": m.group(1), "content": m.group(2)}
    m = re.search(r"READ\s+(\S+)", text)
    if m:
        return "read_file", {"path": m.group(1)}
    if re.search(r"\bTEST\b", text):
        return "run_tests", {}
    if text.startswith("DONE") or not text:
        return "done", {}
    # A bare code block: treat it as the new version of the file under edit.
    m = re.search(r"```(?:python)?\n(.*?)```", text, re.S)
    if m:
        return "write_file", {"path": "textstats/summary.py", "content": m.group(1)}
    return "none", {}


@sgl.function
def coding_agent(s, root: str, max_turns: int, max_tokens: int, stats: Stats):
    root_p = Path(root)
    s += sgl.system(SYSTEM)
    # The file first, then the task: an instruction after its context is followed better.
    s += sgl.user(f"textstats/summary.py:\n```python\n{read_file(root_p, 'textstats/summary.py')}```"
                  f"\n\nTask: {TASK}")
    done_actions: list = []
    for turn in range(1, max_turns + 1):
        name = f"turn{turn}"
        t0 = time.perf_counter()
        s += sgl.assistant(sgl.gen(name, max_tokens=max_tokens, temperature=0))
        reply = s[name]  # waits for the generation
        dt = time.perf_counter() - t0
        meta = s.get_meta_info(name) or {}
        action, args = parse_action(reply)
        stats.add(turn, int(meta.get("completion_tokens", 0)), dt,
                  int(meta.get("spec_verify_ct", 0) or 0) or None,
                  f"{action}({', '.join(f'{k}=' + repr(v)[:30] for k, v in args.items())})", text=reply)
        if action == "done":
            break
        if action == "none":
            s += sgl.user("Reply with one action: READ, WRITE, TEST or DONE.")
            continue
        if (action, args) in done_actions:  # small models loop; point them at the next step
            s += sgl.user(f"You already did {action} with these arguments; its result is above. "
                          "Take the next step: WRITE the complete changed file, TEST, or DONE.")
            continue
        if action == "write_file":  # the repository changed: earlier reads and tests are stale
            done_actions.clear()
        done_actions.append((action, args))
        result = call_tool(root_p, action, args)
        s += sgl.user(f"Result of {action}:\n{result}")


def run_agent(base_url: str, max_turns: int = 6, max_tokens: int = 512, repo: Path | None = None,
              chat_template: str | None = None) -> dict:
    probe = sgl.RuntimeEndpoint(base_url)
    if chat_template is None:  # SmolLM2 and Qwen use ChatML; pick by the served model's path
        path = probe.get_model_name().lower()
        chat_template = "qwen" if "qwen" in path else "chatml"
    backend = sgl.RuntimeEndpoint(base_url, chat_template_name=chat_template)
    root = create_repo(repo)
    print(f"repository: {root} (chat template {chat_template})", flush=True)
    stats = Stats()
    state = coding_agent.run(root=str(root), max_turns=max_turns, max_tokens=max_tokens, stats=stats,
                             backend=backend)
    err = state.error() if hasattr(state, "error") else None
    if err:
        print(f"program error: {err}", flush=True)
    ok, _ = run_tests(root)
    print(f"tests after the agent: {'PASSED' if ok else 'FAILED'}", flush=True)
    print(stats.summary(), flush=True)
    return {"repo": str(root), "tests_passed": ok, "turns": stats.turns}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:30000")
    p.add_argument("--max-turns", type=int, default=6)
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--repo", default=None)
    p.add_argument("--chat-template", default=None, help="SGLang frontend chat template name")
    args = p.parse_args(argv)
    run_agent(args.base_url, args.max_turns, args.max_tokens, Path(args.repo) if args.repo else None,
              args.chat_template)
    return 0


if __name__ == "__main__":
    sys.exit(main())
