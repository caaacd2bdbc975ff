"""What LONGSPEC reads after SGLang's own sampler, checked against SGLang 0.5.23's code on CPU
(issue 33): Sampler.forward overwrites `next_token_logits` with the probabilities it sampled from,
so a seeded request's first token is drawn from those (sglang_compat.sampled_probs) and gets the
logprob SGLang returns for it (sglang_compat.sampled_token_logprobs); and the schedule plain
decoding would run on a server's flags, which decides what SGLang's penalizers count, is recorded
at launch (sglang_algo.plain_runs_overlap)."""

from __future__ import annotations

import types
from collections import Counter

import pytest
import torch

pytest.importorskip("sglang")

from sgl_longspec.adapter import sglang_compat  # noqa: E402
from sgl_longspec.drafters.draft import Draft  # noqa: E402
from sgl_longspec.verify.acceptance import seeded_uniforms, verify_sampling  # noqa: E402

V = 50
TEMPS = torch.tensor([[0.7], [1.0], [1.3]])


def sglang_sampler():
    """SGLang's Sampler on its standard (pytorch, non-deterministic) path, without the runtime
    context a server publishes (its constructor reads it; forward's unfiltered path does not)."""
    from sglang.srt.layers.logprob_processor import OutputLogprobProcessor
    from sglang.srt.layers.sampler import Sampler

    s = Sampler.__new__(Sampler)
    torch.nn.Module.__init__(s)
    s.rl_on_policy_target, s.enable_deterministic, s.use_log_softmax_logprob = None, False, False
    s.use_ascend_backend, s.sampling_mask_max_tokens = False, 0
    s.output_logprob_processor = OutputLogprobProcessor()
    s.tp_sync_group = s.cp_sync_group = None
    return s


def sampling_info(all_greedy: bool = False):
    bs = TEMPS.shape[0]
    return types.SimpleNamespace(
        is_all_greedy=all_greedy, has_custom_logit_processor=False, temperatures=TEMPS,
        need_top_p_sampling=False, need_top_k_sampling=False, need_min_p_sampling=False,
        sampling_seed=None, sampling_mask_batch_indices=None,
        sampling_support_logprobs_capture_indices=None, grammars=None,
        top_ps=torch.ones(bs), top_ks=torch.full((bs,), 1 << 30), min_ps=torch.zeros(bs))


def run_sampler(logits, info):
    from sglang.srt.layers.logits_processor import LogitsProcessorOutput

    out = LogitsProcessorOutput(next_token_logits=logits.clone())
    bs = logits.shape[0]
    ids = sglang_sampler().forward(out, info, True, [0] * bs, [None] * bs,
                                   torch.zeros(bs, dtype=torch.long))
    return out, ids


def test_sampler_leaves_probabilities_and_their_logprobs():
    """After SGLang's sampler, next_token_logits holds softmax(logits / T), not logits (the
    assumption the old first-token redraw got wrong); sampled_probs reads it back, and
    sampled_token_logprobs gives the logprob SGLang returned for the token it drew."""
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(0)) * 3
    info = sampling_info()
    out, ids = run_sampler(logits, info)
    want = torch.softmax(logits / TEMPS, dim=-1)
    assert torch.allclose(out.next_token_logits, want, atol=1e-6)
    assert not torch.allclose(out.next_token_logits, logits / TEMPS)
    probs = sglang_compat.sampled_probs(sglang_sampler(), info, out.next_token_logits)
    assert probs is not None and torch.allclose(probs, want, atol=1e-6)
    lp = sglang_compat.sampled_token_logprobs(probs, ids.long(), TEMPS.view(-1))
    assert torch.allclose(lp, out.next_token_logprobs.float(), atol=1e-6)


def test_sampled_probs_refuses_what_are_not_probabilities():
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(1)) * 3
    s = sglang_sampler()
    assert sglang_compat.sampled_probs(s, sampling_info(), logits) is None  # raw logits
    probs = torch.softmax(logits, -1)
    assert sglang_compat.sampled_probs(s, sampling_info(all_greedy=True), probs) is None
    s.use_ascend_backend = True  # that backend samples from the logits themselves
    assert sglang_compat.sampled_probs(s, sampling_info(), probs) is None


def test_seeded_draw_from_the_probabilities_follows_them():
    """The first-token redraw (log p as logits at temperature 1, seeded uniforms) draws from p:
    over many seeds its frequencies match p (a draw from softmax(p), the old bug, is close to
    uniform and does not)."""
    p = torch.softmax(torch.tensor([[4.0, 2.0, 1.0] + [-2.0] * (V - 3)]), -1)
    n = 4000

    def draws(rows):
        u = torch.cat([seeded_uniforms(seed, [17]) for seed in range(n)])
        vr = verify_sampling([Draft.empty()] * n, rows.expand(n, V), temperature=1.0,
                             uniforms=u)
        return Counter(r.bonus_token for r in vr.requests())

    got = draws(torch.log(p))
    for t in range(3):
        assert abs(got[t] / n - float(p[0, t])) < 0.03, (t, got[t] / n, float(p[0, t]))
    old = draws(p)  # probabilities taken for logits
    assert old[0] / n < 0.1 < float(p[0, 0])


def test_plain_schedule_is_recorded_before_longspec_forces_its_own(monkeypatch):
    from sgl_longspec.adapter.algorithm import PLAIN_OVERLAP_ENV, configure_server_args, plain_runs_overlap

    monkeypatch.setenv(PLAIN_OVERLAP_ENV, "")
    for disabled, overlap in ((False, True), (True, False)):
        args = types.SimpleNamespace(
            speculative_draft_model_path=None, speculative_num_draft_tokens=None, device="cpu",
            attention_backend=None, disable_overlap_schedule=disabled, enable_mixed_chunk=False)
        configure_server_args(args)
        assert args.disable_overlap_schedule  # LONGSPEC itself runs synchronously
        assert plain_runs_overlap() is overlap
