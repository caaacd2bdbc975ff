"""SGLang's request and sampling settings in the decode step's terms: whether a request finished
normally or opted out, its logit rules (penalties, grammar, logit bias, seed) as SGLang's sampler
would apply them, the batch's sampling parameters with the seeded requests' uniforms, and the
custom logit processors on the root rows."""

from __future__ import annotations

from typing import Optional

import torch

from sgl_longspec.adapter import sglang_compat
from sgl_longspec.adapter.algorithm import plain_runs_overlap
from sgl_longspec.step.records import SamplingParams
from sgl_longspec.verify.acceptance import seeded_uniforms
from sgl_longspec.verify.logit_rules import LogitRules, Penalties


def finished_ok(req) -> bool:
    """A request that left the batch finished normally (not aborted, not retracted)."""
    reason = getattr(req, "finished_reason", None)
    return bool(req.finished()) and type(reason).__name__ != "FINISH_ABORT"


def opted_out(req, key: str = "longspec") -> bool:
    """A request may turn a LONGSPEC feature off for itself: `"sampling_params":
    {"custom_params": {key: "off"}}`; "longspec": speculation (e.g. to compare with plain
    decoding on the same server), "longspec_stats": its meta_info figures."""
    params = getattr(req.sampling_params, "custom_params", None)
    return isinstance(params, dict) and str(params.get(key, "")).lower() == "off"


def batch_needs_engine_sampler(batch) -> bool:
    """Sampling features only SGLang's own sampler implements: the batch decodes plainly."""
    info = batch.sampling_info
    return bool(getattr(info, "has_watermark_candidates", False)
                or getattr(info, "sampling_seed", None) is not None)  # deterministic inference


def logit_rules(b: int, req, info) -> Optional[LogitRules]:
    """Request b's penalties, grammar and logit bias, as SGLang's sampler would apply them."""
    sp = req.sampling_params
    pen = None
    if (sp.frequency_penalty or sp.presence_penalty or sp.repetition_penalty != 1.0
            or sp.min_new_tokens > 0):
        stop = set(sp.stop_token_ids or ()) | set(getattr(req, "eos_token_ids", None) or ())
        tok = getattr(req, "tokenizer", None)
        if tok is not None:
            stop |= set(getattr(tok, "additional_stop_token_ids", None) or ())
            if getattr(tok, "eos_token_id", None) is not None:
                stop.add(tok.eos_token_id)
        # Which tokens SGLang's penalizers count depends on plain decoding's schedule (see
        # sgl_longspec.verify.logit_rules): under the overlap schedule (SGLang's default, recorded at
        # launch) its first decode step counts the prompt's last token, origin_input_ids[-1]
        # as in ScheduleBatch.cumulate_penalty_output_tokens, and the newest output token lags.
        tail = int(req.origin_input_ids[-1]) if plain_runs_overlap() and req.origin_input_ids \
            else None
        pen = Penalties(float(sp.frequency_penalty), float(sp.presence_penalty),
                        float(sp.repetition_penalty), int(sp.min_new_tokens), tuple(sorted(stop)),
                        prompt_tail=tail)
    bias = None
    if getattr(info, "logit_bias", None) is not None and sp.logit_bias:
        bias = info.logit_bias[b]
    grammar = req.grammar
    if grammar is not None and (grammar.finished or grammar.is_terminated()):
        grammar = None  # SGLang leaves such rows unconstrained
    rules = LogitRules(pen, bias, grammar, request_seed(req))
    return None if rules.empty else rules


def custom_processors(logits, info, verify_lens) -> None:
    """Custom logit processors on the root rows (the requests that have one verify no draft)."""
    roots = torch.tensor([0] + verify_lens[:-1], device=logits.device).cumsum(0)
    root_logits = logits.index_select(0, roots)
    sglang_compat.name("apply_custom_logit_processor")(root_logits, info)
    logits.index_copy_(0, roots, root_logits)


def sampling_params(info, seeds=None, verify_lens=None, pos=None) -> SamplingParams:
    """The batch's sampling parameters; with `seeds` (per request, None = unseeded), the
    uniforms of the seeded requests' verify slots: each depends only on (seed, position of the
    token it draws), so a seeded request samples the same tokens whatever its batch."""
    if info.is_all_greedy:
        return SamplingParams(all_greedy=True)
    uniforms = None
    if seeds is not None and any(s is not None for s in seeds):
        uniforms = torch.full((sum(verify_lens),), float("nan"), dtype=torch.float64)
        start = 0
        for seed, n in zip(seeds, verify_lens):
            if seed is not None:
                uniforms[start:start + n] = seeded_uniforms(seed, [p + 1 for p in pos[start:start + n]])
            start += n
    return SamplingParams(False, info.temperatures.view(-1), info.top_ks.view(-1),
                          info.top_ps.view(-1), info.min_ps.view(-1), uniforms)


def request_seed(req) -> Optional[int]:
    """A sampling request's sampling_seed (greedy requests need none)."""
    sp = req.sampling_params
    if sp.sampling_seed is None or sp.temperature < 1e-6 or sp.top_k == 1:
        return None
    return int(sp.sampling_seed)
