"""Smoke test of the example agents (examples/agents/) against a real server.

Runs both agent loops end to end on the default model (SmolLM2-135M) with small max_tokens: it
checks that the loop talks to the server, runs tools on its toy repository and prints per-turn
stats, not that the model solves the task (the 135M model does not; the committed Qwen2.5-Coder
runs in benchmarks/results/agents/ do). Then both agents run on a LONGSPEC server: every turn's
reply must equal the plain server's (greedy, float32) and speculation must have paid (tau > 1
from SGLang's per-request verify counts).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "agents"


def _load(name: str):
    sys.path.insert(0, str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


def _server(server_pool):
    pytest.importorskip("sglang")
    pytest.importorskip("openai")
    # The default configuration (plain decoding): the same server as tests/test_server.py's.
    return server_pool.get(())


def test_toy_repository_and_tools(tmp_path):
    common = _load("common")
    root = common.create_repo(tmp_path / "repo")
    ok, out = common.run_tests(root)
    assert not ok and "unique_words" in out  # the task starts from a failing test
    src = common.call_tool(root, "read_file", {"path": "textstats/summary.py"})
    fixed = src.replace('"words": len(words),', '"words": len(words),\n        "unique_words": len(set(text.lower().split())),')
    common.call_tool(root, "write_file", {"path": "textstats/summary.py", "content": fixed})
    assert common.call_tool(root, "run_tests", {}).startswith("PASSED")
    assert common.call_tool(root, "read_file", {"path": "../outside"}).startswith("ERROR")
    assert common.parse_text_tool_calls('<tool_call>{"name": "run_tests", "arguments": {}}</tool_call>') == [
        ("run_tests", {})]
    agent = _load("sglang_frontend_agent")
    assert agent.parse_action("WRITE a.py\n```python\nx = 1\n```")[0] == "write_file"
    assert agent.parse_action("TEST")[0] == "run_tests"


@pytest.mark.server
def test_openai_tool_agent_runs(server_pool, tmp_path, capsys):
    srv = _server(server_pool)
    agent = _load("openai_tool_agent")
    res = agent.run_agent(srv.base_url, max_turns=2, max_tokens=24, repo=tmp_path / "repo", timeout=900)
    out = capsys.readouterr().out
    assert "[turn 1]" in out and "tok/s" in out and "TOTAL:" in out, out
    assert res["turns"] and res["turns"][0]["tokens"] > 0


@pytest.mark.server
def test_sglang_frontend_agent_runs(server_pool, tmp_path, capsys):
    srv = _server(server_pool)
    agent = _load("sglang_frontend_agent")
    res = agent.run_agent(srv.base_url, max_turns=2, max_tokens=24, repo=tmp_path / "repo")
    out = capsys.readouterr().out
    assert "[turn 1]" in out and "tok/s" in out and "TOTAL:" in out, out
    assert res["turns"] and res["turns"][0]["tokens"] > 0


# Every draft verified (no cost model): which steps speculate must not depend on how fast this
# machine happens to be, so that tau > 1 is a deterministic property of the greedy run.
LONGSPEC_ARGS = ("--speculative-algorithm", "LONGSPEC", "--longspec-cost-aware", "false")
AGENT_KWARGS = {"openai_tool_agent": {"max_turns": 2, "max_tokens": 64, "timeout": 900},
                "sglang_frontend_agent": {"max_turns": 2, "max_tokens": 64}}


@pytest.mark.server
def test_agents_speculate_on_longspec_and_match_plain(server_pool, tmp_path):
    # Both agents on the plain server first, then both on LONGSPEC: one server switch.
    runs = {}
    for cfg, srv in (("plain", lambda: _server(server_pool)), ("longspec", lambda: server_pool.get(LONGSPEC_ARGS))):
        base_url = srv().base_url
        for name, kw in AGENT_KWARGS.items():
            runs[cfg, name] = _load(name).run_agent(base_url, repo=tmp_path / cfg / name, **kw)
    for name in AGENT_KWARGS:
        plain, spec = runs["plain", name]["turns"], runs["longspec", name]["turns"]
        assert [t["text"] for t in spec] == [t["text"] for t in plain], name
        assert [t["tokens"] for t in spec] == [t["tokens"] for t in plain], name
        assert all(t["verify_ct"] is None for t in plain), name  # no speculation: no verify counts
        tokens = sum(t["tokens"] for t in spec)
        verify = sum(t["verify_ct"] or 0 for t in spec)
        assert verify > 0 and tokens / verify > 1.0, (name, tokens, verify, spec)
        for rel in ("textstats/summary.py",):  # the tools did the same to both repositories
            assert (tmp_path / "plain" / name / rel).read_text() == (tmp_path / "longspec" / name / rel).read_text()


def test_text_tool_calls_and_write_without_content(tmp_path):
    common = _load("common")
    calls = common.parse_text_tool_calls(
        '{"name": "read_file", "arguments": {"path": "a.py"}}\n'
        '```json\n{"name": "write_file", "arguments": "{\\"path\\": \\"a.py\\", \\"content\\": \\"x = {1: 2}\\"}"}\n```')
    assert calls == [("read_file", {"path": "a.py"}), ("write_file", {"path": "a.py", "content": "x = {1: 2}"})]
    assert common.parse_text_tool_calls("no call here {not json}") == []
    root = common.create_repo(tmp_path / "repo")
    before = common.read_file(root, "textstats/summary.py")
    assert common.call_tool(root, "write_file", {"path": "textstats/summary.py"}).startswith("ERROR")
    assert common.read_file(root, "textstats/summary.py") == before
