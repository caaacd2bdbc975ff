"""The router's step cost model: its fit under the physical bounds (a > 0, r, b, c >= 0) is the
bounded least-squares minimum, not the unconstrained one clamped; a request and a draft token are
priced apart."""

from __future__ import annotations

import random

import numpy as np
from hypothesis import given, settings, strategies as st

from sgl_longspec.step.cost_model import StepCostModel


def _objective(lhs, rhs, theta):
    return float(theta @ lhs @ theta - 2.0 * theta @ rhs)


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2 ** 31), a=st.floats(1.0, 200.0), r=st.floats(-2.0, 10.0),
       b=st.floats(-1.0, 10.0), c=st.floats(-80.0, 80.0), noise=st.floats(0.0, 20.0))
def test_bounded_fit_is_the_constrained_minimum(seed, a, r, b, c, noise):
    """Against brute force: no feasible point of a fine grid around the fit, nor the clamped
    unconstrained solution, has a lower objective, and the KKT conditions hold (zero gradient in
    the free coefficients, a non-negative one in those held at their bound)."""
    rng = random.Random(seed)
    m = StepCostModel()
    for _ in range(rng.randint(1, 60)):
        verify = rng.random() < 0.6
        bs = rng.randint(1, 16)
        tokens = bs + (rng.randint(1, 64) if verify else 0)
        ms = a + r * bs + b * tokens + (c if verify else 0.0) + rng.uniform(-noise, noise)
        m.observe(bs, tokens, max(ms, 0.5), verify)
    lhs, rhs = m._xtx + m._ridge, m._xty + m._ridge @ m._prior
    theta = np.array(m.params)
    lower = StepCostModel.LOWER_BOUNDS
    assert np.all(theta >= lower)
    grad = 2.0 * (lhs @ theta - rhs)
    scale = 1e-6 * (1.0 + np.abs(lhs).max() * (1.0 + np.abs(theta).max()))
    for i in range(4):
        if theta[i] > lower[i] + 1e-9:
            assert abs(grad[i]) <= scale * 10, (i, grad, theta)
        else:
            assert grad[i] >= -scale * 10, (i, grad, theta)
    best = _objective(lhs, rhs, theta)
    clamped = np.maximum(np.linalg.solve(lhs, rhs), lower)
    assert best <= _objective(lhs, rhs, clamped) + 1e-6 * abs(best)
    steps = np.array([-1.0, -0.1, 0.0, 0.1, 1.0])
    for da in steps:
        for dr in steps * 0.1:
            for db in steps * 0.1:
                for dc in steps:
                    p = np.maximum(theta + [da, dr, db, dc], lower)
                    assert best <= _objective(lhs, rhs, p) + 1e-6 * abs(best)


def test_verify_steps_cheaper_than_the_line_do_not_inflate_the_plain_step():
    """Verify steps a bit cheaper than plain steps of as many tokens (c < 0, e.g. a shorter KV per
    query): clamping would keep the a fitted with a negative c and overestimate every step; the
    bounded fit holds c at 0 and refits a and b to the steps."""
    m = StepCostModel()
    rng = random.Random(1)
    for _ in range(200):
        bs = rng.randint(8, 16)
        m.observe(bs, bs, 100 + 4 * bs, verify=False)
        n = bs + rng.randint(8, 64)
        m.observe(bs, n, 100 + 4 * n - 40, verify=True)
    a, r, b, c = m.params
    assert c == 0.0
    # the unconstrained fit is a = 100, r = 0, b = 4, c = -40: clamped, a plain step of 16 would
    # be predicted at 164 ms; bounded, the fit balances both kinds of step
    unconstrained = np.linalg.solve(m._xtx + m._ridge, m._xty + m._ridge @ m._prior)
    assert unconstrained[3] < -30
    plain16, verify80 = a + 16 * (r + b), a + 16 * r + 80 * b
    assert abs(plain16 - 164) > 5 and abs(verify80 - (100 + 320 - 40)) < 40
    steps = [(16, 16, 0, 164), (16, 80, 1, 380), (12, 40, 1, 220), (10, 10, 0, 140)]
    residual = sum((np.array(m.params) @ [1, q, t, v] - y) ** 2 for q, t, v, y in steps)
    clamped = np.maximum(unconstrained, StepCostModel.LOWER_BOUNDS)
    residual_clamped = sum((clamped @ [1, q, t, v] - y) ** 2 for q, t, v, y in steps)
    assert residual < residual_clamped


def test_a_draft_token_is_priced_apart_from_a_request():
    """Steps where another request costs 5 ms (its KV read, its attention call) and a draft token
    1 ms (one more query on KV read anyway), batch sizes 1-16: the fit recovers both, so at 16
    requests a draft token must be accepted with p >= 16 / (20 + 6 * 16) = 0.14. The previous
    model (ms = a + b * tokens + c * verify), least squares on the same steps, mixes a request's
    cost into a draft token's and sets the bar at more than twice that (0.36 here)."""
    rng = random.Random(2)
    m = StepCostModel()
    rows, times = [], []
    for _ in range(300):
        bs = rng.randint(1, 16)
        verify = rng.random() < 0.5
        n = bs + (rng.randint(1, 48) if verify else 0)
        ms = 20 + 5 * bs + 1 * n + (3 if verify else 0)
        m.observe(bs, n, ms, verify)
        rows.append([1.0, n, float(verify)])
        times.append(ms)
    a, r, b, c = m.params
    assert abs(a - 20) < 1 and abs(r - 5) < 0.1 and abs(b - 1) < 0.1 and abs(c - 3) < 1.5, m.params
    assert abs(m.token_threshold(16) - 16 / 116) < 0.01
    a_old, b_old, _ = np.linalg.lstsq(np.array(rows), np.array(times), rcond=None)[0]
    assert b_old * 16 / (a_old + b_old * 16) > 2 * m.token_threshold(16)
    # at 16 requests 8 draft tokens at p = 0.3 pay (2.4 tokens for 11 ms), at p = 0.1 not
    assert m.speedup(16, 2.4, 8) > 1.0 > m.speedup(16, 0.8, 8)
