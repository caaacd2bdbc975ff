"""Train an OWL LSTM drafter on the target's own generations.

    python -m sgl_longspec.training.owl_train --model-path M --out DIR [--device cpu|cuda] [--resume] ...

Pipeline:
1. Prompts: ShareGPT first user turns (chat), HumanEval prompts and Python stdlib code chunks (code);
   deterministic disjoint train / held-out splits (see ``sgl_longspec.training.owl_data``).
2. Data: batched Hugging Face generation by the target (training split: temperature
   ``--temperature``, default 1.0 as in the OWL recipe; held-out splits: greedy, so that the held-out
   metric is exactly greedy-verify acceptance). A hook on the LM head records the final-norm hidden
   state and the target's argmax of every decode step in the same forward pass as generation. The
   result is cached under ``--data-dir`` (default ``~/.cache/sgl_longspec/owl-data/<key>``) in
   resumable shards; a rerun with the same settings does not regenerate.
3. Training: labels are the target's greedy (argmax) tokens; inputs are the generated tokens
   (teacher forcing). The loss is the mean over steps of cross-entropy over a vocabulary subset
   (the ``--train-vocab`` most frequent label tokens plus ``--neg-samples`` random other tokens per
   batch), which cuts the cost of the shared 49152 x 576 LM-head matmul; evaluation always uses the
   full vocabulary. AdamW, cosine schedule with warmup, tqdm progress bar, checkpoint every
   ``--save-every`` steps (``DIR/train_state.pt`` + the drafter folder), ``--resume`` continues.
4. Evaluation on the held-out splits: per-step acceptance a_k = P(step k's argmax equals the
   target's greedy token | steps 1..k-1 were right), and the expected tau of an n_predict chain,
   bonus token included: tau = 1 + sum_k prod_{j<=k} a_j. Written to ``DIR/eval.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sgl_longspec.drafters.owl.checkpoint import build_drafter, load_drafter
from sgl_longspec.drafters.owl.model import OwlModel
from sgl_longspec.training import owl_data, owl_prompts


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sgl_longspec.training.owl_train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", default=None,
                   help="HF folder of the target (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--out", required=True, help="output drafter folder")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1 is fastest on a shared, oversubscribed CPU: OpenMP "
                        "threads spin-wait when cores are contended)")
    p.add_argument("--data-dir", default=None, help="dataset cache folder")
    p.add_argument("--resume", action="store_true", help="continue from DIR/train_state.pt")
    p.add_argument("--seed", type=int, default=0)
    # data
    p.add_argument("--n-chat", type=int, default=120, help="ShareGPT training prompts")
    p.add_argument("--n-humaneval", type=int, default=60, help="HumanEval training prompts")
    p.add_argument("--n-code-files", type=int, default=60, help="stdlib code training prompts")
    p.add_argument("--n-heldout-chat", type=int, default=24)
    p.add_argument("--n-heldout-code", type=int, default=24)
    p.add_argument("--max-prompt-tokens", type=int, default=128)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--heldout-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.7,
                   help="sampling temperature of the sampled training batches (0 = all greedy)")
    p.add_argument("--greedy-fraction", type=float, default=0.5,
                   help="fraction of training generation batches decoded greedily")
    p.add_argument("--gen-batch-size", type=int, default=48)
    p.add_argument("--gen-minutes", type=float, default=None,
                   help="time budget for generating the training split: stop after the batch that "
                        "crosses it and train on what is there (a rerun continues the build)")
    p.add_argument("--text-seqs", type=int, default=0,
                   help="also train on this many teacher-forced real-text sequences (ShareGPT "
                        "conversations, package source) labelled with the target's argmax: one "
                        "forward pass each, far cheaper than generation on a CPU")
    p.add_argument("--text-seq-len", type=int, default=384)
    p.add_argument("--text-batch-size", type=int, default=8)
    p.add_argument("--text-minutes", type=float, default=None, help="time budget for --text-seqs")
    p.add_argument("--long-text-seqs", type=int, default=0,
                   help="also train on this many teacher-forced long-context prompts (ShareGPT "
                        "conversations + summary request, package source + question; half at "
                        "--long-text-len / 2, half at --long-text-len tokens), so that the drafter "
                        "sees the target's hidden states deep into long contexts")
    p.add_argument("--long-text-len", type=int, default=4096)
    p.add_argument("--long-text-minutes", type=float, default=None,
                   help="time budget for --long-text-seqs")
    p.add_argument("--target-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    # model
    p.add_argument("--n-predict", type=int, default=4)
    p.add_argument("--proj-dim", type=int, default=512)
    # training
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--warmup", type=float, default=0.05, help="warmup fraction")
    p.add_argument("--train-vocab", type=int, default=4096)
    p.add_argument("--neg-samples", type=int, default=512)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--draft-vocab", type=int, default=8192,
                   help="draft from the N most frequent label tokens of the training data only "
                        "(0: the full vocabulary); with --eval-only, (re)computed and saved")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop training (and save) after this many minutes")
    p.add_argument("--eval-only", action="store_true", help="evaluate DIR on the held-out data")
    return p.parse_args(argv)


def load_target(model_path: str | None, device: str, dtype: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model_path is None:
        from sgl_longspec.tools.models import ensure_embedded_model

        model_path = str(ensure_embedded_model())
    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype))
    model.to(device).eval()
    for q in model.parameters():
        q.requires_grad_(False)
    return model_path, tok, model


def build_data(args, model_path, tok, model) -> dict[str, list[dict]]:
    settings = {k: getattr(args, k) for k in (
        "n_chat", "n_humaneval", "n_code_files", "n_heldout_chat", "n_heldout_code", "max_prompt_tokens",
        "max_new_tokens", "heldout_new_tokens", "temperature", "greedy_fraction", "seed", "target_dtype")}
    key = owl_data.data_key(model_path, settings)
    root = Path(args.data_dir) if args.data_dir else (
        Path(os.environ.get("LONGSPEC_CACHE", Path.home() / ".cache" / "sgl_longspec"))
        / "owl-data" / key)
    root.mkdir(parents=True, exist_ok=True)
    (root / "settings.json").write_text(json.dumps({"model": str(model_path), **settings}, indent=2))
    splits = owl_prompts.split_prompts(args.n_chat, args.n_humaneval, args.n_code_files,
                                       args.n_heldout_chat, args.n_heldout_code, seed=args.seed)
    out = {}
    for name in ("heldout_chat", "heldout_code", "train"):
        greedy = name != "train"
        out[name] = owl_data.build_split(
            model, tok, splits[name], root / name, max_prompt_tokens=args.max_prompt_tokens,
            max_new_tokens=args.heldout_new_tokens if greedy else args.max_new_tokens,
            temperature=0.0 if greedy else args.temperature,
            greedy_fraction=1.0 if greedy else args.greedy_fraction, batch_size=args.gen_batch_size,
            device=args.device, seed=args.seed + (0 if greedy else 1000), desc=name,
            max_minutes=None if greedy else args.gen_minutes)
    # Teacher-forced real text (short and long-context), cached next to the generated splits.
    for name, n_seqs, seq_len, batch, minutes, long in (
            ("text", args.text_seqs, args.text_seq_len, args.text_batch_size, args.text_minutes, False),
            ("long", args.long_text_seqs, args.long_text_len, 1, args.long_text_minutes, True)):
        if not n_seqs:
            continue
        key = owl_data.data_key(model_path, {f"{name}_seqs": n_seqs, "seed": args.seed,
                                             f"{name}_seq_len": seq_len, "target_dtype": args.target_dtype})
        out[name] = owl_data.build_text_split(
            model, tok, root.parent / f"{name}-{key}", n_seqs=n_seqs, seq_len=seq_len,
            batch_size=batch, device=args.device, seed=args.seed, max_minutes=minutes, long=long)
    print(f"data: {root} " + ", ".join(
        f"{k}={len(v)} seqs/{sum(len(s['gen']) for s in v)} tok" for k, v in out.items()),
        file=sys.stderr)
    return out


@torch.no_grad()
def evaluate_examples(drafter: OwlModel, hidden, inputs, labels, batch_size: int = 256) -> dict:
    """Per-step conditional acceptance and expected chain tau of the drafter as it drafts (over
    its draft vocabulary, if it has one; teacher forced: on the event 'all previous steps right'
    the drafter's own inputs equal the true tokens)."""
    drafter.eval()
    keep = (labels >= 0).all(dim=1)
    hidden, inputs, labels = hidden[keep], inputs[keep], labels[keep]
    N = inputs.shape[0]
    if N == 0:
        return {"n": 0}
    correct = []
    for i in range(0, N, batch_size):
        h = hidden[i:i + batch_size].float().to(drafter.device)
        y = drafter(h, inputs[i:i + batch_size].to(drafter.device))
        pred = drafter.draft_argmax(y).cpu()
        correct.append(pred == labels[i:i + batch_size])
    c = torch.cat(correct).float()
    chain = torch.cumprod(c, dim=1)  # all steps <= k right
    p_chain = chain.mean(0)
    prev = torch.cat([torch.ones(1), p_chain[:-1]])
    acc = (p_chain / prev.clamp_min(1e-9)).tolist()
    return {"n": int(N), "per_step_acceptance": [round(a, 4) for a in acc],
            "top1_unconditional": [round(a, 4) for a in c.mean(0).tolist()],
            "tau": round(1.0 + float(p_chain.sum()), 4)}


def evaluate_splits(drafter: OwlModel, splits: dict[str, list[dict]]) -> dict:
    res = {}
    for name, samples in splits.items():
        if not name.startswith("heldout"):
            continue
        h, x, y = owl_data.make_examples(samples, drafter.n_predict, full_only=True)
        res[name.replace("heldout_", "")] = evaluate_examples(drafter, h, x, y)
    return res


def frequent_label_ids(labels: torch.Tensor, n: int, vocab_size: int) -> torch.Tensor:
    """The ``n`` most frequent target labels (sorted ids): the draft vocabulary. Positions with
    label -1 (padding) are ignored."""
    y = labels[:, 0] if labels.dim() == 2 else labels
    y = y[y >= 0].long()
    counts = torch.bincount(y, minlength=vocab_size)
    n = min(n, vocab_size)
    return torch.sort(torch.argsort(counts, descending=True, stable=True)[:n]).values


def cosine_lr(step: int, total: int, base: float, warmup: float) -> float:
    w = max(1, int(total * warmup))
    if step < w:
        return base * (step + 1) / w
    t = (step - w) / max(1, total - w)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def train_loop(drafter: OwlModel, hidden: torch.Tensor, inputs: torch.Tensor,
               labels: torch.Tensor, *, steps: int, batch_size: int, lr: float,
               weight_decay: float = 0.1, warmup: float = 0.05, train_vocab: int = 8192,
               neg_samples: int = 1024, seed: int = 0, out: Path | None = None,
               save_every: int = 0, resume: bool = False, max_minutes: float | None = None,
               progress: bool = True, log: list | None = None) -> list[float]:
    """Train ``drafter`` in place; returns the per-step losses. ``hidden`` [N, H] (any float
    dtype), ``inputs``/``labels`` [N, n_predict] (labels -100 = ignore)."""
    from tqdm import tqdm

    device = drafter.device
    V = drafter.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    # vocabulary subset: most frequent label tokens (always in) + random negatives per batch
    valid = labels[labels >= 0]
    freq = torch.bincount(valid, minlength=V)
    nz = int((freq > 0).sum())
    base_ids = torch.argsort(freq, descending=True)[:min(train_vocab, nz)] if train_vocab else torch.arange(V)
    in_base = torch.zeros(V, dtype=torch.bool)
    in_base[base_ids] = True
    others = torch.nonzero(~in_base).flatten()
    lab_map = torch.full((V + 1,), -100, dtype=torch.long)  # index V = the -100 label
    lab_map[base_ids] = torch.arange(len(base_ids))
    labels_sub = lab_map[torch.where(labels >= 0, labels, torch.full_like(labels, V))]

    decay = [p for n, p in drafter.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in drafter.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))
    start = 0
    state_file = out / "train_state.pt" if out is not None else None
    if resume and state_file is not None and state_file.exists():
        st = torch.load(state_file, weights_only=False)
        drafter.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        start = int(st["step"])
        g.set_state(st["gen"])
        print(f"resumed from {state_file} at step {start}", file=sys.stderr)

    def save(step):
        if out is None:
            return
        drafter.save(out)
        tmp = state_file.with_suffix(".tmp")
        torch.save({"model": drafter.state_dict(), "opt": opt.state_dict(), "step": step,
                    "total": total, "steps_arg": steps, "gen": g.get_state()}, tmp)
        os.replace(tmp, state_file)

    N = inputs.shape[0]
    losses = []
    t0 = time.time()
    bar = tqdm(range(start, steps), desc="train", unit="step", disable=not progress,
               initial=start, total=steps)
    done = start
    drafter.train()
    total = steps
    if resume and state_file is not None and state_file.exists():
        # same --steps as the saved run: keep its (possibly time-shrunk) schedule
        if int(st.get("steps_arg", -1)) == steps:
            total = int(st.get("total", steps))
    t_probe = None
    for step in bar:
        if step >= total:
            break
        if max_minutes is not None and step == start + 10:
            t_probe = time.time()
        if t_probe is not None and step == start + 30:
            # shrink the schedule so that it ends (LR decayed) within --max-minutes
            per_step = (time.time() - t_probe) / 20
            left = 60 * max_minutes - (time.time() - t0)
            total = min(total, step + max(1, int(left / per_step)))
            bar.total = total
            t_probe = None
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, total, lr, warmup)
        idx = torch.randint(0, N, (min(batch_size, N),), generator=g)
        h = hidden[idx].to(device=device, dtype=torch.float32)
        x = inputs[idx].to(device)
        y_lab = labels_sub[idx].to(device)
        if neg_samples and len(others):
            neg = others[torch.randint(0, len(others), (neg_samples,), generator=g)]
            vocab_ids = torch.cat([base_ids, neg]).to(device)
        else:
            vocab_ids = base_ids.to(device)
        ys = drafter(h, x)  # [B, n, H]
        logits = drafter.logits(ys, vocab_ids)  # [B, n, Vs]
        n = x.shape[1]
        loss_k = []
        for k in range(n):
            lk = y_lab[:, k]
            if (lk >= 0).any():
                loss_k.append(F.cross_entropy(logits[:, k], lk, ignore_index=-100))
        loss = torch.stack(loss_k).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(drafter.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        with torch.no_grad():
            m = y_lab[:, 0] >= 0
            acc1 = float((logits[:, 0].argmax(-1)[m] == y_lab[m, 0]).float().mean()) if m.any() else 0.0
        bar.set_postfix(loss=f"{losses[-1]:.3f}", acc1=f"{acc1:.3f}", lr=f"{group['lr']:.1e}")
        if log is not None:
            log.append({"step": step + 1, "loss": losses[-1], "acc1": acc1,
                        "elapsed_s": round(time.time() - t0, 1)})
        if save_every and (step + 1) % save_every == 0:
            save(step + 1)
        done = step + 1
        if max_minutes is not None and time.time() - t0 > 60 * max_minutes + 30:
            print(f"stopping at step {done}: --max-minutes reached", file=sys.stderr)
            break
    bar.close()
    save(done)
    drafter.eval()
    return losses


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    model_path, tok, model = load_target(args.model_path, args.device, args.target_dtype)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    splits = build_data(args, model_path, tok, model)
    t_data = time.time() - t_start
    model_name = Path(model_path).name
    def set_draft_vocab(drafter, labels) -> None:
        if args.draft_vocab > 0:
            drafter.set_draft_vocab(frequent_label_ids(labels, args.draft_vocab,
                                                       drafter.config.vocab_size))
            drafter.config.training["draft_vocab"] = args.draft_vocab
        else:
            drafter.set_draft_vocab(None)

    train_samples = splits["train"] + splits.get("text", []) + splits.get("long", [])
    if args.eval_only:
        drafter = load_drafter(out, emb, head, device=args.device)
        n_vocab = 0 if drafter.draft_vocab is None else drafter.draft_vocab.numel()
        if n_vocab != args.draft_vocab:
            set_draft_vocab(drafter, owl_data.make_examples(train_samples, args.n_predict)[2])
            drafter.save(out)
    else:
        drafter = build_drafter(emb, head, n_predict=args.n_predict, proj_dim=args.proj_dim,
                                target_model=model_name).to(args.device)
        drafter.config.training = {
            "command": "python -m sgl_longspec.training.owl_train " + " ".join(argv if argv is not None else sys.argv[1:]),
            "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
            "temperature": args.temperature, "max_new_tokens": args.max_new_tokens,
            "train_vocab": args.train_vocab, "neg_samples": args.neg_samples}
        h, x, y = owl_data.make_examples(train_samples, args.n_predict)
        print(f"training examples: {len(x)}; drafter parameters: {drafter.num_parameters():,} "
              f"({drafter.nbytes() / 2**20:.1f} MiB)", file=sys.stderr)
        log: list = []
        t0 = time.time()
        train_loop(drafter, h, x, y, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                   weight_decay=args.weight_decay, warmup=args.warmup,
                   train_vocab=args.train_vocab, neg_samples=args.neg_samples, seed=args.seed,
                   out=out, save_every=args.save_every, resume=args.resume,
                   max_minutes=args.max_minutes, log=log)
        t_train = time.time() - t0
        drafter.config.training["steps_done"] = log[-1]["step"] if log else 0
        with open(out / "train_log.jsonl", "a") as f:
            for r in log:
                f.write(json.dumps(r) + "\n")
        drafter.config.training.update({"train_seconds": round(t_train, 1),
                                        "data_seconds": round(t_data, 1),
                                        "train_examples": int(len(x))})
        set_draft_vocab(drafter, y)
        drafter.save(out)
    res = evaluate_splits(drafter, splits)
    res["drafter_parameters"] = drafter.num_parameters()
    (out / "eval.json").write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
