"""Training/evaluation data for the OWL drafter: the target's own generations on real prompts.

Prompt and text sources: ``sgl_longspec.training.owl_prompts``.

For every prompt the target generates a continuation; every decode step records the hidden state
that fed the LM head (final-norm output) at the position that produced the next token, and the
target's argmax at that position. A sample is (gen tokens g[L], hidden[L, H] fp16, argmax a[L]),
where hidden[i] is the state whose logits produced g[i] (hidden[0] is the last prompt position).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import time
from pathlib import Path

import torch

from sgl_longspec.training.owl_prompts import long_text_sequences, text_sequences


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
