"""The README's first command: `sgl-longspec demo` shows an agent turn (a correct file edit on the
code model, checked by the demo itself) and a chat turn with and without speculation on one server,
its screen free of SGLang's log lines, and stops cleanly (--exit, SIGTERM), exit status 0, with
none of SGLang's crash messages."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import free_port
from sgl_longspec.tools.cli import DEMO_FILE, DEMO_RENAME, check_agent_edit


EXE = str(Path(sys.executable).parent / "sgl-longspec")
CRASH_MARKERS = ("crashed with exit code", "SIGQUIT received", "Traceback")


def _rows(out: str, name: str) -> list[list[float]]:
    """The numbers of each table row called `name` (tok/s, accept len, accepted drafts, steps)."""
    rows = []
    for line in out.splitlines():
        if line.strip().startswith(name):
            rows.append([float(x) for x in re.findall(r"[0-9]+(?:\.[0-9]+)?", line[len(name) + 2:])])
    return rows


# ------------------------------------------------------------------ the agent turn's self-check
def _edited(text: str = DEMO_FILE) -> str:
    return text.replace(*DEMO_RENAME)


@pytest.mark.parametrize("reply", [
    "```python\n" + _edited() + "```",
    "Here is the file:\n```python\n" + _edited() + "```\nI renamed the function.",
    "```py\n" + _edited().replace("\n", "  \n") + "```",  # trailing spaces do not count
    "```python\n" + _edited(),  # a reply cut at the token limit right after the file
])
def test_agent_edit_check_accepts_the_edit(reply):
    ok, why = check_agent_edit(reply)
    assert ok, why


@pytest.mark.parametrize("reply, says", [
    ("```python\n" + DEMO_FILE + "```", "no `def rolling_mean(`"),  # not renamed
    ("```python\n" + _edited().replace("total = 0.0", "total = 0") + "```", "line 6"),
    ("```python\n" + _edited().replace("    return out\n", "") + "```", "lines"),  # a line dropped
    ("```python\n" + _edited() + "print(rolling_mean([1, 2], 1))\n```", "lines"),  # one added
    ("def rolling_mean(values, window):\n    return values", "line 2"),
])
def test_agent_edit_check_refuses_what_is_not_the_edit(reply, says):
    ok, why = check_agent_edit(reply)
    assert not ok and says in why, why


# ------------------------------------------------------------------------------- the demo itself
@pytest.mark.server
def test_demo_shows_both_turns_side_by_side_and_exits_cleanly():
    pytest.importorskip("sglang")
    p = subprocess.run([EXE, "demo", "--speculative-algorithm", "LONGSPEC", "--exit",
                        "--port", str(free_port()), "--max-tokens", "112"],
                       capture_output=True, text=True, timeout=1200)
    both = p.stdout + p.stderr
    assert p.returncode == 0, both[-4000:]
    assert "[agent turn" in p.stdout and "[chat turn]" in p.stdout, p.stdout
    # the agent turn's reply is the requested edit, and the figures beside it come from that reply
    assert "reply check: OK, correct edit" in p.stdout, p.stdout
    assert "its log: " in p.stdout and "Decode batch" not in p.stdout, p.stdout  # SGLang's lines go to the log
    assert p.stdout.count("outputs identical") == 2, p.stdout
    spec, plain = _rows(p.stdout, "LONGSPEC"), _rows(p.stdout, "plain (same server)")
    assert len(spec) == len(plain) == 2, p.stdout
    assert spec[0][1] > 1.2 and spec[0][2] > 0, spec  # the agent turn really speculated
    assert plain[0][2] == 0 and plain[1][2] == 0, plain  # the opt-out really turned it off
    assert not [m for m in CRASH_MARKERS if m in both], both[-4000:]


@pytest.mark.server
def test_demo_stops_cleanly_on_sigterm():
    pytest.importorskip("sglang")
    proc = subprocess.Popen([EXE, "demo", "--speculative-algorithm", "LONGSPEC",
                             "--port", str(free_port()), "--max-tokens", "8"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines = []
    deadline = time.time() + 1200
    try:
        for line in proc.stdout:
            lines.append(line)
            if "still serving" in line or time.time() > deadline:
                break
        assert any("still serving" in ln for ln in lines), "".join(lines[-80:])
        os.kill(proc.pid, signal.SIGTERM)
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = "".join(lines) + rest
    assert proc.returncode == 0, out[-4000:]
    assert not [m for m in CRASH_MARKERS if m in out], out[-4000:]
