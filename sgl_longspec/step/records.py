"""The records a decode step passes around: what the controller sees of a request
(RequestView), what it decides (StepPlan), the batch's sampling parameters, and its counters."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Hashable, Optional, Sequence

import torch

from sgl_longspec.drafters.draft import Draft
from sgl_longspec.verify.logit_rules import LogitRules, StepRules


@dataclass
class RequestView:
    """What the controller needs to know about one request of a decode batch."""

    rid: Hashable
    prompt: Sequence[int]
    output: Sequence[int]  # committed output tokens; output[-1] is the root of its draft
    remaining: int  # tokens it may still generate
    plain_only: bool = False  # decodes without drafts (opted out, or a custom logit processor)
    handle: object = None  # the engine's request object, handed back to `finished_ok`
    rules: Optional[LogitRules] = None  # penalties, grammar, logit bias (sgl_longspec.verify.logit_rules)
    # Draft tokens its KV window can take this step (None: no limit known): the engine's slots
    # reserved past the committed length, its req_to_token row and the context length bound the
    # root's slot plus one per draft token. Near the end of the context it shrinks, down to 0.
    room: Optional[int] = None


@dataclass
class StepPlan:
    """The router's decision for one decode step: a draft per request (empty = no draft)."""

    drafts: list[Draft]
    # the batch's logit rules, to apply to the verify logits before acceptance (None: no rules)
    rules: Optional[StepRules] = None

    @property
    def verify(self) -> bool:
        return any(len(d) for d in self.drafts)

    @property
    def needs_verify_path(self) -> bool:
        """Verify (drafts, or rules that only the verify path applies exactly: penalties)."""
        return self.verify or (self.rules is not None and self.rules.stateful)


@dataclass
class SamplingParams:
    """Per-request sampling parameters of a verify batch ([bs] tensors)."""

    all_greedy: bool
    temperature: Optional[torch.Tensor] = None
    top_k: Optional[torch.Tensor] = None
    top_p: Optional[torch.Tensor] = None
    min_p: Optional[torch.Tensor] = None
    uniforms: Optional[torch.Tensor] = None  # per verify slot, NaN = random (verify_sampling)


@dataclass
class SourceCounts:
    """One drafter's verified drafts, their tokens, and the tokens accepted."""

    drafts: int = 0
    draft_tokens: int = 0
    accepted: int = 0

    def add(self, draft_tokens: int, accepted: int) -> None:
        self.drafts += 1
        self.draft_tokens += draft_tokens
        self.accepted += accepted

    def row(self) -> list[int]:
        return [self.drafts, self.draft_tokens, self.accepted]


@dataclass
class ShapeCounts:
    """Verified drafts of one shape ("chain" or "tree"): how many, their tokens, the tokens
    accepted, and their summed width (most nodes at one depth) and depth."""

    drafts: int = 0
    draft_tokens: int = 0
    accepted: int = 0
    width_sum: int = 0
    depth_sum: int = 0

    def add(self, draft_tokens: int, accepted: int, width: int, depth: int) -> None:
        self.drafts += 1
        self.draft_tokens += draft_tokens
        self.accepted += accepted
        self.width_sum += width
        self.depth_sum += depth

    def summary(self) -> dict:
        n = max(self.drafts, 1)
        return {"drafts": self.drafts, "draft_tokens": self.draft_tokens, "accepted": self.accepted,
                "mean_width": self.width_sum / n, "mean_depth": self.depth_sum / n}


@dataclass
class Counters:
    drafted: int = 0
    accepted: int = 0
    verify_steps: int = 0
    plain_steps: int = 0
    # verify steps in which two or more requests verified a draft (the ragged batch path)
    batched_verify_steps: int = 0
    max_verify_batch: int = 0
    draft_ms: float = 0.0
    verify_ms: float = 0.0
    verify_forward_ms: float = 0.0
    verify_tokens: int = 0
    plain_ms: float = 0.0
    # draft tokens dropped before verification because the request's grammar forbids them
    grammar_pruned: int = 0
    # verify steps of batches with logit rules (penalties, grammars, logit bias; counted by the
    # engine adapter, which applies them)
    rule_steps: int = 0
    # decode steps on which the load left no draft budget (requests waiting, KV pool nearly
    # full: see Router.draft_budget), so nothing was drafted or verified
    saturated_steps: int = 0
    # decode steps planned while requests waited for admission (the budget then shrinks)
    queued_steps: int = 0
    # request-steps whose draft budget its KV window cut (RequestView.room: the reservation, the
    # req_to_token row or the context length ends within a full draft of its committed tokens)
    room_capped: int = 0
    # the last step's load as the engine adapter read it (waiting requests, free KV tokens)
    last_load: dict = field(default_factory=dict)
    # per draft source ("suffix", "corpus", "owl"): what it drafted and got accepted
    by_source: dict[str, "SourceCounts"] = field(default_factory=dict)
    # per draft source: its refused drafts scored against the output that followed (main paths:
    # [drafts, tokens, expected accepted tokens, tokens verification would have accepted])
    refused_scored: dict[str, list] = field(default_factory=dict)
    # per draft shape ("chain", "tree"), whichever drafter: what was verified and accepted
    by_shape: dict[str, ShapeCounts] = field(default_factory=dict)
    # per cause ("index", "suffix_drafter", "owl_drafter", "verify", "release"): failures, and
    # the requests they turned to plain decoding
    fallbacks: Counter = field(default_factory=Counter)
    fallback_requests: Counter = field(default_factory=Counter)
    # per forward size: [steps, total ms, forward ms, attention ms], keyed "plain:<tokens>" and
    # "verify:<tokens>" (the step profile of benchmarks/profile_verify_step.py)
    step_profile: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        out = dict(self.__dict__)
        # rows [drafts, draft tokens, accepted] in the stats file, as its readers expect
        out["by_source"] = {src: sc.row() for src, sc in self.by_source.items()}
        out["by_shape"] = {shape: sc.summary() for shape, sc in self.by_shape.items()}
        out["fallbacks"] = dict(self.fallbacks)
        out["fallback_requests"] = dict(self.fallback_requests)
        return out
