"""Benchmark workload generation (benchmarks/workloads.py): deterministic, prompts of the requested
lengths, data from installed packages only."""

from __future__ import annotations

import re

import pytest

from benchmarks import workloads as W


class PieceTokenizer:
    """A tiny deterministic tokenizer (words, spaces, punctuation) with a ChatML template."""

    chat_template = "chatml"

    def __init__(self):
        self.vocab: dict[str, int] = {}
        self.inv: list[str] = []

    def encode(self, text, add_special_tokens=False):
        ids = []
        for piece in re.findall(r"\w+|\s+|[^\w\s]", text):
            if piece not in self.vocab:
                self.vocab[piece] = len(self.inv)
                self.inv.append(piece)
            ids.append(self.vocab[piece])
        return ids

    def decode(self, ids):
        return "".join(self.inv[i] for i in ids)

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True):
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        if add_generation_prompt:
            text += "<|im_start|>assistant\n"
        return self.encode(text) if tokenize else text


@pytest.fixture(scope="module")
def tok():
    return PieceTokenizer()


def _dump(sessions):
    return [(s.sid, s.label, s.system, [(t.user, t.max_new_tokens) for t in s.turns]) for s in sessions]


def test_longdoc_lengths_and_determinism(tok):
    a = W.longdoc_sessions(tok, ["1K", "2K", "4K"], per_bucket=2, max_new_tokens=32, context_len=8192, seed=3)
    b = W.longdoc_sessions(tok, ["1K", "2K", "4K"], per_bucket=2, max_new_tokens=32, context_len=8192, seed=3)
    assert _dump(a) == _dump(b)
    assert [s.label for s in a] == ["1K", "1K", "2K", "2K", "4K", "4K"]
    for s in a:
        n = W.chat_prompt_len(tok, s.first_messages())
        target = W.BUCKETS[s.label]
        assert 0.97 * target <= n <= target, (s.sid, n)
    c = W.longdoc_sessions(tok, ["1K"], per_bucket=2, max_new_tokens=32, context_len=8192, seed=4)
    assert _dump(c) != _dump(a[:2])


def test_longdoc_capped_by_context(tok):
    (s,) = W.longdoc_sessions(tok, ["8K"], per_bucket=1, max_new_tokens=128, context_len=8192, seed=0)
    assert W.chat_prompt_len(tok, s.first_messages()) + 128 <= 8192


def test_agent_and_chat_workloads(tok):
    for build, kw in ((W.code_edit_sessions, {}), (W.tool_json_sessions, {}), (W.chat_sessions, {"pool": 800})):
        a = build(tok, n_sessions=3, turns=2, max_new_tokens=16, seed=1, **kw)
        b = build(tok, n_sessions=3, turns=2, max_new_tokens=16, seed=1, **kw)
        assert _dump(a) == _dump(b)
        assert len(a) == 3 and all(len(s.turns) == 2 for s in a)
        assert all(t.max_new_tokens == 16 and t.user.strip() for s in a for t in s.turns)
    (s,) = W.code_edit_sessions(tok, n_sessions=1, turns=2, max_new_tokens=16, seed=0)
    old, new = s.meta["rename"]
    assert "```python" in s.turns[0].user and f"`{old}`" in s.turns[0].user and f"`{new}`" in s.turns[0].user


def test_sharegpt_reader_reads_complete_records():
    recs = list(W.iter_sharegpt(50))
    assert len(recs) == 50 and all("conversations" in r for r in recs)


def test_agentic_trace_loads_in_sglang_bench_serving(tok, tmp_path):
    """The exported trace is read by sglang.bench_serving's own agentic-trace loader into
    multi-turn rows whose rounds are exactly the sessions' messages, in order."""
    import json

    sglang_ds = pytest.importorskip("sglang.benchmark.datasets.agentic_trace")
    sessions = W.code_edit_sessions(tok, 2, 2, 64) + W.tool_json_sessions(tok, 2, 3, 64)
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(W.agentic_trace(tok, sessions, {"seed": 0})))
    rows = sglang_ds.AgenticTraceDataset(dataset_path=str(path), num_requests=0, fixed_output_len=None,
                                         offset=0, max_turns=None).load(tok)
    assert len(rows) == len(sessions)
    for row, s in zip(rows, sessions):
        assert len(row.prompt) == len(s.turns)
        # bench_serving replays a row as multi-turn when each round is a list of role/content dicts
        rounds = row.prompt
        assert all(isinstance(m, dict) and set(m) == {"role", "content"} for rnd in rounds for m in rnd)
        assert rounds[0] == s.first_messages()
        assert [r for rnd in rounds[1:] for r in rnd] == [{"role": "user", "content": t.user} for t in s.turns[1:]]
        assert row.prompt_len == W.chat_prompt_len(tok, s.first_messages())
