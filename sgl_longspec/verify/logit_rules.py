"""What a request's sampler does to the target's logits, applied at every verified position.

Plain decoding applies a request's penalties, grammar mask and logit bias to ONE row of logits: the
row that predicts its next token, given everything it has output so far. A verify pass scores a
whole draft tree at once, so each row must see the output as it would be if the draft tokens on
its path had been emitted: a frequency penalty counts them, a grammar mask is the grammar's mask
after accepting them, a min-new-tokens ban ends at the right depth. With that, greedy verification
emits exactly what plain decoding emits and sampling keeps its distribution (SGLang's own
speculative workers apply the penalties of the root to every row instead: "relaxed").

Engine independent: a grammar is anything with the small matcher interface below (SGLang's
`BaseGrammarObject` over xgrammar, outlines or llguidance has it); bitmasks are xgrammar's
layout (int32 words, bit t % 32 of word t // 32 set = token t allowed).

Order of application per row, as SGLang 0.5.23's sampler does it for one token: additive penalties
(frequency, presence, min-new-tokens), the multiplicative repetition penalty, the grammar mask,
then the logit bias.

Which tokens SGLang 0.5.23's penalizers count (srt/sampling/penaltylib, read, not guessed): only
what `ScheduleBatch.cumulate_penalty_output_tokens` feeds them, one token per decode step when the
step is PREPARED: `req.output_ids[-1]`, or `req.origin_input_ids[-1]` while the output is still
empty. Under the synchronous schedule the previous step's token is already appended, so the step
that draws output token k counts output tokens 0..k-1. Under the overlap schedule (SGLang's default
for plain decoding, also on CPU) the previous step's result is processed only after the next step
is prepared: the first decode step counts the prompt's LAST token, and the step that draws output
token k counts that prompt token and output tokens 0..k-2 (the newest output token is not counted
yet). The prefill's own draw counts nothing. `Penalties.prompt_tail` selects the overlap rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, Sequence

import numpy as np
import torch

from sgl_longspec.drafters.draft import Draft


class Grammar(Protocol):
    """A grammar matcher at the request's current state (after its committed output)."""

    def accept_token(self, token: int) -> None: ...

    def rollback(self, k: int) -> None: ...

    def is_terminated(self) -> bool: ...

    def allocate_vocab_mask(self, vocab_size: int, batch_size: int, device) -> torch.Tensor: ...

    def fill_vocab_mask(self, vocab_mask: torch.Tensor, idx: int) -> None: ...

    def apply_vocab_mask(self, logits: torch.Tensor, vocab_mask: torch.Tensor) -> None: ...


@dataclass(frozen=True)
class Penalties:
    """SGLang's sampling-parameter penalties, over the tokens its penalizers count (module
    docstring): the request's output tokens, shifted by one onto the prompt's last token when
    `prompt_tail` is set (the plain reference runs SGLang's overlap schedule)."""

    frequency: float = 0.0  # subtracted once per counted occurrence
    presence: float = 0.0  # subtracted once if the token was counted
    repetition: float = 1.0  # counted tokens: logit / r if positive, logit * r if negative
    min_new_tokens: int = 0  # stop tokens are banned while fewer tokens have been output
    stop_token_ids: tuple = ()
    # The prompt's last token (origin_input_ids[-1]) under the overlap rule; None: synchronous.
    prompt_tail: Optional[int] = None

    @property
    def active(self) -> bool:
        return (self.frequency != 0.0 or self.presence != 0.0 or self.repetition != 1.0
                or (self.min_new_tokens > 0 and bool(self.stop_token_ids)))


@dataclass
class LogitRules:
    """One request's logit rules (None fields: not used)."""

    penalties: Optional[Penalties] = None
    logit_bias: Optional[torch.Tensor] = None  # [V], added last
    grammar: Optional[Grammar] = None
    # sampling_seed of a sampling request: its draws use seeded_uniforms(seed, position)
    # (sgl_longspec.verify.acceptance), not the logits; listed here because it shares `stateful`'s need
    seed: Optional[int] = None

    @property
    def stateful(self) -> bool:
        """Rules that only the verify path applies exactly, so the engine's own sampler must not
        decode this request: penalties (their state counts every emitted token, SGLang's
        penalizers see one per step under speculative decoding) and sampling seeds (SGLang's
        CPU sampler ignores them outside deterministic inference)."""
        return (self.penalties is not None and self.penalties.active) or self.seed is not None

    @property
    def empty(self) -> bool:
        return (not self.stateful and self.logit_bias is None and self.grammar is None)


# ---- grammar ------------------------------------------------------------------------------------

def _allowed(mask_row: torch.Tensor, token: int, vocab_size: int) -> bool:
    if token < 0 or token >= vocab_size or (token >> 5) >= mask_row.shape[0]:
        return False
    return bool((int(mask_row[token >> 5]) >> (token & 31)) & 1)


def grammar_prune(draft: Draft, grammar: Grammar, vocab_size: int) -> tuple[Draft, torch.Tensor]:
    """Drop the draft nodes the grammar forbids (and their subtrees), and compute the grammar's
    bitmask for every verify slot of what is left: root first, then the kept nodes in order.

    Walks the tree depth first, accepting each allowed token and rolling it back afterwards, so
    the grammar ends in the state it started in. Below a node at which the grammar terminates
    nothing is kept (the engine stops the request there) and its row stays unconstrained, as
    SGLang's verify does.
    """
    n = len(draft)
    mask = grammar.allocate_vocab_mask(vocab_size=vocab_size, batch_size=n + 1, device="cpu")
    children: list[list[int]] = [[] for _ in range(n + 1)]  # by slot: 0 = root, i + 1 = node i
    for i, p in enumerate(draft.parents.tolist()):
        children[p + 1].append(i)
    tokens = draft.token_ids.tolist()
    kept = np.zeros(n, dtype=bool)

    def expand(slot: int) -> None:
        if grammar.is_terminated():
            return
        grammar.fill_vocab_mask(mask, slot)
        for i in children[slot]:
            if _allowed(mask[slot], tokens[i], vocab_size):
                grammar.accept_token(tokens[i])
                kept[i] = True
                try:
                    expand(i + 1)
                finally:
                    grammar.rollback(1)

    expand(0)
    if kept.all():
        return draft, mask
    idx = np.flatnonzero(kept)
    new_index = np.full(n, -1, dtype=np.int32)
    new_index[idx] = np.arange(len(idx), dtype=np.int32)
    parents = np.where(draft.parents[idx] < 0, -1, new_index[np.maximum(draft.parents[idx], 0)])
    probs = draft.probs[idx]
    pruned = Draft(draft.token_ids[idx], parents, probs, float(probs.sum()), draft.match_len,
                   draft.source)
    slots = torch.from_numpy(np.concatenate([[0], idx + 1]).astype(np.int64))
    return pruned, mask.index_select(0, slots)


# ---- penalties ----------------------------------------------------------------------------------

def _paths(draft: Draft) -> list[list[int]]:
    """Per verify slot, the draft tokens from the root's child down to that slot's node."""
    paths: list[list[int]] = [[]]
    for i, p in enumerate(draft.parents.tolist()):
        paths.append(paths[p + 1] + [int(draft.token_ids[i])])
    return paths


def counted_tokens(emitted: Sequence[int], prompt_tail: Optional[int]) -> list[int]:
    """The tokens SGLang's penalizers have counted when the next token is drawn after `emitted`
    output tokens (module docstring): all of them (synchronous schedule), or with `prompt_tail`
    (overlap schedule) the prompt's last token and all but the newest output token."""
    emitted = list(emitted)
    if prompt_tail is None or not emitted:
        return emitted
    return [int(prompt_tail)] + emitted[:-1]


def apply_penalties(logits: torch.Tensor, output: Sequence[int], draft: Draft,
                    pen: Penalties) -> None:
    """In place on one request's verify rows [n + 1, V] (slot order of `draft`): each row as
    SGLang 0.5.23 computes the one row of a plain decode step after the output extended by the
    draft tokens on its path, float for float (SamplingBatchInfo.update_penalties and
    _apply_pre_grammar_logits_transforms):
      acc = zeros; acc -= F (frequency: f scatter-added once per counted token); acc -= P
      (presence: p scattered onto the counted tokens); acc += min-new-tokens stop penalty (-inf);
      logits += acc; then logits = where(logits < 0, logits * R, logits / R) with R = r on the
      counted tokens, 1 elsewhere (apply_scaling_penalties).
    (-F - P equals -P - F exactly, so the set order in which SGLang visits its penalizers does
    not matter; adding the sum once differs from subtracting F and P in turn in the last bit.)"""
    rows, vocab = logits.shape
    dev = logits.device
    paths = _paths(draft)
    need_counts = pen.frequency != 0.0 or pen.presence != 0.0 or pen.repetition != 1.0
    if need_counts:
        freq = torch.zeros(rows, vocab, dtype=torch.float32, device=dev)
        seen = torch.zeros(rows, vocab, dtype=torch.bool, device=dev)
        f = torch.tensor(float(pen.frequency), dtype=torch.float32, device=dev)
        for r, path in enumerate(paths):
            toks = torch.as_tensor(counted_tokens(list(output) + path, pen.prompt_tail),
                                   dtype=torch.long, device=dev)
            toks = toks[(toks >= 0) & (toks < vocab)]
            # One scatter-add of the same float32 f per occurrence, as the penalizer adds one
            # per step: equal addends make the float sum independent of their order.
            freq[r].scatter_add_(0, toks, f.expand(len(toks)))
            seen[r, toks] = True
    acc = None
    if need_counts and (pen.frequency != 0.0 or pen.presence != 0.0):
        acc = torch.zeros(rows, vocab, dtype=torch.float32, device=dev)
        if pen.frequency != 0.0:
            acc.sub_(freq)
        if pen.presence != 0.0:
            acc.sub_(torch.where(seen, torch.tensor(float(pen.presence), dtype=torch.float32,
                                                    device=dev), torch.tensor(0.0, device=dev)))
    if pen.min_new_tokens > 0 and pen.stop_token_ids:
        stop = torch.tensor([t for t in pen.stop_token_ids if 0 <= t < vocab], dtype=torch.long,
                            device=dev)
        # SGLang's len_output_tokens: one per cumulated step, the same count under both schedules
        emitted = len(output) + torch.tensor([len(p) for p in paths], device=dev)
        banned = (emitted < pen.min_new_tokens).nonzero().squeeze(1)
        if len(banned) and len(stop):
            if acc is None:
                acc = torch.zeros(rows, vocab, dtype=torch.float32, device=dev)
            acc[banned.unsqueeze(1), stop.unsqueeze(0)] += float("-inf")
    if acc is not None:
        logits.add_(acc)  # float32 into the logits' dtype, as SGLang adds it
    if pen.repetition != 1.0:
        scale = torch.where(seen, torch.tensor(float(pen.repetition), dtype=torch.float32,
                                               device=dev),
                            torch.tensor(1.0, dtype=torch.float32, device=dev))
        logits[:] = torch.where(logits < 0, logits * scale, logits / scale)


# ---- a verify batch ------------------------------------------------------------------------------

class StepRules:
    """The rules of one verify batch: for request b, its LogitRules, its committed output and,
    with a grammar, the bitmask of each of its verify slots (from grammar_prune)."""

    def __init__(self, rules: Sequence[Optional[LogitRules]], outputs: Sequence[Sequence[int]],
                 grammar_masks: Sequence[Optional[torch.Tensor]]):
        self.rules = list(rules)
        self.outputs = list(outputs)
        self.grammar_masks = list(grammar_masks)

    @property
    def any(self) -> bool:
        return any(r is not None and not r.empty for r in self.rules)

    @property
    def stateful(self) -> bool:
        return any(r is not None and r.stateful for r in self.rules)

    def apply(self, logits: torch.Tensor, drafts: Sequence[Draft]) -> None:
        """In place on the flat verify logits [sum(n_b + 1), V], request after request."""
        start = 0
        for b, d in enumerate(drafts):
            end = start + len(d) + 1
            r = self.rules[b]
            if r is not None and (r.penalties is not None or r.grammar is not None
                                  or r.logit_bias is not None):
                rows = logits[start:end]
                if r.penalties is not None and r.penalties.active:
                    apply_penalties(rows, self.outputs[b], d, r.penalties)
                mask = self.grammar_masks[b]
                if r.grammar is not None and mask is not None:
                    if mask.shape[0] != end - start:
                        raise ValueError(f"request {b}: {mask.shape[0]} grammar mask rows for "
                                         f"{end - start} verify slots")
                    r.grammar.apply_vocab_mask(rows, mask.to(rows.device))
                if r.logit_bias is not None:
                    rows.add_(r.logit_bias.to(rows.device, rows.dtype))
            start = end
        if start != logits.shape[0]:
            raise ValueError(f"{logits.shape[0]} logits rows for {start} verify slots")
