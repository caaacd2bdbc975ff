"""Held-out evaluation of an OWL drafter at long context (1K .. 8K prompt tokens).

    python -m sgl_longspec.training.owl_evaluate --drafter DIR [--model-path M] \
        [--lengths 256x2,1024x2,2048x2,4096x2,8192x2] [--new-tokens 128] [--cache DIR] [--out FILE.json]

Each prompt is a long context followed by an instruction, with the target's chat template:
even prompts concatenate ShareGPT conversations ("summarise the conversations above"), odd
prompts concatenate Python standard-library source ("explain the last function above"); the
context is cut so that the templated prompt has the requested number of tokens. The target decodes
greedily (chunked prefill, KV cache); every step records the final-norm hidden state and the argmax.
The drafter is scored exactly like the short held-out sets of ``sgl_longspec.training.owl_train``:
per-step conditional greedy acceptance and expected chain tau (bonus included). Because the drafter
only sees the last hidden state, its cost is the same at every length; this measures whether its
accuracy is too.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

from sgl_longspec.drafters.owl.checkpoint import load_drafter
from sgl_longspec.training import owl_data, owl_prompts
from sgl_longspec.training.owl_train import evaluate_examples, load_target

def long_prompt_ids(tok, n_tokens: int, index: int, seed: int = 0) -> list[int]:
    """A templated chat prompt of exactly ``n_tokens`` tokens (context cut from the front): even
    ``index`` = ShareGPT conversations (the first 400 records) + a summary request, odd = Python
    standard-library source + "explain the last function"."""
    rng = random.Random(seed * 1000 + index)
    if index % 2 == 0:
        convs = owl_prompts.sharegpt_conversations(400)
        rng.shuffle(convs)
        pieces, q = [owl_prompts.render_conversation(c) for c in convs], owl_prompts.SUMMARY_Q
    else:
        files = owl_prompts.stdlib_files()
        rng.shuffle(files)
        pieces, q = owl_prompts.code_file_pieces(files[:200]), owl_prompts.CODE_Q
    return owl_prompts.fit_context_ids(tok, pieces, q, n_tokens)


@torch.no_grad()
def greedy_record(model, prompt: list[int], new_tokens: int, device: str, chunk: int = 1024) -> dict:
    """Greedy decode with chunked prefill; records the final-norm hidden state and argmax that
    produced each generated token (same sample format as ``sgl_longspec.training.owl_data``)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    base = model.get_decoder()
    head = model.get_output_embeddings()
    ids = torch.tensor([prompt], device=device)
    h_last = None
    for s in range(0, ids.shape[1], chunk):
        out = base(input_ids=ids[:, s:s + chunk], past_key_values=cache, use_cache=True)
        h_last = out.last_hidden_state[:, -1]
    gen, hid, am = [], [], []
    for _ in range(new_tokens):
        logits = head(h_last)
        t = int(logits.argmax(-1))
        gen.append(t)
        am.append(t)
        hid.append(h_last[0].to(torch.float16).cpu())
        out = base(input_ids=torch.tensor([[t]], device=device), past_key_values=cache, use_cache=True)
        h_last = out.last_hidden_state[:, -1]
    return {"prompt_len": len(prompt), "gen": torch.tensor(gen, dtype=torch.int32),
            "hidden": torch.stack(hid), "argmax": torch.tensor(am, dtype=torch.int32)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sgl_longspec.training.owl_evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--drafter", default=None)
    p.add_argument("--model-path", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--lengths", default="256x2,1024x2,2048x2,4096x2,8192x2",
                   help="comma-separated prompt lengths, each optionally xN prompts")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--record-only", action="store_true",
                   help="only record (and cache) the target's generations; needs --cache")
    p.add_argument("--cache", default=None, help="folder caching the recorded generations")
    p.add_argument("--out", default=None, help="write the results JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model_path, tok, model = load_target(args.model_path, args.device, "float32")
    drafter = None
    if not args.record_only:
        drafter = load_drafter(args.drafter, model.get_input_embeddings(),
                               model.get_output_embeddings(), device=args.device)
    cache = Path(args.cache) if args.cache else None
    if cache:
        cache.mkdir(parents=True, exist_ok=True)
    max_ctx = int(getattr(model.config, "max_position_embeddings", 8192))
    res = {"drafter": str(args.drafter), "model": Path(model_path).name,
           "new_tokens": args.new_tokens, "lengths": {}}
    for spec in [x for x in args.lengths.split(",") if x]:
        L, _, count = spec.partition("x")
        L, count = int(L), int(count or 1)
        n_prompt = min(L, max_ctx - args.new_tokens - 1)
        samples = []
        t0 = time.time()
        for i in range(count):
            f = cache / f"len{L}-{i}-{args.new_tokens}.pt" if cache else None
            if f is not None and f.exists():
                s = torch.load(f, weights_only=False)
            else:
                s = greedy_record(model, long_prompt_ids(tok, n_prompt, i), args.new_tokens,
                                  args.device)
                if f is not None:
                    torch.save(s, f)
            samples.append(s)
        if drafter is None:
            print(f"{L}: recorded {count} in {time.time() - t0:.0f}s", file=sys.stderr)
            continue
        h, x, y = owl_data.make_examples(samples, drafter.n_predict, full_only=True)
        r = evaluate_examples(drafter, h, x, y)
        r["prompt_tokens"] = [s["prompt_len"] for s in samples]
        r["seconds"] = round(time.time() - t0, 1)
        res["lengths"][str(L)] = r
        print(f"{L}: {json.dumps(r)}", file=sys.stderr)
    text = json.dumps(res, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
