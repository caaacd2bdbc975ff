"""LONGSPEC's options (engine-independent): one record, its checks, its `--longspec-*` flags on any
argparse parser, and its transport to other processes (the environment variable LONGSPEC_CONFIG,
JSON). How the flags join SGLang's command line: sgl_longspec.adapter.cli_flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, fields

ENV_VAR = "LONGSPEC_CONFIG"
DRAFT_SHAPES = ("chain", "tree", "auto")


@dataclass
class LongSpecConfig:
    # Suffix index (SuffixDecoding)
    max_spec_tokens: int = 15  # most draft tokens verified per request per step (<= num_draft_tokens - 1)
    spec_factor: float = 1.0  # draft budget = min(max_spec_tokens, floor(match_len * factor + offset))
    spec_offset: float = 0.0
    min_token_prob: float = 0.1  # stop a draft path once its estimated probability falls below
    max_depth: int = 64  # suffix tree depth cap (match + draft)
    # Draft shape of the suffix index and the corpus: "chain", "tree" (siblings where the index
    # saw other continuations), or "auto": both are drafted and the router keeps, per request
    # and step, the one with the higher calibrated net value (sgl_longspec.step.router)
    draft_shape: str = "chain"
    global_cache_requests: int = 4096  # past outputs kept in the global tree (FIFO)
    global_cache_mb: int = 512  # and the memory they may take
    # outputs join the global tree while they are generated (other requests draft from them at
    # once); false: when their request finishes
    live_outputs: bool = True
    corpus: str = ""  # external corpus indexed at start: files or folders, comma-separated
    corpus_mb: int = 256  # index memory of the external corpus (oldest text evicted first)
    # Router
    min_score: float = 0.0  # (calibrated) expected accepted tokens below which a draft is not verified
    batch_draft_budget: int = 64  # draft tokens per verify step over the whole batch
    backoff_steps: int = 8  # after a fully rejected draft, pause a costly drafter (OWL) for the request up to N steps
    cost_aware: bool = True  # prune drafts by the measured cost of a verify token (false: verify all)
    queue_weight: float = 0.5  # a waiting request's share of the batch draft budget (0: queue ignored)
    kv_reserve: float = 0.05  # fraction of the KV pool kept free for admissions while requests wait
    # score refused drafts against the output that followed and calibrate the drafters with them
    # (sgl_longspec.step.refused_drafts); false: only verified drafts calibrate
    learn_from_refused: bool = True
    # OWL drafter (HOWL hybrid)
    drafter_path: str = ""  # OWL checkpoint folder; "" = the shipped one for the model if any, "none" = off
    howl_threshold: float = 2.0  # suffix chain when its score >= threshold, else OWL tree
    suffix_drafts: bool = True  # false: OWL trees only (the suffix index still tracks requests)
    owl_max_nodes: int = 8
    owl_top_k: int = 2

    def validate(self, num_draft_tokens: int | None = None) -> None:
        def check(name, ok, what):
            if not ok:
                raise ValueError(f"--longspec-{name.replace('_', '-')}: {what}, got {getattr(self, name)!r}")

        check("max_spec_tokens", 1 <= self.max_spec_tokens <= 256, "must be in [1, 256]")
        if num_draft_tokens is not None:
            check("max_spec_tokens", self.max_spec_tokens <= num_draft_tokens - 1,
                  f"must be <= --speculative-num-draft-tokens - 1 = {num_draft_tokens - 1}")
        check("spec_factor", 0.0 <= self.spec_factor <= 1e3, "must be in [0, 1000]")
        check("spec_offset", -1e3 <= self.spec_offset <= 1e3, "must be in [-1000, 1000]")
        check("min_token_prob", 0.0 <= self.min_token_prob <= 1.0, "must be in [0, 1]")
        check("max_depth", 1 <= self.max_depth <= 4096, "must be in [1, 4096]")
        check("global_cache_requests", self.global_cache_requests >= 0, "must be >= 0")
        check("global_cache_mb", self.global_cache_mb >= 0, "must be >= 0")
        check("corpus_mb", self.corpus_mb >= 0, "must be >= 0")
        for path in self.corpus_paths():
            check("corpus", os.path.exists(path), f"no such file or folder: {path}")
        check("min_score", 0.0 <= self.min_score <= 1e3, "must be in [0, 1000]")
        check("batch_draft_budget", self.batch_draft_budget >= 0, "must be >= 0")
        check("backoff_steps", 0 <= self.backoff_steps <= 10_000, "must be in [0, 10000]")
        check("queue_weight", 0.0 <= self.queue_weight <= 1e3, "must be in [0, 1000]")
        check("kv_reserve", 0.0 <= self.kv_reserve <= 1.0, "must be in [0, 1]")
        check("howl_threshold", 0.0 <= self.howl_threshold <= 1e3, "must be in [0, 1000]")
        check("owl_max_nodes", 1 <= self.owl_max_nodes <= 256, "must be in [1, 256]")
        check("owl_top_k", 1 <= self.owl_top_k <= 64, "must be in [1, 64]")
        check("draft_shape", self.draft_shape in DRAFT_SHAPES, f"must be one of {', '.join(DRAFT_SHAPES)}")
        if self.drafter_path and self.drafter_path.lower() != "none":
            # The checkpoint's files, before any model is loaded: a missing, unreadable or truncated
            # one stops the launch at once with the file named. Whether it fits the target is
            # checked when the scheduler loads it (that needs the target's weights).
            from sgl_longspec.drafters.owl.checkpoint import check_checkpoint_files

            try:
                check_checkpoint_files(self.drafter_path)
            except ValueError as e:
                raise ValueError(f"--longspec-drafter-path: {e}") from None

    def corpus_paths(self) -> list[str]:
        return [p.strip() for p in self.corpus.split(",") if p.strip()]

    # ---- transport -------------------------------------------------------------------------
    def to_env(self) -> None:
        os.environ[ENV_VAR] = json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_env(cls) -> "LongSpecConfig":
        raw = os.environ.get(ENV_VAR)
        if not raw:
            return cls()
        data = json.loads(raw)
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{ENV_VAR} has unknown keys: {sorted(unknown)}")
        return cls(**data)

    # ---- command line ----------------------------------------------------------------------
    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        """The --longspec-* flags; a flag that is not given leaves no attribute on the namespace
        (argparse.SUPPRESS), so that only the given ones override the base configuration."""
        if any(a.dest == "longspec_max_spec_tokens" for a in parser._actions):
            return  # already added (a parser built twice in one process)
        group = parser.add_argument_group("LONGSPEC speculative decoding (--speculative-algorithm LONGSPEC)")
        for f in fields(cls):
            flag = "--longspec-" + f.name.replace("_", "-")
            help_text = f"(default: {f.default!r})"
            if f.type in ("bool", bool):
                group.add_argument(flag, type=_parse_bool, default=argparse.SUPPRESS,
                                   metavar="{true,false}", help=help_text)
            else:
                typ = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
                group.add_argument(flag, type=typ, default=argparse.SUPPRESS, help=help_text)

    @classmethod
    def from_cli(cls, ns: argparse.Namespace, base: "LongSpecConfig | None" = None) -> "LongSpecConfig":
        given = {f.name: getattr(ns, "longspec_" + f.name) for f in fields(cls)
                 if hasattr(ns, "longspec_" + f.name)}
        return dataclasses.replace(base or cls(), **given)


def _parse_bool(v: str) -> bool:
    s = v.strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {v!r}")
