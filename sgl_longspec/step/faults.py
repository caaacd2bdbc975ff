"""Named fault points for testing the fallback paths (a debug option, off unless set).

LONGSPEC_INJECT_FAULTS="point:probability[,point:probability...]" makes the named point raise
InjectedFault with that probability each time it is reached (seeded by LONGSPEC_FAULT_SEED,
default 0, so a run is repeatable). Each point draws from its own stream, so whether a point
fires on its k-th visit does not depend on how often the other points were visited (which
varies with batching and the router's timing-based choices): a test can rely on a point firing
within the visits it is sure to make. Points:

- index: bringing a request's suffix tree up to date;
- suffix_drafter / owl_drafter: drafting;
- owl_nan: the OWL drafter returns a tree with NaN path probabilities (an invalid draft, which the
  controller must reject as a drafter failure);
- grammar: pruning a draft to its request's grammar (the request keeps its grammar mask and
  decodes without drafts);
- verify: the verify step (after the target forward, before any token is committed).

Each fault must turn only the requests it touched to plain decoding, be counted in the worker's
`fallbacks` by its point's cause, and leave the output lossless (tests/test_longspec.py).
"""

from __future__ import annotations

import os
import random

POINTS = ("index", "suffix_drafter", "owl_drafter", "owl_nan", "grammar", "verify")


class InjectedFault(RuntimeError):
    pass


def parse(spec: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        point, _, prob = item.partition(":")
        if point not in POINTS:
            raise ValueError(f"LONGSPEC_INJECT_FAULTS: unknown fault point {point!r}; "
                             f"points: {', '.join(POINTS)}")
        p = float(prob) if prob else 1.0
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"LONGSPEC_INJECT_FAULTS: probability of {point} must be in [0, 1]")
        out[point] = p
    return out


class Faults:
    def __init__(self, spec: str | None = None, seed: int | None = None):
        spec = os.environ.get("LONGSPEC_INJECT_FAULTS", "") if spec is None else spec
        self.prob = parse(spec)
        seed = int(os.environ.get("LONGSPEC_FAULT_SEED", "0")) if seed is None else seed
        # A str seed is hashed deterministically by random.Random (not by the salted hash()).
        self.streams = {p: random.Random(f"{seed}:{p}") for p in self.prob}
        self.injected = {p: 0 for p in self.prob}

    def fires(self, point: str) -> bool:
        """Whether the point's fault happens this time (counted)."""
        p = self.prob.get(point)
        if p and self.streams[point].random() < p:
            self.injected[point] += 1
            return True
        return False

    def check(self, point: str) -> None:
        if self.fires(point):
            raise InjectedFault(f"injected fault at {point} (LONGSPEC_INJECT_FAULTS)")
