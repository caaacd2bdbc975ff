"""The LONGSPEC speculative worker: the SGLang adapter around sgl_longspec.step.controller.

One decode step, per batch:
1. the batch becomes RequestViews, and the controller (engine independent) keeps the suffix index
   in step with each request, drafts and lets the router decide what to verify (on TP rank 0; the
   decision is broadcast, sgl_longspec.adapter.tp_sync);
2. if nothing is worth verifying, SGLang's own plain decode step runs (bit-identical to vanilla,
   with every sampling feature); otherwise one ragged TARGET_VERIFY forward in which each request
   verifies only its own draft (1 + n_i tokens, never padded), through the hybrid tree attention;
3. the controller verifies (greedy or lossless sampling); this module moves the accepted slots'
   KV to the front of each request's window, computes logprobs of the accepted tokens when asked,
   and reports the result in the fixed-stride layout the scheduler expects.

Registration lives in sgl_longspec.adapter.algorithm; every SGLang name comes from sglang_compat.

Failures never take the server down and are never silent: a drafter, index or verify exception
turns the requests it touched to plain decoding, is counted by cause (`fallbacks` in stats()) and
logged with its traceback the first time each cause occurs.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import torch

from sgl_longspec.adapter import sglang_compat
from sgl_longspec.config import LongSpecConfig
from sgl_longspec.adapter.corpus_service import CorpusService
from sgl_longspec.adapter.loading import load_owl_drafter, load_startup_corpus
from sgl_longspec.adapter.radix_paths import radix_path
from sgl_longspec.adapter.observability import (attention_ms, cascade_counts, maybe_torch_profile,
                                                record_request_steps, verify_path_counts,
                                                write_stats_file)
from sgl_longspec.adapter.request_params import (batch_needs_engine_sampler, custom_processors,
                                                 finished_ok, logit_rules, opted_out,
                                                 redraw_seeded_first_tokens, request_seed,
                                                 sampling_params)
from sgl_longspec.adapter.tp_sync import RankZeroDecisions, tp_group
from sgl_longspec.adapter.verify_input import verify_input_cls
from sgl_longspec.step.controller import LongSpecController
from sgl_longspec.step.records import RequestView, StepPlan
from sgl_longspec.step.faults import Faults
from sgl_longspec.step.router import Load
from sgl_longspec.verify.layout import VerifyLayout

logger = logging.getLogger("sgl_longspec")


class LongSpecWorker(sglang_compat.name("BaseSpecWorker")):
    def __init__(self, server_args, gpu_id: int, nccl_port: int, target_worker):
        super().__init__()
        get_device, get_spec = sglang_compat.name("get_device"), sglang_compat.name("get_spec")
        self.server_args = server_args
        self._target_worker = target_worker
        self._draft_worker = None
        self.model_runner = target_worker.model_runner
        self.device = get_device().device
        self.window = int(get_spec().speculative_num_draft_tokens)  # verify width incl. the root
        self.speculative_num_draft_tokens = self.window
        self.config = LongSpecConfig.from_env()
        self.config.validate(self.window)
        self._warned_seeded_first = False  # redraw_seeded_first_tokens could not redraw (once)
        self.context_len = int(self.model_runner.model_config.context_len)
        self.row_width = None  # the req_to_token row width, once the pools exist (alloc_memory_pool)
        self.tp = RankZeroDecisions(tp_group())
        # Only the deciding rank drafts; the others follow its broadcast decisions.
        drafter = (load_owl_drafter(self.config, self.model_runner.model, self.device)
                   if self.tp.decides else None)
        self.controller = LongSpecController(
            self.config, self.window, owl_model=drafter, finished_ok=finished_ok,
            faults=Faults(), vocab_size=int(self.model_runner.model_config.vocab_size))
        if self.tp.decides and self.config.corpus_paths():
            load_startup_corpus(self.controller.corpus, self.config, server_args, target_worker)
        # SGLang's external-corpus calls, routed here by sgl_longspec.adapter.corpus_endpoints.
        self.corpus_service = CorpusService(self.controller.corpus, self.tp.decides,
                                            self.config.corpus_mb)
        # Optional JSON snapshot of the worker's state after every decode step (tests, debugging).
        self.stats_file = os.environ.get("LONGSPEC_STATS_FILE") or None
        self.prometheus = None
        if getattr(server_args, "enable_metrics", False) and self.tp.decides:
            from sgl_longspec.adapter.metrics import PrometheusCounters

            self.prometheus = PrometheusCounters()
        logger.info("LONGSPEC worker: window=%d tp_rank=%d/%d config=%s", self.window,
                    self.tp.rank, self.tp.world_size, self.config)

    def _checked_row_width(self, req_to_token_pool) -> int:
        """The req_to_token row width, checked at start-up against what each decode step reserves
        past a request's committed length (algorithm.req_to_token_headroom): a row narrower than
        that would crash the scheduler once a request nears the end of the context (issue 34),
        so such a server does not start."""
        from sgl_longspec.adapter.algorithm import req_to_token_headroom

        width = int(req_to_token_pool.req_to_token.shape[1])
        needed = self.context_len + req_to_token_headroom()
        if width < needed:
            raise RuntimeError(
                f"LONGSPEC: req_to_token rows hold {width} tokens, but a request at the end of the "
                f"{self.context_len}-token context reserves up to {needed} (context + "
                f"{needed - self.context_len}) at a decode step; the row sizing hook "
                f"({sglang_compat.REQ_TO_TOKEN_EXTRA}) did not apply")
        return width

    def _kv_room(self, batch) -> list[int]:
        """Per request, the draft tokens its KV window can take this step (RequestView.room):
        the root's slot and one per draft token, from its committed length on, inside the slots
        SGLang reserved for it and its req_to_token row, every position inside the context."""
        seq_lens = batch.seq_lens_cpu if batch.seq_lens_cpu is not None else batch.seq_lens
        rooms = []
        for req, seq_len in zip(batch.reqs, seq_lens.tolist()):
            allocated = getattr(getattr(req, "kv", None), "kv_allocated_len", None)
            width = self.row_width if self.row_width is not None else \
                int(batch.req_to_token_pool.req_to_token.shape[1])
            end = width if allocated is None else min(int(allocated), width)
            rooms.append(max(0, min(end - seq_len - 1, self.context_len - 1 - seq_len)))
        return rooms

    def _capture_mode(self, full: bool):
        if not self.controller.wants_hidden_states:
            return None
        mode = sglang_compat.name("CaptureHiddenMode")
        return mode.FULL if full else mode.LAST

    def stats(self) -> dict:
        return {**self.controller.stats(), "tp_broadcasts": self.tp.broadcasts, **attention_ms(),
                **cascade_counts(), **verify_path_counts()}

    def _write_stats(self) -> None:
        write_stats_file(self.stats_file, self.stats())

    # ---- SGLang worker interface ------------------------------------------------------------
    @property
    def draft_worker(self):
        return None

    def alloc_memory_pool(self, **kwargs):
        self.req_to_token_pool, self.token_to_kv_pool_allocator = (
            self._target_worker.get_memory_pool()
        )
        self.row_width = self._checked_row_width(self.req_to_token_pool)

    def init_attention_backends(self):
        pass

    def init_cuda_graphs(self):
        pass

    def init_hicache_draft_plan(self) -> None:
        pass

    def clear_cache_pool(self):
        self.controller.clear()

    def on_verify_complete_cpu(self, num_correct_drafts_per_req, batch_size: int = 0) -> None:
        pass

    # ---- requests as the controller sees them -----------------------------------------------
    def _view(self, b: int, req, info) -> RequestView:
        prompt = getattr(req, "origin_input_ids_unpadded", None) or req.origin_input_ids
        # A custom logit processor may read the request's state, which is only right at the
        # root: such a request decodes without drafts (its root row is processed as in plain
        # decoding, _custom_processors).
        no_drafts = opted_out(req) or getattr(req, "custom_logit_processor", None) is not None
        return RequestView(rid=req.rid, prompt=prompt, output=req.output_ids,
                           remaining=req.sampling_params.max_new_tokens - len(req.output_ids),
                           plain_only=no_drafts, handle=req, rules=logit_rules(b, req, info))

    def _plan(self, batch) -> StepPlan:
        """This step's plan: the drafts are decided on rank 0 and shared; every rank derives the
        logit rules (and so whether the verify path runs) from its own copy of the batch, which
        is the same on every rank."""
        info = batch.sampling_info
        views = [dataclasses.replace(self._view(b, r, info), room=room)
                 for (b, r), room in zip(enumerate(batch.reqs), self._kv_room(batch))]
        if batch_needs_engine_sampler(batch):
            views = [dataclasses.replace(v, plain_only=True, rules=None) for v in views]
        if self.tp.decides:
            plan = self.controller.plan_step(views, self._load(batch))
            self.tp.share_drafts(plan.drafts)
            return plan
        drafts = self.tp.share_drafts(None)
        return StepPlan(drafts, self.controller.step_rules(views, drafts, check_faults=False))

    @staticmethod
    def _load(batch) -> Load:
        free, total = sglang_compat.kv_headroom(batch)
        return Load(waiting=sglang_compat.waiting_requests(), kv_free_tokens=free, kv_total_tokens=total)

    # ---- the step -----------------------------------------------------------------------------
    def forward_batch_generation(self, batch, on_publish=None, pp_proxy_tensors=None):
        if not batch.forward_mode.is_decode():
            return self._forward_extend(batch, on_publish, pp_proxy_tensors)
        out = self._forward_decode(batch, on_publish, pp_proxy_tensors)
        if self.prometheus is not None:
            self.prometheus.update(self.controller.counters, self.controller.router.refusals)
        if self.stats_file and self.tp.decides:
            self._write_stats()
        return out

    def _forward_decode(self, batch, on_publish, pp_proxy_tensors):
        plan = self._plan(batch)
        drafts = plan.drafts
        attn0 = sum(attention_ms().values())
        t0 = time.perf_counter()
        if not plan.needs_verify_path:
            out = self._forward_plain_decode(batch, on_publish, pp_proxy_tensors)
            ms = 1e3 * (time.perf_counter() - t0)
            self.controller.record_step("plain", len(batch.reqs), len(batch.reqs), ms, ms,
                                        sum(attention_ms().values()) - attn0)
            return out
        try:
            out, forward_ms = self._forward_verify(batch, plan, on_publish, pp_proxy_tensors)
        except Exception:
            if self.tp.world_size > 1:
                raise  # the ranks would diverge: a plain redo on this rank alone would hang
            # Never let speculation take the server down: this step is redone as a plain decode
            # step (which rewrites the batch fields the verify path changed) and the requests
            # involved decode without drafts from now on.
            self.controller.fallback("verify", [r.rid for r in batch.reqs], "verify step")
            t0 = time.perf_counter()
            out = self._forward_plain_decode(batch, on_publish, pp_proxy_tensors)
            ms = 1e3 * (time.perf_counter() - t0)
            self.controller.record_step("plain", len(batch.reqs), len(batch.reqs), ms, ms)
            return out
        ms = 1e3 * (time.perf_counter() - t0)
        tokens = len(batch.reqs) + sum(len(d) for d in drafts)
        self.controller.record_step("verify", len(batch.reqs), tokens, ms, forward_ms,
                                    sum(attention_ms().values()) - attn0)
        return out

    def _result(self, batch, logits_output, can_run_cuda_graph, accept_tokens, accept_lens,
                new_seq_lens, next_token_ids, on_publish):
        GenerationBatchResult = sglang_compat.name("GenerationBatchResult")
        NgramVerifyInput = sglang_compat.name("NgramVerifyInput")
        if on_publish is not None:
            on_publish(new_seq_lens)
        next_draft_input = NgramVerifyInput(
            draft_token_num=self.window, new_seq_lens=new_seq_lens,
            accept_tokens=accept_tokens, accept_lens=accept_lens,
        )
        return GenerationBatchResult(
            logits_output=logits_output,
            next_token_ids=next_token_ids,
            can_run_cuda_graph=can_run_cuda_graph,
            accept_lens=accept_lens,
            new_seq_lens=new_seq_lens,
            next_draft_input=next_draft_input,
            speculative_num_draft_tokens=self.window,
        )

    def _one_token_result(self, batch, res):
        """A step that produced one token per request (prefill, plain decode), in the speculative
        output layout: stride `window`, one accepted token each."""
        bs = len(batch.reqs)
        if self.tp.decides:
            self.controller.remember_hidden([r.rid for r in batch.reqs],
                                            res.logits_output.hidden_states)
        accept_tokens = torch.zeros(bs, self.window, dtype=torch.int32, device=self.device)
        # next_token_ids (and next_token_logprobs) are what SGLang's sampler returned (or, for a
        # seeded request's first token, redraw_seeded_first_tokens' draw); next_token_logits is NOT
        # read here: after sampling it holds probabilities (sglang_compat.sampled_probs).
        accept_tokens[:, 0] = res.next_token_ids
        accept_lens = torch.ones(bs, dtype=torch.int32, device=self.device)
        return accept_tokens.flatten(), accept_lens

    def _forward_extend(self, batch, on_publish, pp_proxy_tensors):
        res = self.target_worker.forward_batch_generation(
            batch, pp_proxy_tensors=pp_proxy_tensors, capture_hidden_mode=self._capture_mode(False))
        if (any(request_seed(r) is not None for r in batch.reqs)
                and not redraw_seeded_first_tokens(batch, res, self.model_runner.sampler)
                and not self._warned_seeded_first):
            self._warned_seeded_first = True
            logger.warning("LONGSPEC: SGLang's sampler left no probabilities to redraw a seeded "
                           "request's first token from; its own (unseeded) draw is kept")
        accept_tokens, accept_lens = self._one_token_result(batch, res)
        return self._result(batch, res.logits_output, res.can_run_cuda_graph, accept_tokens,
                            accept_lens, batch.seq_lens.clone(), res.next_token_ids, on_publish)

    def _window_locs(self, batch) -> torch.Tensor:
        """KV slots the scheduler reserved per request for this step: [bs, window]. They lie
        inside the reservation (committed + twice the window) and so inside the row, which
        _checked_row_width made wide enough for it; only the first 1 + n_i of them, n_i within
        the request's room (_kv_room), are written."""
        bs = len(batch.reqs)
        locs = sglang_compat.name("assign_extend_cache_locs_func")(
            req_pool_indices=batch.req_pool_indices,
            req_to_token=batch.req_to_token_pool.req_to_token,
            start_offset=batch.seq_lens,
            end_offset=batch.seq_lens + self.window,
            batch_size=bs,
            draft_token_num=self.window,
            device=self.device,
        )
        return locs.view(bs, self.window)

    def _forward_plain_decode(self, batch, on_publish, pp_proxy_tensors):
        """SGLang's own one-token decode step inside the speculative protocol.

        The root token's KV goes to the first slot of each request's reserved window, which is
        exactly where a verify step would have left it, so nothing needs moving afterwards.

        SGLang's sampler applies the batch's grammar masks, logit bias and custom processors
        itself, as in plain decoding. Its penalizers are fed one token per step under speculative
        decoding (eagle_prepare_for_decode: output_ids[-1]) and so miss the extra tokens of
        multi-token verify steps: a batch with penalties is never decoded here (LogitRules.
        stateful sends it to the verify path), except one that needs SGLang's own sampler
        (watermark, deterministic inference: _batch_needs_engine_sampler), where they are SGLang's
        relaxed speculative penalties.
        """
        ForwardMode = sglang_compat.name("ForwardMode")
        bs = len(batch.reqs)
        window = self._window_locs(batch)
        seq_lens, seq_lens_cpu, seq_lens_sum = batch.seq_lens, batch.seq_lens_cpu, batch.seq_lens_sum
        batch.forward_mode = ForwardMode.DECODE
        batch.input_ids = torch.tensor([r.output_ids[-1] for r in batch.reqs], dtype=torch.int64,
                                       device=self.device)
        batch.out_cache_loc = window[:, 0].contiguous()
        batch.seq_lens = seq_lens + 1  # plain decode counts the token being decoded
        batch.seq_lens_cpu = seq_lens_cpu + 1 if seq_lens_cpu is not None else None
        batch.seq_lens_sum = (seq_lens_sum + bs) if seq_lens_sum is not None else None
        batch.spec_info = None
        try:
            with maybe_torch_profile("plain"):
                res = self.target_worker.forward_batch_generation(
                    batch, pp_proxy_tensors=pp_proxy_tensors,
                    capture_hidden_mode=self._capture_mode(False))
        finally:
            batch.seq_lens, batch.seq_lens_cpu, batch.seq_lens_sum = seq_lens, seq_lens_cpu, seq_lens_sum
        accept_tokens, accept_lens = self._one_token_result(batch, res)
        if self.tp.decides:
            record_request_steps(batch.reqs, None, None)
        logits_output = res.logits_output
        if batch.return_logprob and logits_output.next_token_logprobs is not None:
            # A speculative decode result has a row of logprobs per request (prefill results
            # keep SGLang's flat layout).
            logits_output.next_token_logprobs = logits_output.next_token_logprobs.reshape(bs, 1)
        return self._result(batch, logits_output, res.can_run_cuda_graph, accept_tokens,
                            accept_lens, seq_lens + 1, accept_tokens, on_publish)

    def _forward_verify(self, batch, plan, on_publish, pp_proxy_tensors):
        """One ragged TARGET_VERIFY forward; returns (result, forward ms)."""
        ForwardMode = sglang_compat.name("ForwardMode")
        drafts = plan.drafts
        bs = len(batch.reqs)
        n = self.window
        window = self._window_locs(batch)
        seq_lens_cpu = (batch.seq_lens_cpu if batch.seq_lens_cpu is not None else batch.seq_lens).tolist()
        roots = [r.output_ids[-1] for r in batch.reqs]
        layout = VerifyLayout.build(drafts, seq_lens_cpu, roots)
        verify_lens = layout.q_lens

        batch.forward_mode = ForwardMode.TARGET_VERIFY
        batch.input_ids = torch.tensor(layout.token_ids, dtype=torch.int64, device=self.device)
        batch.out_cache_loc = torch.cat([window[b, : verify_lens[b]] for b in range(bs)])
        positions = torch.tensor(layout.positions, dtype=torch.int64, device=self.device)
        # The CPU backend groups radix-shared prefixes by slot ids; a GPU one by the tree's paths.
        paths = [radix_path(r.last_node) for r in batch.reqs] if str(self.device) != "cpu" else None
        batch.spec_info = verify_input_cls()(layout=layout, positions=positions, draft_token_num=n,
                                              pool_rows=batch.req_pool_indices_cpu.tolist(),
                                              radix_paths=paths)
        t0 = time.perf_counter()
        with maybe_torch_profile("verify"):
            res = self.target_worker.forward_batch_generation(
                batch, pp_proxy_tensors=pp_proxy_tensors, is_verify=True,
                capture_hidden_mode=self._capture_mode(True))
        forward_ms = 1e3 * (time.perf_counter() - t0)
        logits_output = res.logits_output
        # Read-after assumption (SGLang 0.5.23, TpModelWorker.forward_batch_generation): with
        # is_verify=True it returns right after the forward, before ModelRunner.sample, so these
        # are the LogitsProcessor's logits of every verify slot, untouched by SGLang's sampling
        # path: no penalties, grammar mask, logit bias, custom processor or temperature yet, and
        # not overwritten by probabilities. Everything plain decoding's sampler would apply is
        # applied below, in its order (rules, then custom processors); verification and
        # compute_spec_logprobs then read them as plain decoding's sampler reads its row.
        logits = logits_output.next_token_logits

        if plan.rules is not None:
            # Every rank transforms its logits (logprobs read them); only rank 0 verifies.
            plan.rules.apply(logits, drafts)
        if getattr(batch.sampling_info, "has_custom_logit_processor", False):
            custom_processors(logits, batch.sampling_info, verify_lens)
        rids = [r.rid for r in batch.reqs]
        vr = None
        if self.tp.decides:
            if plan.rules is not None:
                self.controller.counters.rule_steps += 1
            seeds = [r.seed if r is not None else None for r in plan.rules.rules] \
                if plan.rules is not None else None
            vr = self.controller.verify(rids, drafts, logits, sampling_params(
                batch.sampling_info, seeds, verify_lens, layout.positions))
            if logits_output.hidden_states is not None:
                last_rows = vr.flat_kept_rows[torch.cumsum(vr.out_lens, 0) - 1]
                self.controller.remember_hidden(rids, logits_output.hidden_states[last_rows])
        if self.tp.world_size > 1:
            vr = self.tp.share(_to_cpu(vr) if vr is not None else None)

        # Fixed-stride outputs for the scheduler, and the KV compaction inside each window.
        per_req = vr.requests()
        accept_tokens = torch.zeros(bs, n, dtype=torch.int32)
        accept_index = torch.full((bs, n), -1, dtype=torch.int32)
        for b, r in enumerate(per_req):
            toks = r.output_tokens
            accept_tokens[b, : len(toks)] = torch.tensor(toks, dtype=torch.int32)
            accept_index[b, : len(r.accepted_slots)] = torch.tensor(
                [b * n + s for s in r.accepted_slots], dtype=torch.int32)
        accept_lens = torch.tensor([len(r.output_tokens) for r in per_req], dtype=torch.int32,
                                   device=self.device)
        accept_tokens = accept_tokens.to(self.device)
        if self.tp.decides:
            record_request_steps(batch.reqs, drafts, [r.num_accepted for r in per_req])
        if batch.return_logprob:
            self._accepted_logprobs(batch, logits_output, vr, verify_lens)

        batch.out_cache_loc = window.reshape(-1)
        sglang_compat.name("move_accept_tokens_to_target_kvcache")(
            batch, accept_index.to(self.device), accept_lens - 1, self.token_to_kv_pool_allocator)
        new_seq_lens = batch.seq_lens + accept_lens
        batch.forward_mode = ForwardMode.DECODE
        flat = accept_tokens.flatten()
        return self._result(batch, logits_output, res.can_run_cuda_graph, flat, accept_lens,
                            new_seq_lens, flat, on_publish), forward_ms

    def _accepted_logprobs(self, batch, logits_output, vr, verify_lens) -> None:
        """Logprobs (and top-k / token-id logprobs) of each accepted token, from the logits row
        that produced it, in the [bs, window] layout SGLang's result processor reads; computed by
        the helper SGLang's own speculative workers use, so they equal plain decoding's."""
        bs, n = len(batch.reqs), self.window
        rows = vr.flat_kept_rows.to(self.device)
        out_lens = vr.out_lens.tolist()
        predict = torch.zeros(sum(verify_lens), dtype=torch.int64, device=self.device)
        predict[rows] = vr.flat_out_tokens.to(self.device)
        accept_rows = torch.full((bs, n), -1, dtype=torch.int64)
        start = 0
        for b, k in enumerate(out_lens):
            accept_rows[b, :k] = rows[start:start + k].cpu()
            start += k
        # Padding reads the first row (never returned: only out_lens[b] tokens are appended).
        accept_rows.clamp_(min=0)
        sglang_compat.name("compute_spec_logprobs")(batch, logits_output, predict,
                                                    accept_index=accept_rows.to(self.device))


def _to_cpu(vr):
    return dataclasses.replace(vr, **{f.name: getattr(vr, f.name).cpu()
                                      for f in dataclasses.fields(vr)})
