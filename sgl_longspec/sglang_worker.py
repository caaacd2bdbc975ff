"""The LONGSPEC speculative worker: the only module that touches SGLang's speculative internals.

One decode step, per batch:
1. keep the per-request suffix index in step with each request's tokens (prompt indexed on first
   sight, accepted tokens appended after every verify; finished requests' outputs move to the
   global tree, aborted ones are dropped);
2. draft per request (suffix index; OWL model drafter when configured), let the router decide
   what is worth verifying within the batch budget;
3. if nothing is worth verifying, run SGLang's own plain decode step (bit-identical to vanilla,
   with every sampling feature); otherwise one ragged TARGET_VERIFY forward in which each request
   verifies only its own draft (1 + n_i tokens, never padded), through the hybrid tree attention;
4. verify (greedy or lossless sampling, sgl_longspec.verify), move the accepted slots' KV to the
   front of each request's window, and report the result in the fixed-stride layout the scheduler
   expects.

Registration works around two points of SGLang 0.5.23's plugin API (see LongSpecAlgo): the
custom-algorithm class lacks methods the scheduler calls, and LONGSPEC declares itself NGRAM-like
(is_ngram) so the scheduler uses the host-drafted, no-draft-KV plumbing that NGRAM uses.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Optional

from pathlib import Path

import numpy as np
import torch

from sgl_longspec.config import LongSpecConfig
from sgl_longspec.draft import Draft
from sgl_longspec.router import Router, RouterConfig
from sgl_longspec.suffix_index import SuffixIndex, SuffixIndexConfig
from sgl_longspec.verify import verify_greedy, verify_sampling

logger = logging.getLogger("sgl_longspec")

ALGORITHM_NAME = "LONGSPEC"
_registered = False


def register_longspec_algorithm() -> None:
    """Register LONGSPEC with SGLang (idempotent: SGLang calls plugins in every process)."""
    global _registered
    if _registered:
        return
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm
    from sglang.srt.speculative.spec_registry import _REGISTRY, CustomSpecAlgo

    if ALGORITHM_NAME in _REGISTRY:
        _registered = True
        return

    class LongSpecAlgo(CustomSpecAlgo):
        # Workaround for SGLang 0.5.23: CustomSpecAlgo lacks these three, which the scheduler
        # calls unconditionally (init_disaggregation / overlap set-up).
        def carries_draft_hidden_states(self) -> bool:
            return False

        def need_topk(self) -> bool:
            return False

        def create_future_map(self, device, req_to_token_pool, needs_cpu_seq_lens=True,
                              needs_confidence_relay=False):
            from sglang.srt.managers.overlap_utils import FutureMap

            return FutureMap(device, self, req_to_token_pool, needs_cpu_seq_lens,
                             needs_confidence_relay)

        # Host-side drafts and no draft KV, exactly NGRAM's scheduler contract.
        def is_ngram(self) -> bool:
            return True

        def has_draft_kv(self) -> bool:
            return False

        def handle_server_args(self, server_args) -> None:
            from sglang.srt.arg_groups.speculative_hook import _handle_ngram

            _handle_ngram(server_args)
            cfg = LongSpecConfig.from_env()
            cfg.validate(server_args.speculative_num_draft_tokens)

    @SpeculativeAlgorithm.register(ALGORITHM_NAME, supports_overlap=False, spec_class=LongSpecAlgo)
    def _factory(server_args):
        return LongSpecWorker

    _registered = True


def _attention_ms() -> dict:
    """Attention time inside the CPU backend, when it is the one in use."""
    try:
        from sgl_longspec.cpu.attention import ATTENTION_MS
    except Exception:  # no CPU layer (GPU build)
        return {}
    return {f"attention_{mode}_ms": ms for mode, ms in ATTENTION_MS.items()}


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


def _worker_base():
    from sglang.srt.speculative.base_spec_worker import BaseSpecWorker

    return BaseSpecWorker


def _verify_input_cls():
    from sglang.srt.speculative.ngram_info import NgramVerifyInput

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


class LongSpecWorker(_worker_base()):
    def __init__(self, server_args, gpu_id: int, nccl_port: int, target_worker):
        super().__init__()
        from sglang.srt.runtime_context import get_device, get_spec

        self.server_args = server_args
        self._target_worker = target_worker
        self._draft_worker = None
        self.model_runner = target_worker.model_runner
        self.device = get_device().device
        self.window = int(get_spec().speculative_num_draft_tokens)  # verify width incl. the root
        self.speculative_num_draft_tokens = self.window
        self.config = LongSpecConfig.from_env()
        self.config.validate(self.window)
        cfg = self.config
        vocab = getattr(self.model_runner.model_config, "vocab_size", None)
        self.index = SuffixIndex(SuffixIndexConfig(
            max_depth=cfg.max_depth, vocab_size=None, max_cached_responses=cfg.global_cache_requests,
            max_cache_bytes=cfg.global_cache_mb << 20, max_spec_tokens=cfg.max_spec_tokens,
            spec_factor=cfg.spec_factor, spec_offset=cfg.spec_offset,
            min_token_prob=cfg.min_token_prob, use_tree=cfg.use_tree,
            max_tree_nodes=cfg.max_spec_tokens))
        self.vocab_size = vocab
        self.router = Router(RouterConfig(
            min_score=cfg.min_score, howl_threshold=cfg.howl_threshold,
            batch_draft_budget=cfg.batch_draft_budget, max_draft_tokens=cfg.max_spec_tokens,
            backoff_steps=cfg.backoff_steps, cost_aware=cfg.cost_aware))
        self._indexed: dict[str, int] = {}  # rid -> number of tokens indexed
        self._prev_reqs: dict[str, object] = {}  # rid -> Req of the previous decode batch
        self._drafting_disabled: set[str] = set()  # requests whose drafter failed
        self.totals = {"drafted": 0, "accepted": 0, "verify_steps": 0, "plain_steps": 0,
                       "draft_ms": 0.0, "verify_ms": 0.0, "verify_forward_ms": 0.0,
                       "verify_tokens": 0, "plain_ms": 0.0}
        # Per forward size: [steps, total ms, forward ms, attention ms], keyed "plain:<tokens>" and
        # "verify:<tokens>" (the step profile of benchmarks/profile_verify_step.py).
        self.step_profile: dict[str, list[float]] = {}
        # Per draft source ("suffix", "owl"): [verified drafts, draft tokens, accepted tokens].
        self.by_source: dict[str, list[int]] = {}
        self.drafter = self._load_drafter()
        self._hidden: dict[str, torch.Tensor] = {}  # rid -> target hidden state that produced the root
        # Optional JSON snapshot of the worker's state after every decode step (tests, debugging).
        self.stats_file = os.environ.get("LONGSPEC_STATS_FILE") or None
        logger.info("LONGSPEC worker: window=%d config=%s", self.window, cfg)

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

    def _capture_mode(self, full: bool):
        from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode

        if self.drafter is None:
            return None
        return CaptureHiddenMode.FULL if full else CaptureHiddenMode.LAST

    def _store_hidden(self, batch, hidden, rows=None) -> None:
        """Remember, per request, the target hidden state whose logits produced its newest token."""
        if self.drafter is None or hidden is None:
            return
        if rows is not None:
            hidden = hidden[rows]
        for b, req in enumerate(batch.reqs):
            self._hidden[req.rid] = hidden[b]

    def stats(self) -> dict:
        return {
            "active_requests": sorted(self._indexed),
            "num_active_requests": self.index.num_active_requests,
            "num_cached_responses": self.index.num_cached_responses,
            "cached_response_ids": [str(r) for _, r in self.index.cached_responses()],
            "index_memory_bytes": self.index.memory_bytes(),
            "cost_model_ms": self.router.cost.params,  # (a, b, c) of the router's step model
            "step_profile": self.step_profile,
            "by_source": self.by_source,
            **self.totals,
            **_attention_ms(),
        }

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

    def init_attention_backends(self):
        pass

    def init_cuda_graphs(self):
        pass

    def init_hicache_draft_plan(self) -> None:
        pass

    def clear_cache_pool(self):
        for rid in list(self._indexed):
            self._drop(rid, keep_output=False)
        self._prev_reqs = {}

    def on_verify_complete_cpu(self, num_correct_drafts_per_req, batch_size: int = 0) -> None:
        pass

    # NGRAM's external-corpus endpoints reach every is_ngram() worker.
    def add_external_corpus(self, corpus_id, token_chunks) -> int:
        raise NotImplementedError("LONGSPEC does not load external corpora")

    def commit_corpus_load(self, corpus_id, loaded_token_count) -> None:
        raise NotImplementedError("LONGSPEC does not load external corpora")

    def remove_external_corpus(self, corpus_id) -> None:
        raise NotImplementedError("LONGSPEC does not load external corpora")

    def list_external_corpora(self) -> dict:
        return {}

    # ---- request lifecycle ------------------------------------------------------------------
    @staticmethod
    def _prompt(req):
        return getattr(req, "origin_input_ids_unpadded", None) or req.origin_input_ids

    def _sync_request(self, req) -> None:
        """Bring the request's suffix tree to prompt + output so far (appending only what is new)."""
        rid = req.rid
        if rid in self._drafting_disabled:
            return
        prompt_len = len(self._prompt(req))
        total = prompt_len + len(req.output_ids)
        have = self._indexed.get(rid)
        try:
            if have is not None and have > total:  # retracted and re-admitted: start over
                self.index.abort_request(rid)
                have = None
            if have is None:
                self.index.start_request(rid, list(self._prompt(req)) + list(req.output_ids))
            elif have < total:
                if have >= prompt_len:
                    new = req.output_ids[have - prompt_len:]
                else:
                    new = list(self._prompt(req))[have:] + list(req.output_ids)
                self.index.extend(rid, list(new))
            self._indexed[rid] = total
        except Exception:
            logger.exception("LONGSPEC: indexing request %s failed; plain decoding for it", rid)
            self._disable(rid)

    def _disable(self, rid) -> None:
        self._drafting_disabled.add(rid)
        if self._indexed.pop(rid, None) is not None:
            try:
                self.index.abort_request(rid)
            except Exception:
                pass

    def _drop(self, rid, keep_output: bool) -> None:
        """Free a request's suffix state; a normally finished output joins the global tree."""
        stats = self.router.forget(rid)
        self._hidden.pop(rid, None)
        self._drafting_disabled.discard(rid)
        if self._indexed.pop(rid, None) is None:
            return
        try:
            if keep_output:
                self.index.finish_request(rid, keep_in_global=True)
            else:
                self.index.abort_request(rid)
        except Exception:
            logger.exception("LONGSPEC: releasing request %s failed", rid)
        if stats is not None and stats.steps:
            logger.debug("LONGSPEC %s: drafted=%d accepted=%d verify_steps=%d plain_steps=%d",
                         rid, stats.drafted, stats.accepted, stats.steps, stats.plain_steps)

    def _release_departed(self, reqs) -> None:
        current = {r.rid: r for r in reqs}
        for rid, req in self._prev_reqs.items():
            if rid in current:
                continue
            finished = req.finished()
            reason = getattr(req, "finished_reason", None)
            aborted = (not finished) or type(reason).__name__ == "FINISH_ABORT"
            self._drop(rid, keep_output=not aborted)
        self._prev_reqs = current

    # ---- drafting ---------------------------------------------------------------------------
    def _needs_plain_path(self, batch) -> bool:
        """Batches with features that only SGLang's own sampler implements."""
        info = batch.sampling_info
        pen = getattr(info, "penalizer_orchestrator", None)
        return bool(
            batch.return_logprob
            or batch.has_grammar
            or getattr(info, "has_custom_logit_processor", False)
            or getattr(info, "logit_bias", None) is not None
            or (pen is not None and getattr(pen, "is_required", False))
        )

    def _draft(self, batch) -> list[Draft]:
        cfg = self.config
        suffix_drafts, budgets = [], []
        for req in batch.reqs:
            rid = req.rid
            d, budget = Draft.empty(), 0
            if rid not in self._drafting_disabled and self.router.wants_draft(rid):
                remaining = req.sampling_params.max_new_tokens - len(req.output_ids)
                budget = min(cfg.max_spec_tokens, self.window - 1, max(remaining - 1, 0))
                if (budget > 0 and cfg.suffix_drafts
                        and self.router.wants_source(rid, "suffix", len(batch.reqs), budget)):
                    try:
                        d = self.index.speculate(rid, max_spec_tokens=budget, max_tree_nodes=budget)
                    except Exception:
                        logger.exception("LONGSPEC: drafting for %s failed; plain decoding for it", rid)
                        self._disable(rid)
                        d, budget = Draft.empty(), 0
            suffix_drafts.append(d)
            budgets.append(budget)
        model_drafts = self._owl_drafts(batch, suffix_drafts, budgets)
        picked = [self.router.pick(s, m, r.rid)
                  for s, m, r in zip(suffix_drafts, model_drafts, batch.reqs)]
        return self.router.plan_batch([r.rid for r in batch.reqs], picked)

    def _owl_drafts(self, batch, suffix_drafts, budgets) -> list[Optional[Draft]]:
        """OWL trees for the requests whose suffix draft is below the HOWL threshold (one batched
        drafter call). A drafter failure disables the drafter and leaves suffix drafts only."""
        out: list[Optional[Draft]] = [None] * len(suffix_drafts)
        if self.drafter is None:
            return out
        bs = len(batch.reqs)
        rows = [b for b, (d, budget) in enumerate(zip(suffix_drafts, budgets))
                if budget > 0 and d.score < self.config.howl_threshold
                and batch.reqs[b].rid in self._hidden
                and self.router.wants_source(batch.reqs[b].rid, "owl", bs,
                                             min(budget, self.config.owl_max_nodes))]
        if not rows:
            return out
        t0 = time.perf_counter()
        try:
            hidden = torch.stack([self._hidden[batch.reqs[b].rid] for b in rows]).to(
                self.drafter.embedding_weight.dtype)
            roots = [batch.reqs[b].output_ids[-1] for b in rows]
            max_nodes = min(self.config.owl_max_nodes, max(budgets[b] for b in rows))
            trees = self.drafter.draft_tree(hidden, roots, top_k=self.config.owl_top_k,
                                            max_nodes=max_nodes)
        except Exception:
            logger.exception("LONGSPEC: OWL drafter failed; continuing with suffix drafts only")
            self.drafter = None
            return out
        self.router.observe_draft_cost("owl", 1e3 * (time.perf_counter() - t0))
        for b, tree in zip(rows, trees):
            out[b] = tree.truncated(budgets[b])
        return out

    # ---- the step -----------------------------------------------------------------------------
    def forward_batch_generation(self, batch, on_publish=None, pp_proxy_tensors=None):
        if not batch.forward_mode.is_decode():
            return self._forward_extend(batch, on_publish, pp_proxy_tensors)
        out = self._forward_decode(batch, on_publish, pp_proxy_tensors)
        if self.stats_file:
            self._write_stats()
        return out

    def _forward_decode(self, batch, on_publish, pp_proxy_tensors):
        self._release_departed(batch.reqs)
        t0 = time.perf_counter()
        if self._needs_plain_path(batch):
            drafts = [Draft.empty()] * len(batch.reqs)
        else:
            for req in batch.reqs:
                self._sync_request(req)
            drafts = self._draft(batch)
        self.totals["draft_ms"] += 1e3 * (time.perf_counter() - t0)
        attn0 = sum(_attention_ms().values())
        if not any(len(d) for d in drafts):
            self.totals["plain_steps"] += 1
            t0 = time.perf_counter()
            out = self._forward_plain_decode(batch, on_publish, pp_proxy_tensors)
            ms = 1e3 * (time.perf_counter() - t0)
            self.totals["plain_ms"] += ms
            self.router.observe_step(len(batch.reqs), ms, verify=False)
            self._profile_step(f"plain:{len(batch.reqs)}", ms, ms, attn0)
            return out
        fwd0 = self.totals["verify_forward_ms"]
        t0 = time.perf_counter()
        try:
            out = self._forward_verify(batch, drafts, on_publish, pp_proxy_tensors)
        except Exception:
            # Never let speculation take the server down: this step is redone as a plain decode
            # step (which rewrites the batch fields the verify path changed) and the requests
            # involved decode without drafts from now on.
            logger.exception("LONGSPEC: verify step failed; plain decoding for %d requests",
                             len(batch.reqs))
            for req in batch.reqs:
                self._disable(req.rid)
            self.totals["plain_steps"] += 1
            return self._forward_plain_decode(batch, on_publish, pp_proxy_tensors)
        ms = 1e3 * (time.perf_counter() - t0)
        self.totals["verify_ms"] += ms
        self.totals["verify_steps"] += 1
        tokens = len(batch.reqs) + sum(len(d) for d in drafts)
        self.router.observe_step(tokens, ms, verify=True)
        self._profile_step(f"verify:{tokens}", ms, self.totals["verify_forward_ms"] - fwd0, attn0)
        return out

    def _profile_step(self, key: str, ms: float, forward_ms: float, attention_before: float) -> None:
        row = self.step_profile.setdefault(key, [0, 0.0, 0.0, 0.0])
        row[0] += 1
        row[1] += ms
        row[2] += forward_ms
        row[3] += sum(_attention_ms().values()) - attention_before

    def _result(self, batch, logits_output, can_run_cuda_graph, accept_tokens, accept_lens,
                new_seq_lens, next_token_ids, on_publish):
        from sglang.srt.managers.utils import GenerationBatchResult

        from sglang.srt.speculative.ngram_info import NgramVerifyInput

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

    def _forward_extend(self, batch, on_publish, pp_proxy_tensors):
        res = self.target_worker.forward_batch_generation(
            batch, pp_proxy_tensors=pp_proxy_tensors, capture_hidden_mode=self._capture_mode(False))
        self._store_hidden(batch, res.logits_output.hidden_states)
        bs = len(batch.reqs)
        accept_tokens = torch.zeros(bs, self.window, dtype=torch.int32, device=self.device)
        accept_tokens[:, 0] = res.next_token_ids
        accept_lens = torch.ones(bs, dtype=torch.int32, device=self.device)
        return self._result(batch, res.logits_output, res.can_run_cuda_graph,
                            accept_tokens.flatten(), accept_lens, batch.seq_lens.clone(),
                            res.next_token_ids, on_publish)

    def _window_locs(self, batch) -> torch.Tensor:
        """KV slots the scheduler reserved per request for this step: [bs, window]."""
        from sglang.kernels.ops.speculative.cache_locs import assign_extend_cache_locs_func

        bs = len(batch.reqs)
        locs = assign_extend_cache_locs_func(
            req_pool_indices=batch.req_pool_indices,
            req_to_token=batch.req_to_token_pool.req_to_token,
            start_offset=batch.seq_lens,
            end_offset=batch.seq_lens + self.window,
            batch_size=bs,
            draft_token_num=self.window,
            device=self.device,
        )
        return locs.view(bs, self.window)

    def _roots(self, batch) -> torch.Tensor:
        return torch.tensor([r.output_ids[-1] for r in batch.reqs], dtype=torch.int64,
                            device=self.device)

    def _forward_plain_decode(self, batch, on_publish, pp_proxy_tensors):
        """SGLang's own one-token decode step inside the speculative protocol.

        The root token's KV goes to the first slot of each request's reserved window, which is
        exactly where a verify step would have left it, so nothing needs moving afterwards.
        """
        from sglang.srt.model_executor.forward_batch_info import ForwardMode

        bs = len(batch.reqs)
        window = self._window_locs(batch)
        seq_lens, seq_lens_cpu, seq_lens_sum = batch.seq_lens, batch.seq_lens_cpu, batch.seq_lens_sum
        batch.forward_mode = ForwardMode.DECODE
        batch.input_ids = self._roots(batch)
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
        self._store_hidden(batch, res.logits_output.hidden_states)
        accept_tokens = torch.zeros(bs, self.window, dtype=torch.int32, device=self.device)
        accept_tokens[:, 0] = res.next_token_ids
        accept_lens = torch.ones(bs, dtype=torch.int32, device=self.device)
        return self._result(batch, res.logits_output, res.can_run_cuda_graph,
                            accept_tokens.flatten(), accept_lens, seq_lens + 1,
                            accept_tokens.flatten(), on_publish)

    def _forward_verify(self, batch, drafts: list[Draft], on_publish, pp_proxy_tensors):
        from sglang.srt.model_executor.forward_batch_info import ForwardMode
        from sglang.srt.speculative.spec_utils import move_accept_tokens_to_target_kvcache

        bs = len(batch.reqs)
        n = self.window
        window = self._window_locs(batch)
        roots = [r.output_ids[-1] for r in batch.reqs]
        verify_lens = [1 + len(d) for d in drafts]
        seq_lens_cpu = batch.seq_lens_cpu.tolist() if batch.seq_lens_cpu is not None else batch.seq_lens.tolist()

        ids, pos, masks, locs = [], [], [], []
        for b, d in enumerate(drafts):
            ids.append(roots[b])
            ids.extend(d.token_ids.tolist())
            depth = d.depths() if len(d) else np.zeros(0, np.int32)
            pos.append(seq_lens_cpu[b])
            pos.extend((seq_lens_cpu[b] + depth).tolist())
            masks.append(torch.from_numpy(d.tree_mask(include_root=True)))
            locs.append(window[b, : verify_lens[b]])
        input_ids = torch.tensor(ids, dtype=torch.int64, device=self.device)
        positions = torch.tensor(pos, dtype=torch.int64, device=self.device)

        verify_cls = _verify_input_cls()
        batch.forward_mode = ForwardMode.TARGET_VERIFY
        batch.input_ids = input_ids
        batch.out_cache_loc = torch.cat(locs)
        batch.spec_info = verify_cls(tree_masks=masks, positions=positions, draft_token_num=n)
        t0 = time.perf_counter()
        with _maybe_torch_profile("verify"):
            res = self.target_worker.forward_batch_generation(
                batch, pp_proxy_tensors=pp_proxy_tensors, is_verify=True,
                capture_hidden_mode=self._capture_mode(True))
        logits = res.logits_output.next_token_logits
        self.totals["verify_forward_ms"] += 1e3 * (time.perf_counter() - t0)
        self.totals["verify_tokens"] += len(ids)

        info = batch.sampling_info
        if info.is_all_greedy:
            vr = verify_greedy(drafts, logits)
        else:
            vr = verify_sampling(
                drafts, logits,
                temperature=info.temperatures.view(-1), top_k=info.top_ks.view(-1),
                top_p=info.top_ps.view(-1), min_p=info.min_ps.view(-1))

        # Fixed-stride outputs for the scheduler, and the KV compaction inside each window.
        per_req = vr.requests()
        if self.drafter is not None and res.logits_output.hidden_states is not None:
            last_rows = vr.flat_kept_rows[torch.cumsum(vr.out_lens, 0) - 1]
            self._store_hidden(batch, res.logits_output.hidden_states, last_rows)
        accept_tokens = torch.zeros(bs, n, dtype=torch.int32)
        accept_index = torch.full((bs, n), -1, dtype=torch.int32)
        accept_lens_list = []
        for b, r in enumerate(per_req):
            toks = r.output_tokens
            accept_tokens[b, : len(toks)] = torch.tensor(toks, dtype=torch.int32)
            accept_index[b, : len(r.accepted_slots)] = torch.tensor(
                [b * n + s for s in r.accepted_slots], dtype=torch.int32)
            accept_lens_list.append(len(toks))
            self.router.observe(batch.reqs[b].rid, len(drafts[b]), r.num_accepted,
                                expected=float(drafts[b].probs.sum()) if len(drafts[b]) else None,
                                source=drafts[b].source)
            self.totals["drafted"] += len(drafts[b])
            self.totals["accepted"] += r.num_accepted
            if len(drafts[b]):
                row = self.by_source.setdefault(drafts[b].source, [0, 0, 0])
                row[0] += 1
                row[1] += len(drafts[b])
                row[2] += r.num_accepted
        accept_lens = torch.tensor(accept_lens_list, dtype=torch.int32, device=self.device)
        accept_tokens = accept_tokens.to(self.device)
        accept_index = accept_index.to(self.device)

        batch.out_cache_loc = window.reshape(-1)
        move_accept_tokens_to_target_kvcache(
            batch, accept_index, accept_lens - 1, self.token_to_kv_pool_allocator)
        new_seq_lens = batch.seq_lens + accept_lens
        batch.forward_mode = ForwardMode.DECODE
        flat = accept_tokens.flatten()
        return self._result(batch, res.logits_output, res.can_run_cuda_graph, flat, accept_lens,
                            new_seq_lens, flat, on_publish)
