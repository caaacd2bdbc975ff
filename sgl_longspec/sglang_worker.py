"""The LONGSPEC speculative worker: the SGLang adapter around sgl_longspec.controller.

One decode step, per batch:
1. the batch becomes RequestViews, and the controller (engine independent) keeps the suffix index
   in step with each request, drafts and lets the router decide what to verify (on TP rank 0; the
   decision is broadcast, sgl_longspec.tp_sync);
2. if nothing is worth verifying, SGLang's own plain decode step runs (bit-identical to vanilla,
   with every sampling feature); otherwise one ragged TARGET_VERIFY forward in which each request
   verifies only its own draft (1 + n_i tokens, never padded), through the hybrid tree attention;
3. the controller verifies (greedy or lossless sampling); this module moves the accepted slots'
   KV to the front of each request's window, computes logprobs of the accepted tokens when asked,
   and reports the result in the fixed-stride layout the scheduler expects.

Registration lives in sgl_longspec.sglang_algo; every SGLang name comes from sglang_compat.

Failures never take the server down and are never silent: a drafter, index or verify exception
turns the requests it touched to plain decoding, is counted by cause (`fallbacks` in stats()) and
logged with its traceback the first time each cause occurs.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time

from pathlib import Path
from typing import Optional

import torch

from sgl_longspec import sglang_compat
from sgl_longspec.config import LongSpecConfig
from sgl_longspec.controller import (LongSpecController, RequestView, SamplingParams, StepPlan,
                                     verify_layout)
from sgl_longspec.draft import Draft
from sgl_longspec.faults import Faults
from sgl_longspec.logit_rules import LogitRules, Penalties
from sgl_longspec.router import Load
from sgl_longspec.sglang_algo import plain_runs_overlap
from sgl_longspec.verify import seeded_uniforms, verify_sampling
from sgl_longspec.tp_sync import RankZeroDecisions, tp_group

logger = logging.getLogger("sgl_longspec")


def _attention_ms() -> dict:
    """Attention time inside the CPU backend, when it is the one in use."""
    try:
        from sgl_longspec.cpu.attention import ATTENTION_MS
    except Exception:  # no CPU layer (GPU build)
        return {}
    return {f"attention_{mode}_ms": ms for mode, ms in ATTENTION_MS.items()}


def _cascade_counts() -> dict:
    """The CPU backend's cascade counters (shared-prefix groups planned), when it is in use."""
    try:
        from sgl_longspec.cpu.attention import CASCADE_COUNTS
    except ImportError:  # no CPU layer (GPU build)
        return {}
    return {f"cascade_{name}": n for name, n in CASCADE_COUNTS.items()}


_PROFILE_DIR = os.environ.get("LONGSPEC_TORCH_PROFILE_DIR")
_profiled: dict[str, int] = {}


def _maybe_torch_profile(kind: str, steps: int = 20):
    """With LONGSPEC_TORCH_PROFILE_DIR set, the torch profiler runs over the first `steps` forwards
    of each kind (after 5 warm-up ones) and writes its operator table there (profiling only)."""
    import contextlib

    n = _profiled.get(kind, 0)
    _profiled[kind] = n + 1
    if not _PROFILE_DIR or not 5 <= n < 5 + steps:
        return contextlib.nullcontext()
    return _ProfileOnce(kind, n == 5 + steps - 1)


class _ProfileOnce:
    _acc: dict = {}

    def __init__(self, kind: str, last: bool):
        self.kind, self.last = kind, last

    def __enter__(self):
        from torch.profiler import ProfilerActivity, profile

        self.prof = profile(activities=[ProfilerActivity.CPU])
        self.prof.__enter__()

    def __exit__(self, *exc):
        self.prof.__exit__(*exc)
        rows = _ProfileOnce._acc.setdefault(self.kind, {})
        for e in self.prof.key_averages():
            r = rows.setdefault(e.key, [0, 0.0])
            r[0] += e.count
            r[1] += e.self_cpu_time_total / 1e3
        if self.last:
            top = sorted(rows.items(), key=lambda kv: -kv[1][1])[:40]
            Path(_PROFILE_DIR).mkdir(parents=True, exist_ok=True)
            with open(Path(_PROFILE_DIR) / f"{self.kind}.txt", "w") as f:
                f.write(f"{'op':60s} {'calls':>8s} {'self ms':>10s}\n")
                for k, (c, ms) in top:
                    f.write(f"{k[:60]:60s} {c:8d} {ms:10.1f}\n")
        return False


@functools.cache
def _verify_input_cls():
    NgramVerifyInput = sglang_compat.name("NgramVerifyInput")

    class LongSpecVerifyInput(NgramVerifyInput):
        """NGRAM's verify input plus ragged per-request trees for the attention backend."""

        def __init__(self, tree_masks, positions, draft_token_num, **kw):
            # NGRAM's constructor reads the device off custom_mask; LONGSPEC's masks are ragged.
            super().__init__(custom_mask=torch.empty(0, dtype=torch.bool, device=positions.device),
                             positions=positions, draft_token_num=draft_token_num, **kw)
            self.tree_masks = tree_masks  # list of [1 + n_i, 1 + n_i] bool
            self.device = positions.device

        # Ragged widths: a fixed-shape CUDA graph cannot replay this step.
        cuda_graph_compatible = False

        def generate_attn_arg_prefill(self, *, req_pool_indices, paged_kernel_lens,
                                      paged_kernel_lens_sum, translator, plan, kind=None, **_):
            """FlashInfer's ragged custom-mask verify arguments (the GPU flashinfer backend calls
            this): request i verifies q_i = 1 + n_i tokens over its committed prefix plus those
            tokens, with the mask [ones(q_i, prefix_i) | tree_mask_i] packed row-major."""
            kv_indices, kv_indptr, qo_indptr, mask = ragged_verify_args(
                self.tree_masks, paged_kernel_lens, self.device)
            fill = dict(plan=plan, req_pool_indices=req_pool_indices,
                        seq_lens=paged_kernel_lens + (qo_indptr[1:] - qo_indptr[:-1]),
                        indptr=kv_indptr, out=kv_indices)
            if kind is not None:
                fill["kind"] = kind
            translator.pack_read_stream(**fill)
            self.qo_indptr = qo_indptr
            return kv_indices, kv_indptr, qo_indptr, mask

    return LongSpecVerifyInput


def ragged_verify_args(tree_masks, prefix_lens: torch.Tensor, device):
    """(kv_indices buffer, kv_indptr, qo_indptr, packed custom mask) of a ragged verify batch.

    tree_masks[i]: [q_i, q_i] bool (root + draft); prefix_lens [bs]: committed tokens per request.
    The kv_indices buffer is allocated (int32, sum(prefix_i + q_i)) and left for the caller to fill.
    """
    q_lens = torch.tensor([m.shape[0] for m in tree_masks], dtype=torch.int32, device=device)
    prefix_lens = prefix_lens.to(device=device, dtype=torch.int32)
    kv_lens = prefix_lens + q_lens
    bs = len(tree_masks)
    qo_indptr = torch.zeros(bs + 1, dtype=torch.int32, device=device)
    qo_indptr[1:] = torch.cumsum(q_lens, 0)
    kv_indptr = torch.zeros(bs + 1, dtype=torch.int32, device=device)
    kv_indptr[1:] = torch.cumsum(kv_lens, 0)
    rows = []
    for m, p in zip(tree_masks, prefix_lens.tolist()):
        m = m.to(device=device, dtype=torch.bool)
        rows.append(torch.cat([torch.ones(m.shape[0], p, dtype=torch.bool, device=device), m], 1)
                    .reshape(-1))
    mask = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.bool, device=device)
    kv_indices = torch.empty(int(kv_indptr[-1]), dtype=torch.int32, device=device)
    return kv_indices, kv_indptr, qo_indptr, mask


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
        self.context_len = int(self.model_runner.model_config.context_len)
        self.row_width = None  # the req_to_token row width, once the pools exist (alloc_memory_pool)
        self.tp = RankZeroDecisions(tp_group())
        # Only the deciding rank drafts; the others follow its broadcast decisions.
        drafter = self._load_drafter() if self.tp.decides else None
        self.controller = LongSpecController(
            self.config, self.window, owl_model=drafter, finished_ok=_finished_ok,
            faults=Faults(), vocab_size=int(self.model_runner.model_config.vocab_size))
        if self.tp.decides and self.config.corpus_paths():
            self._load_corpus(target_worker)
        # Optional JSON snapshot of the worker's state after every decode step (tests, debugging).
        self.stats_file = os.environ.get("LONGSPEC_STATS_FILE") or None
        self.prometheus = None
        if getattr(server_args, "enable_metrics", False) and self.tp.decides:
            from sgl_longspec.metrics import PrometheusCounters

            self.prometheus = PrometheusCounters()
        logger.info("LONGSPEC worker: window=%d tp_rank=%d/%d config=%s", self.window,
                    self.tp.rank, self.tp.world_size, self.config)

    def _load_drafter(self):
        """The OWL drafter: the configured checkpoint (errors stop the server start with the
        reason), else the one shipped for the model if it matches, else none (suffix-only)."""
        path = self.config.drafter_path
        if path.lower() == "none":
            return None
        from sgl_longspec.owl import load_drafter, shipped_checkpoint

        explicit = bool(path)
        if not explicit:
            path = str(shipped_checkpoint())
            if not (Path(path) / "config.json").is_file():
                logger.warning("LONGSPEC: no OWL drafter checkpoint shipped (%s); suffix drafts only", path)
                return None
        model = self.model_runner.model
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else model.model.embed_tokens
        head = getattr(model, "lm_head", emb)
        try:
            drafter = load_drafter(path, emb, head, device=self.device, dtype=emb.weight.dtype)
        except (ValueError, OSError) as e:
            if explicit:
                raise ValueError(f"--longspec-drafter-path: {e}") from e
            logger.warning("LONGSPEC: shipped OWL drafter does not fit this model (%s); suffix drafts only", e)
            return None
        logger.info("LONGSPEC: OWL drafter %s (%d parameters of its own)", path, drafter.num_parameters())
        return drafter

    # ---- the external corpus (sgl_longspec.corpus_endpoints routes SGLang's endpoints here) ----
    serves_external_corpus = True

    def _load_corpus(self, target_worker) -> None:
        """--longspec-corpus: index the files under the given paths, tokenized by the server's
        tokenizer, as corpus "startup" (a path that vanished since the launch stops the start)."""
        from sgl_longspec.corpus import load_paths

        tok = getattr(target_worker, "tokenizer", None)
        if tok is None:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(self.server_args.tokenizer_path or self.server_args.model_path)
        t0 = time.perf_counter()
        files, tokens = load_paths(self.controller.corpus, self.config.corpus_paths(),
                                   lambda text: tok.encode(text, add_special_tokens=False))
        logger.info("LONGSPEC corpus: %d files, %d tokens indexed in %.1f s (%d KiB of %d MiB)",
                    files, tokens, time.perf_counter() - t0,
                    self.controller.corpus.memory_bytes() >> 10, self.config.corpus_mb)

    def _checked_row_width(self, req_to_token_pool) -> int:
        """The req_to_token row width, checked at start-up against what each decode step reserves
        past a request's committed length (sglang_algo.req_to_token_headroom): a row narrower than
        that would crash the scheduler once a request nears the end of the context (issue 34),
        so such a server does not start."""
        from sgl_longspec.sglang_algo import req_to_token_headroom

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

    def add_external_corpus(self, req):
        out = sglang_compat.name("AddExternalCorpusReqOutput")
        if not self.tp.decides:  # only the deciding rank drafts; its reply is the one returned
            return out(success=True, corpus_id=req.corpus_id)
        corpus = self.controller.corpus
        try:
            n = corpus.add(req.corpus_id, req.token_chunks or [])
        except ValueError as e:
            return out(success=False, message=f"LONGSPEC corpus: {e}")
        kept = corpus.token_counts().get(req.corpus_id, 0)
        message = f"indexed {n} tokens"
        if kept < n:
            message += (f"; {n - kept} of them already evicted: the corpus holds "
                        f"--longspec-corpus-mb {self.config.corpus_mb} MiB of index")
        return out(success=True, corpus_id=req.corpus_id, message=message, loaded_token_count=n)

    def remove_external_corpus(self, req):
        out = sglang_compat.name("RemoveExternalCorpusReqOutput")
        if not self.tp.decides:
            return out(success=True)
        if self.controller.corpus.remove(req.corpus_id):
            return out(success=True, message=f"removed corpus {req.corpus_id}")
        return out(success=False, message=f"no corpus with id {req.corpus_id!r}")

    def list_external_corpora(self, req):
        counts = self.controller.corpus.token_counts() if self.tp.decides else {}
        return sglang_compat.name("ListExternalCorporaReqOutput")(success=True, corpus_token_counts=counts)

    def _capture_mode(self, full: bool):
        if not self.controller.wants_hidden_states:
            return None
        mode = sglang_compat.name("CaptureHiddenMode")
        return mode.FULL if full else mode.LAST

    def stats(self) -> dict:
        return {**self.controller.stats(), "tp_broadcasts": self.tp.broadcasts, **_attention_ms(),
                **_cascade_counts()}

    def _write_stats(self) -> None:
        tmp = self.stats_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.stats(), f)
        os.replace(tmp, self.stats_file)

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
        no_drafts = _opted_out(req) or getattr(req, "custom_logit_processor", None) is not None
        return RequestView(rid=req.rid, prompt=prompt, output=req.output_ids,
                           remaining=req.sampling_params.max_new_tokens - len(req.output_ids),
                           plain_only=no_drafts, handle=req, rules=_logit_rules(b, req, info))

    def _plan(self, batch) -> StepPlan:
        """This step's plan: the drafts are decided on rank 0 and shared; every rank derives the
        logit rules (and so whether the verify path runs) from its own copy of the batch, which
        is the same on every rank."""
        info = batch.sampling_info
        views = [dataclasses.replace(self._view(b, r, info), room=room)
                 for (b, r), room in zip(enumerate(batch.reqs), self._kv_room(batch))]
        if _batch_needs_engine_sampler(batch):
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
        attn0 = sum(_attention_ms().values())
        t0 = time.perf_counter()
        if not plan.needs_verify_path:
            out = self._forward_plain_decode(batch, on_publish, pp_proxy_tensors)
            ms = 1e3 * (time.perf_counter() - t0)
            self.controller.record_step("plain", len(batch.reqs), ms, ms,
                                        sum(_attention_ms().values()) - attn0)
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
            self.controller.record_step("plain", len(batch.reqs), ms, ms)
            return out
        ms = 1e3 * (time.perf_counter() - t0)
        tokens = len(batch.reqs) + sum(len(d) for d in drafts)
        self.controller.record_step("verify", tokens, ms, forward_ms,
                                    sum(_attention_ms().values()) - attn0)
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
        # seeded request's first token, _seeded_first_tokens' draw); next_token_logits is NOT
        # read here: after sampling it holds probabilities (sglang_compat.sampled_probs).
        accept_tokens[:, 0] = res.next_token_ids
        accept_lens = torch.ones(bs, dtype=torch.int32, device=self.device)
        return accept_tokens.flatten(), accept_lens

    def _forward_extend(self, batch, on_publish, pp_proxy_tensors):
        res = self.target_worker.forward_batch_generation(
            batch, pp_proxy_tensors=pp_proxy_tensors, capture_hidden_mode=self._capture_mode(False))
        if any(_seed(r) is not None for r in batch.reqs):
            self._seeded_first_tokens(batch, res)
        accept_tokens, accept_lens = self._one_token_result(batch, res)
        return self._result(batch, res.logits_output, res.can_run_cuda_graph, accept_tokens,
                            accept_lens, batch.seq_lens.clone(), res.next_token_ids, on_publish)

    def _seeded_first_tokens(self, batch, res) -> None:
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
        the right law, only not reproducible by the seed (warned once)."""
        info = batch.sampling_info
        if info.is_all_greedy or _batch_needs_engine_sampler(batch):
            return  # no sampling; or SGLang's sampler itself draws with the seed / a watermark
        out = res.logits_output
        if out.next_token_logits is None or out.next_token_logits.shape[0] != len(batch.reqs):
            return
        rows = [b for b, r in enumerate(batch.reqs) if _seed(r) is not None]
        idx = torch.tensor(rows, device=out.next_token_logits.device)
        probs = sglang_compat.sampled_probs(self.model_runner.sampler, info,
                                            out.next_token_logits.index_select(0, idx))
        if probs is None:
            if not getattr(self, "_warned_seeded_first", False):
                self._warned_seeded_first = True
                logger.warning("LONGSPEC: SGLang's sampler left no probabilities to redraw a "
                               "seeded request's first token from; its own (unseeded) draw is "
                               "kept")
            return
        # the position of the token drawn (after a retraction the output re-enters the prefill)
        positions = [len(batch.reqs[b].origin_input_ids) + len(batch.reqs[b].output_ids)
                     for b in rows]
        u = torch.cat([seeded_uniforms(_seed(batch.reqs[b]), [p]) for b, p in zip(rows, positions)])
        vr = verify_sampling([Draft.empty()] * len(rows), torch.log(probs), temperature=1.0,
                             top_k=info.top_ks.view(-1)[idx], top_p=info.top_ps.view(-1)[idx],
                             min_p=info.min_ps.view(-1)[idx], uniforms=u)
        tokens = torch.tensor([r.bonus_token for r in vr.requests()], device=probs.device)
        res.next_token_ids[idx] = tokens.to(res.next_token_ids.dtype)
        lp = out.next_token_logprobs
        if batch.return_logprob and lp is not None and lp.shape[0] == len(batch.reqs):
            lp[idx] = sglang_compat.sampled_token_logprobs(
                probs, tokens, info.temperatures.view(-1)[idx]).to(lp.dtype)

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
            with _maybe_torch_profile("plain"):
                res = self.target_worker.forward_batch_generation(
                    batch, pp_proxy_tensors=pp_proxy_tensors,
                    capture_hidden_mode=self._capture_mode(False))
        finally:
            batch.seq_lens, batch.seq_lens_cpu, batch.seq_lens_sum = seq_lens, seq_lens_cpu, seq_lens_sum
        accept_tokens, accept_lens = self._one_token_result(batch, res)
        if self.tp.decides:
            _record_request_steps(batch.reqs, None, None)
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
        ids, pos, masks = verify_layout(drafts, seq_lens_cpu, roots)
        verify_lens = [m.shape[0] for m in masks]

        batch.forward_mode = ForwardMode.TARGET_VERIFY
        batch.input_ids = torch.tensor(ids, dtype=torch.int64, device=self.device)
        batch.out_cache_loc = torch.cat([window[b, : verify_lens[b]] for b in range(bs)])
        positions = torch.tensor(pos, dtype=torch.int64, device=self.device)
        batch.spec_info = _verify_input_cls()(tree_masks=masks, positions=positions,
                                              draft_token_num=n)
        t0 = time.perf_counter()
        with _maybe_torch_profile("verify"):
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
            _custom_processors(logits, batch.sampling_info, verify_lens)
        rids = [r.rid for r in batch.reqs]
        vr = None
        if self.tp.decides:
            if plan.rules is not None:
                self.controller.counters.rule_steps += 1
            seeds = [r.seed if r is not None else None for r in plan.rules.rules] \
                if plan.rules is not None else None
            vr = self.controller.verify(rids, drafts, logits, _sampling_params(
                batch.sampling_info, seeds, verify_lens, pos))
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
            _record_request_steps(batch.reqs, drafts, [r.num_accepted for r in per_req])
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


def _finished_ok(req) -> bool:
    """A request that left the batch finished normally (not aborted, not retracted)."""
    reason = getattr(req, "finished_reason", None)
    return bool(req.finished()) and type(reason).__name__ != "FINISH_ABORT"


def _opted_out(req, key: str = "longspec") -> bool:
    """A request may turn a LONGSPEC feature off for itself: `"sampling_params":
    {"custom_params": {key: "off"}}`; "longspec": speculation (e.g. to compare with plain
    decoding on the same server), "longspec_stats": its meta_info figures."""
    params = getattr(req.sampling_params, "custom_params", None)
    return isinstance(params, dict) and str(params.get(key, "")).lower() == "off"


def _record_request_steps(reqs, drafts, accepted) -> None:
    """Each request's LONGSPEC figures so far, in its response's meta_info["longspec"] (through
    SGLang's customized_info, which a non-streaming response carries whole): verify and plain
    steps, and draft tokens verified and accepted per drafter. Opt out per request with
    `custom_params: {"longspec_stats": "off"}`."""
    for b, req in enumerate(reqs):
        if _opted_out(req, "longspec_stats"):
            continue
        info = req.customized_info if isinstance(req.customized_info, dict) else {}
        cur = info.get("longspec")
        s = cur[0] if cur else {"verify_steps": 0, "plain_steps": 0, "drafted": {}, "accepted": {}}
        if drafts is None:
            s["plain_steps"] += 1
        else:
            s["verify_steps"] += 1
            d = drafts[b]
            if len(d):
                s["drafted"][d.source] = s["drafted"].get(d.source, 0) + len(d)
                s["accepted"][d.source] = s["accepted"].get(d.source, 0) + int(accepted[b])
        info["longspec"] = [s]
        req.customized_info = info


def _batch_needs_engine_sampler(batch) -> bool:
    """Sampling features only SGLang's own sampler implements: the batch decodes plainly."""
    info = batch.sampling_info
    return bool(getattr(info, "has_watermark_candidates", False)
                or getattr(info, "sampling_seed", None) is not None)  # deterministic inference


def _logit_rules(b: int, req, info) -> Optional[LogitRules]:
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
        # sgl_longspec.logit_rules): under the overlap schedule (SGLang's default, recorded at
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
    rules = LogitRules(pen, bias, grammar, _seed(req))
    return None if rules.empty else rules


def _custom_processors(logits, info, verify_lens) -> None:
    """Custom logit processors on the root rows (the requests that have one verify no draft)."""
    roots = torch.tensor([0] + verify_lens[:-1], device=logits.device).cumsum(0)
    root_logits = logits.index_select(0, roots)
    sglang_compat.name("apply_custom_logit_processor")(root_logits, info)
    logits.index_copy_(0, roots, root_logits)


def _sampling_params(info, seeds=None, verify_lens=None, pos=None) -> SamplingParams:
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


def _seed(req) -> Optional[int]:
    """A sampling request's sampling_seed (greedy requests need none)."""
    sp = req.sampling_params
    if sp.sampling_seed is None or sp.temperature < 1e-6 or sp.top_k == 1:
        return None
    return int(sp.sampling_seed)


def _to_cpu(vr):
    return dataclasses.replace(vr, **{f.name: getattr(vr, f.name).cpu()
                                      for f in dataclasses.fields(vr)})
