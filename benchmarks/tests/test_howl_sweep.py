"""The HOWL replay's accounting (benchmarks/howl_sweep.py): the accepted path of a draft against the
recorded continuation, and the shape policy (a real Router) learning per request which shape pays."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks import howl_sweep as H
from sgl_longspec.drafters.draft import Draft


@st.composite
def drafts_and_truths(draw):
    n = draw(st.integers(0, 12))
    parents = [draw(st.integers(-1, i - 1)) for i in range(n)]
    tokens = [draw(st.integers(0, 2)) for _ in range(n)]
    truth = draw(st.lists(st.integers(0, 2), min_size=0, max_size=8))
    return Draft(tokens, parents), truth


@settings(max_examples=200, deadline=None)
@given(drafts_and_truths())
def test_accepted_nodes_are_the_longest_matching_path(case):
    d, truth = case
    on = H.accepted_nodes(d, truth)
    assert int(on.sum()) == H.accepted_len(d, truth)
    # the marked nodes form one root path whose tokens are the truth's prefix
    path = [int(i) for i in np.flatnonzero(on)]
    for depth, i in enumerate(path):
        assert int(d.parents[i]) == (path[depth - 1] if depth else -1)
        assert int(d.token_ids[i]) == truth[depth]


def _row(t, chain_tokens, tree, truth):
    chain = Draft.chain(chain_tokens, probs=[0.6] * len(chain_tokens), score=0.6 * len(chain_tokens),
                        source="suffix")
    drafts = {"s": chain, "st": tree, **{name: Draft.empty() for name in H.OWL_SHAPES}}
    return H.position_row(t, truth, drafts)


def test_shape_policy_verifies_trees_where_the_text_branches_and_chains_where_it_copies():
    # Branching text: the chain's guess (token 1) is always wrong, the tree's sibling (token 2)
    # right. Copied text: the chain is right; the tree's sibling never is.
    tree = Draft([1, 2, 3], [-1, -1, 1], probs=[0.6, 0.4, 0.4], score=1.4, source="suffix")
    branching = [_row(t, [1, 3], tree, [2, 3, 4]) for t in range(1, 200)]
    copying = [_row(t, [1, 3, 5], Draft([1, 2, 3], [-1, -1, 0], probs=[0.6, 0.3, 0.6], score=1.5,
                                        source="suffix"), [1, 3, 5, 7]) for t in range(1, 200)]
    _, _, _, on_branching = H.walk(branching, 200, H.ShapePolicy(1.0))
    _, _, _, on_copying = H.walk(copying, 200, H.ShapePolicy(1.0))
    assert on_branching["tree"] > on_branching["chain"], on_branching
    assert on_copying["chain"] > on_copying["tree"], on_copying


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4), st.integers(0, 4)), min_size=30,
                max_size=30))
def test_oracle_bounds_every_policy(accepts):
    """The oracle's step count is at most that of every policy on the same rows, and equals a
    breadth-first search over every sequence of choices."""
    rows = []
    for t, (a_s, a_st, a_o) in enumerate(accepts, start=1):
        truth = [7] * 5
        drafts = {"s": Draft.chain([7] * a_s + [8], source="suffix"),
                  "st": Draft([7] * a_st + [9, 6], list(range(-1, a_st)) + [a_st - 1], source="suffix"),
                  **{name: Draft.chain([7] * a_o + [5], source="owl") for name in H.OWL_SHAPES}}
        rows.append(H.position_row(t, truth, drafts))
    n_gen = len(rows) + 1
    pols = H.policies()
    steps = {name: H.walk(rows, n_gen, pols[name]() if name.startswith(("router@", "shape@"))
                          else pols[name](rows, n_gen) if name == "oracle" else pols[name])[0]
             for name in pols}
    assert all(steps["oracle"] <= s for s in steps.values()), steps
    jumps = {r["t"]: {r[f"{k}_acc"] + 1 for k in H.OraclePlan.SHAPES} | {1} for r in rows}
    frontier, n_steps = {1}, 0  # breadth-first over every sequence of choices
    while n_gen not in frontier:
        frontier = {min(t + j, n_gen) for t in frontier if t < n_gen for j in jumps[t]}
        n_steps += 1
    assert steps["oracle"] == n_steps
