"""The router's step cost model: its fit under the physical bounds (a > 0, b >= 0, c >= 0) is the
bounded least-squares minimum, not the unconstrained one clamped."""

from __future__ import annotations

import random

import numpy as np
from hypothesis import given, settings, strategies as st

from sgl_longspec.step.cost_model import StepCostModel


def _objective(lhs, rhs, theta):
    return float(theta @ lhs @ theta - 2.0 * theta @ rhs)


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2 ** 31), a=st.floats(1.0, 200.0), b=st.floats(-1.0, 10.0),
       c=st.floats(-80.0, 80.0), noise=st.floats(0.0, 20.0))
def test_bounded_fit_is_the_constrained_minimum(seed, a, b, c, noise):
    """Against brute force: no feasible point of a fine grid around the fit, nor the clamped
    unconstrained solution, has a lower objective, and the KKT conditions hold (zero gradient in
    the free coefficients, a non-negative one in those held at their bound)."""
    rng = random.Random(seed)
    m = StepCostModel()
    for _ in range(rng.randint(1, 60)):
        verify = rng.random() < 0.6
        tokens = rng.randint(1, 16) + (rng.randint(1, 64) if verify else 0)
        ms = a + b * tokens + (c if verify else 0.0) + rng.uniform(-noise, noise)
        m.observe(tokens, max(ms, 0.5), verify)
    lhs, rhs = m._xtx + m._ridge, m._xty + m._ridge @ m._prior
    theta = np.array(m.params)
    lower = StepCostModel.LOWER_BOUNDS
    assert np.all(theta >= lower)
    grad = 2.0 * (lhs @ theta - rhs)
    scale = 1e-6 * (1.0 + np.abs(lhs).max() * (1.0 + np.abs(theta).max()))
    for i in range(3):
        if theta[i] > lower[i] + 1e-9:
            assert abs(grad[i]) <= scale * 10, (i, grad, theta)
        else:
            assert grad[i] >= -scale * 10, (i, grad, theta)
    best = _objective(lhs, rhs, theta)
    clamped = np.maximum(np.linalg.solve(lhs, rhs), lower)
    assert best <= _objective(lhs, rhs, clamped) + 1e-6 * abs(best)
    steps = np.array([-1.0, -0.1, 0.0, 0.1, 1.0])
    for da in steps:
        for db in steps * 0.1:
            for dc in steps:
                p = np.maximum(theta + [da, db, dc], lower)
                assert best <= _objective(lhs, rhs, p) + 1e-6 * abs(best)


def test_verify_steps_cheaper_than_the_line_do_not_inflate_the_plain_step():
    """Verify steps a bit cheaper than plain steps of as many tokens (c < 0, e.g. a shorter KV per
    query): clamping would keep the a fitted with a negative c and overestimate every step; the
    bounded fit holds c at 0 and refits a and b to the steps."""
    m = StepCostModel()
    rng = random.Random(1)
    for _ in range(200):
        bs = rng.randint(8, 16)
        m.observe(bs, 100 + 4 * bs, verify=False)
        n = bs + rng.randint(8, 64)
        m.observe(n, 100 + 4 * n - 40, verify=True)
    a, b, c = m.params
    assert c == 0.0
    # the unconstrained fit is a = 100, b = 4, c = -40: clamped, a plain step of 16 would be
    # predicted at 164 ms; bounded, the fit balances both kinds of step
    unconstrained = np.linalg.solve(m._xtx + m._ridge, m._xty + m._ridge @ m._prior)
    assert unconstrained[2] < -30
    plain16, verify80 = a + 16 * b, a + 80 * b
    assert abs(plain16 - 164) > 5 and abs(verify80 - (100 + 320 - 40)) < 40
    residual = sum((a + b * t + c * v - y) ** 2 for t, v, y in
                   [(16, 0, 164), (80, 1, 380), (40, 1, 220), (10, 0, 140)])
    clamped = np.maximum(unconstrained, StepCostModel.LOWER_BOUNDS)
    residual_clamped = sum((clamped @ [1, t, v] - y) ** 2 for t, v, y in
                           [(16, 0, 164), (80, 1, 380), (40, 1, 220), (10, 0, 140)])
    assert residual < residual_clamped
