"""Shared parts of the example agents: the toy repository, the tools, stats printing.

The agents work on a small Python package created in a temporary folder: `textstats/` with two
modules and a unittest suite. The task asks for a small change that makes the (initially failing)
test pass; the agent reads files, writes whole files back (a code-editing agent copies most of its
context, which is what suffix-tree speculation accelerates), and runs the tests.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

FILES = {
    "textstats/__init__.py": '''"""Small text statistics helpers."""

from textstats.counting import count_words, word_frequencies
from textstats.summary import summarize

__all__ = ["count_words", "word_frequencies", "summarize"]
''',
    "textstats/counting.py": '''"""Counting words in text."""

import re
from collections import Counter

WORD_RE = re.compile(r"[A-Za-z']+")


def tokenize(text):
    """Split text into lower-case words."""
    return [w.lower() for w in WORD_RE.findall(text)]


def count_words(text):
    """Number of words in text."""
    return len(tokenize(text))


def word_frequencies(text, top=None):
    """(word, count) pairs, most frequent first."""
    counts = Counter(tokenize(text))
    return counts.most_common(top)
''',
    "textstats/summary.py": '''"""A one-line summary of a text."""

from textstats.counting import tokenize, word_frequencies


def summarize(text):
    """Return a dict with the word count and the most common word."""
    words = tokenize(text)
    common = word_frequencies(text, top=1)
    return {
        "words": len(words),
        "most_common": common[0][0] if common else None,
    }
''',
    "tests/test_textstats.py": '''import unittest

from textstats import count_words, summarize, word_frequencies


class TextStatsTest(unittest.TestCase):
    def test_count(self):
        self.assertEqual(count_words("a b  c"), 3)

    def test_frequencies(self):
        self.assertEqual(word_frequencies("b a b", top=1), [("b", 2)])

    def test_summary_unique_words(self):
        self.assertEqual(summarize("a b a")["unique_words"], 2)


if __name__ == "__main__":
    unittest.main()
''',
}

TASK = ('Add a key "unique_words" to the dict that `summarize` in textstats/summary.py returns: '
        'the number of distinct words of the text. The failing test test_summary_unique_words in '
        'tests/test_textstats.py checks it. Keep the rest of the file unchanged, then run the tests.')


def create_repo(root: Path | None = None) -> Path:
    root = Path(root or tempfile.mkdtemp(prefix="agent-repo-"))
    for rel, text in FILES.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    (root / "tests" / "__init__.py").write_text("")
    return root


def _safe(root: Path, rel: str) -> Path:
    p = (root / rel).resolve()
    if root.resolve() not in p.parents and p != root.resolve():
        raise ValueError(f"path outside the repository: {rel}")
    return p


def read_file(root: Path, path: str) -> str:
    try:
        return _safe(root, path).read_text()
    except (OSError, ValueError) as e:
        return f"ERROR: {e}"


def write_file(root: Path, path: str, content: str) -> str:
    try:
        p = _safe(root, path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(content)
        return f"wrote {len(content)} characters to {path}"
    except (OSError, ValueError) as e:
        return f"ERROR: {e}"


def run_tests(root: Path) -> tuple[bool, str]:
    proc = subprocess.run([sys.executable, "-m", "unittest", "discover", "-s", "tests", "-t", "."],
                          cwd=root, capture_output=True, text=True, timeout=120)
    out = (proc.stdout + proc.stderr).strip()
    return proc.returncode == 0, out[-1500:]


TOOLS = [
    {"type": "function", "function": {
        "name": "read_file", "description": "Read a file of the repository.",
        "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}},
    {"type": "function", "function": {
        "name": "write_file",
        "description": "Replace a file of the repository: `content` is the whole new file, every "
                       "line of it (the unchanged lines too), and the tests run after the write.",
        "parameters": {"type": "object", "properties": {
            "path": {"type": "string", "description": "e.g. textstats/summary.py"},
            "content": {"type": "string", "description": "the complete new text of the file"}},
                       "required": ["path", "content"]}}},
    {"type": "function", "function": {
        "name": "run_tests", "description": "Run the repository's unit tests.",
        "parameters": {"type": "object", "properties": {}}}},
]


def call_tool(root: Path, name: str, arguments: dict) -> str:
    if name == "read_file":
        return read_file(root, str(arguments.get("path", "")))
    if name == "write_file":
        if not arguments.get("content"):  # a call without the file must not blank it
            return "ERROR: write_file needs `content`: the complete new file"
        done = write_file(root, str(arguments.get("path", "")), str(arguments["content"]))
        if done.startswith("ERROR"):
            return done
        # Every edit is followed by a test run, as in Aider's --auto-test: the model sees at once
        # whether its change works (small models rarely think of running the tests themselves).
        ok, out = run_tests(root)
        return (f"{done}\nTests after this change: " + ("PASSED. Reply DONE with a short summary."
                                                        if ok else "FAILED\n" + out))
    if name == "run_tests":
        ok, out = run_tests(root)
        return ("PASSED\n" if ok else "FAILED\n") + out
    return f"ERROR: unknown tool {name!r}"


_TOOL_CALL_RE = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.S)


def _json_objects(text: str) -> list:
    """Every top-level JSON object in the text, in order (models often write several tool calls
    one after another, or wrap them in a ``` fence)."""
    dec, objs, i = json.JSONDecoder(), [], 0
    while (i := text.find("{", i)) != -1:
        try:
            obj, end = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            i += 1
            continue
        objs.append(obj)
        i = end
    return objs


def parse_text_tool_calls(text: str) -> list[tuple[str, dict]]:
    """Tool calls written in the message text (Qwen's <tool_call>{...}</tool_call> format, or bare
    JSON objects with "name" and "arguments"), for replies the server's tool parser did not
    turn into structured calls."""
    blobs = _TOOL_CALL_RE.findall(text or "") or [text or ""]
    found = []
    for obj in (o for b in blobs for o in _json_objects(b)):
        if isinstance(obj, dict) and "name" in obj:
            args = obj.get("arguments", {})
            if isinstance(args, str):
                try:
                    args = json.loads(args)
                except json.JSONDecodeError:
                    args = {}
            found.append((obj["name"], args if isinstance(args, dict) else {}))
    return found


@dataclass
class Stats:
    turns: list = field(default_factory=list)

    def add(self, turn: int, tokens: int, seconds: float, verify_ct: int | None, what: str,
            text: str = "") -> None:
        """One model turn; `text` (the whole reply, not printed) lets runs be compared exactly."""
        tau = tokens / verify_ct if verify_ct else None
        self.turns.append({"turn": turn, "tokens": tokens, "seconds": seconds, "verify_ct": verify_ct,
                           "tau": tau, "what": what, "text": text})
        tau_s = f"{tau:.2f}" if tau is not None else "n/a (no speculation)"
        print(f"[turn {turn}] {tokens} tokens in {seconds:.1f}s = {tokens / max(seconds, 1e-9):.1f} tok/s, "
              f"tau {tau_s} -> {what}", flush=True)

    def summary(self) -> str:
        tok = sum(t["tokens"] for t in self.turns)
        sec = sum(t["seconds"] for t in self.turns)
        ver = sum(t["verify_ct"] or 0 for t in self.turns)
        tau = f"{tok / ver:.2f}" if ver else "n/a"
        return (f"TOTAL: {len(self.turns)} turns, {tok} tokens in {sec:.1f}s = "
                f"{tok / max(sec, 1e-9):.1f} tok/s, tau {tau}")
