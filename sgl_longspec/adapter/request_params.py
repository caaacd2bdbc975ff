"""SGLang's request and sampling settings in the decode step's terms: whether a request finished
normally or opted out, its logit rules (penalties, grammar, logit bias, seed) as SGLang's sampler
would apply them, the batch's sampling parameters with the seeded requests' uniforms, and the
custom logit processors on the root rows; and a seeded request's first token, drawn with its seed."""

from __future__ import annotations

from typing import Optional

import torch

from sgl_longspec.adapter import sglang_compat
from sgl_longspec.adapter.algorithm import plain_runs_overlap
from sgl_longspec.step.records import SamplingParams
from sgl_longspec.drafters.draft import Draft
from sgl_longspec.verify.acceptance import seeded_uniforms, verify_sampling
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


def redraw_seeded_first_tokens(batch, res, sampler) -> bool:
    """The first token of a seeded sampling request, drawn as its later tokens are (with the
    uniform seeded_uniforms(seed, position)); SGLang's sampler drew it without the seed.

    Read after SGLang's sampler (sglang_compat.sampled_probs, checked there): Sampler.forward
    has OVERWRITTEN `next_token_logits` in place with softmax(processed logits / T), the
    probabilities it sampled from (after penalties, grammar, logit bias, custom processors;
    before top-k / top-p / min-p). They are not logits: the token is drawn from them with the
    request's top-k / top-p / min-p at temperature 1, passing log p as the logits
    (softmax(log p) = p), and its logprob is the one SGLang's sampler returns for a token it
    draws (sglang_compat.sampled_token_logprobs); top / token-id logprobs do not depend on
    the token. Where the tensor does not hold such probabilities, SGLang's own draw stays:
    the right law, only not reproducible by the seed; returns False then (the worker warns)."""
    info = batch.sampling_info
    if info.is_all_greedy or batch_needs_engine_sampler(batch):
        return True  # no sampling; or SGLang's sampler itself draws with the seed / a watermark
    out = res.logits_output
    if out.next_token_logits is None or out.next_token_logits.shape[0] != len(batch.reqs):
        return True  # nothing sampled here to redraw (SGLang's draw stands)
    rows = [b for b, r in enumerate(batch.reqs) if request_seed(r) is not None]
    idx = torch.tensor(rows, device=out.next_token_logits.device)
    probs = sglang_compat.sampled_probs(sampler, info, out.next_token_logits.index_select(0, idx))
    if probs is None:
        return False
    # the position of the token drawn (after a retraction the output re-enters the prefill)
    positions = [len(batch.reqs[b].origin_input_ids) + len(batch.reqs[b].output_ids)
                 for b in rows]
    u = torch.cat([seeded_uniforms(request_seed(batch.reqs[b]), [p]) for b, p in zip(rows, positions)])
    vr = verify_sampling([Draft.empty()] * len(rows), torch.log(probs), temperature=1.0,
                         top_k=info.top_ks.view(-1)[idx], top_p=info.top_ps.view(-1)[idx],
                         min_p=info.min_ps.view(-1)[idx], uniforms=u)
    tokens = torch.tensor([r.bonus_token for r in vr.requests()], device=probs.device)
    res.next_token_ids[idx] = tokens.to(res.next_token_ids.dtype)
    lp = out.next_token_logprobs
    if batch.return_logprob and lp is not None and lp.shape[0] == len(batch.reqs):
        lp[idx] = sglang_compat.sampled_token_logprobs(
            probs, tokens, info.temperatures.view(-1)[idx]).to(lp.dtype)
    return True
