"""The router's model of what one forward step costs, fitted online from the worker's own step
timings (see StepCostModel). Engine-independent."""

from __future__ import annotations

from typing import Optional

import numpy as np


class StepCostModel:
    """Online linear model of one forward step:
    ms = a + r * requests + b * tokens + c * [verify step].

    requests = the batch's requests; tokens = tokens in the forward (the batch size for a plain
    step, the sum of 1 + draft size for a verify step); c is what the verify path adds beyond its
    tokens (tree masks, rejection sampling, KV compaction). A request and a token cost apart
    because a draft token is not another request: it adds its query to its request's
    attention, whose KV is read once for all its queries, while another request adds its own KV
    to read and its own attention call (on the CPU a Python-level loop per request and layer). A
    model with tokens alone prices a draft token at the slope of plain steps over batch sizes,
    which is a request's cost, and so refuses draft tokens that would pay.

    Fitted by ridge-regularised least squares with exponential forgetting, so it follows changes
    of batch size, context length and machine load. The ridge prior (b = a * prior_token_cost,
    r = c = 0), set from the first observed step, keeps the fit well-posed while only plain steps
    are seen (requests and tokens then move together: the slope goes to r), and as old
    verify observations decay it pulls b back to the prior, which re-opens speculation that an
    unlucky estimate had closed.
    """

    def __init__(self, prior_token_cost: float = 0.05, decay: float = 0.97, prior_weight: float = 0.5):
        self.prior_token_cost = prior_token_cost
        self.decay = decay
        self.prior_weight = prior_weight
        self._xtx = np.zeros((4, 4))
        self._xty = np.zeros(4)
        self._prior: Optional[np.ndarray] = None
        self._theta: Optional[np.ndarray] = None
        # The request coefficient's prior is weak (r = 0 on the scale of one request): while only
        # plain steps are seen it takes their slope and b stays at its prior, so a draft token is
        # not priced like a request before a verify step has measured it.
        self._ridge = np.diag([1.0, 1.0, self.TYPICAL_TOKENS ** 2, 1.0]) * prior_weight
        self.observations = 0

    TYPICAL_TOKENS = 16.0  # scale of the token feature, for the ridge prior
    # Physical bounds: a step costs something; requests, tokens and the verify path cost nothing
    # negative.
    LOWER_BOUNDS = np.array([1e-3, 0.0, 0.0, 0.0])

    def observe(self, requests: int, tokens: int, ms: float, verify: bool) -> None:
        if tokens <= 0 or requests <= 0 or not (ms > 0.0) or not np.isfinite(ms):
            return
        x = np.array([1.0, float(requests), float(tokens), 1.0 if verify else 0.0])
        if self._prior is None:
            a0 = ms / (1.0 + self.prior_token_cost * tokens)
            self._prior = np.array([a0, 0.0, a0 * self.prior_token_cost, 0.0])
        self._xtx = self.decay * self._xtx + np.outer(x, x)
        self._xty = self.decay * self._xty + x * ms
        self.observations += 1
        # The prior weighs as much as `prior_weight` steps (each feature on its own scale).
        lhs = self._xtx + self._ridge
        rhs = self._xty + self._ridge @ self._prior
        self._theta = _least_squares_above(lhs, rhs, self.LOWER_BOUNDS)

    @property
    def params(self) -> Optional[tuple[float, float, float, float]]:
        """(a, r, b, c) in ms, or None before the first observation."""
        return None if self._theta is None else tuple(float(v) for v in self._theta)

    @property
    def draft_token_ms(self) -> float:
        """b: what one more draft token adds to a step (0 before the first observation)."""
        return 0.0 if self._theta is None else float(self._theta[2])

    @property
    def verify_overhead_ms(self) -> float:
        """c: what a verify step costs beyond its tokens (0 before the first observation)."""
        return 0.0 if self._theta is None else float(self._theta[3])

    def plain_step_ms(self, batch_size: int) -> float:
        a, r, b, _ = self._theta
        return a + (r + b) * batch_size

    def token_threshold(self, batch_size: int) -> float:
        """Expected accepted tokens a draft token must bring to pay for itself: its marginal cost b
        over the time one output token takes in plain decoding, (a + (r + b) * bs) / bs."""
        if self._theta is None:
            return 0.0
        return self.draft_token_ms * batch_size / self.plain_step_ms(batch_size)

    def plain_ms_per_token(self, batch_size: int) -> Optional[float]:
        """Time one output token takes in a plain decode step of this batch size."""
        if self._theta is None:
            return None
        return self.plain_step_ms(batch_size) / batch_size

    def speedup(self, batch_size: int, expected_tokens: float, draft_tokens: int) -> float:
        """Predicted tokens/s of a verify step with these drafts over a plain step's."""
        if self._theta is None:
            return float("inf") if expected_tokens > 0 else 1.0
        plain_ms = self.plain_step_ms(batch_size)
        spec_ms = plain_ms + self.draft_token_ms * draft_tokens + self.verify_overhead_ms
        return ((batch_size + expected_tokens) / spec_ms) / (batch_size / plain_ms)


def _least_squares_above(lhs: np.ndarray, rhs: np.ndarray, lower: np.ndarray) -> np.ndarray:
    """argmin of theta' lhs theta - 2 theta' rhs subject to theta >= lower (lhs positive definite).

    Clamping the unconstrained solution is not this minimum: when timings say the verify path
    costs "less than nothing" (c < 0), clamping c to 0 keeps the a and b that were fitted to go
    with a negative c, and the model then overestimates every step. The problem is tiny, so every
    choice of coefficients held at their bound is solved and the best feasible one kept."""
    k = len(rhs)
    best, best_obj = None, np.inf
    for held in range(1 << k):
        free = [i for i in range(k) if not held >> i & 1]
        theta = lower.astype(float).copy()
        if free:
            fixed = [i for i in range(k) if held >> i & 1]
            sub_rhs = rhs[free] - lhs[np.ix_(free, fixed)] @ theta[fixed]
            theta[free] = np.linalg.solve(lhs[np.ix_(free, free)], sub_rhs)
        if np.any(theta < lower - 1e-12):
            continue
        obj = float(theta @ lhs @ theta - 2.0 * theta @ rhs)
        if obj < best_obj:
            best, best_obj = theta, obj
    return np.maximum(best, lower)
