"""The decode step's parts that the --longspec-* flags describe: the suffix index, the external
corpus and the router, each built from one LongSpecConfig (the controller takes them built, so
tests and tools can hand it their own)."""

from __future__ import annotations

from sgl_longspec.config import LongSpecConfig
from sgl_longspec.drafters.corpus import SuffixCorpus
from sgl_longspec.drafters.suffix_index import SuffixIndex, SuffixIndexConfig
from sgl_longspec.step.router import Router, RouterConfig


def build_suffix_index(cfg: LongSpecConfig) -> SuffixIndex:
    """The per-request and global suffix trees the --longspec-* flags describe."""
    return SuffixIndex(SuffixIndexConfig(
        max_depth=cfg.max_depth, vocab_size=None, max_cached_responses=cfg.global_cache_requests,
        max_cache_bytes=cfg.global_cache_mb << 20, live_outputs=cfg.live_outputs,
        max_spec_tokens=cfg.max_spec_tokens,
        spec_factor=cfg.spec_factor, spec_offset=cfg.spec_offset,
        min_token_prob=cfg.min_token_prob, use_tree=cfg.draft_shape == "tree",
        max_tree_nodes=cfg.max_spec_tokens))


def build_corpus(cfg: LongSpecConfig) -> SuffixCorpus:
    """The (empty) external corpus the --longspec-corpus-* flags bound."""
    return SuffixCorpus(
        cfg.corpus_mb << 20, max_depth=cfg.max_depth, max_spec_tokens=cfg.max_spec_tokens,
        min_token_prob=cfg.min_token_prob, spec_factor=cfg.spec_factor, spec_offset=cfg.spec_offset)


def build_router(cfg: LongSpecConfig) -> Router:
    """The router with the --longspec-* router settings."""
    return Router(RouterConfig(
        min_score=cfg.min_score, howl_threshold=cfg.howl_threshold,
        batch_draft_budget=cfg.batch_draft_budget, max_draft_tokens=cfg.max_spec_tokens,
        backoff_steps=cfg.backoff_steps, cost_aware=cfg.cost_aware,
        queue_weight=cfg.queue_weight, kv_reserve=cfg.kv_reserve))
