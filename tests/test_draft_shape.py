"""Draft shapes: a tree's main path and side nodes (Draft.side_mask, shape, width, kept), and the
router's per-request choice between a chain and a tree from the calibration of each kind of node
(Router.better_shape, Router.observe with side nodes)."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from sgl_longspec.drafters.draft import Draft
from sgl_longspec.step.router import SIDE, Router, RouterConfig


@st.composite
def trees(draw, max_nodes=12):
    n = draw(st.integers(0, max_nodes))
    parents = [draw(st.integers(-1, i - 1)) for i in range(n)]
    probs = draw(st.lists(st.floats(0.0, 1.0, width=32), min_size=n, max_size=n))
    return Draft(np.arange(n), np.array(parents, dtype=np.int32), np.array(probs, dtype=np.float32))


def main_path_brute(d: Draft) -> list[int]:
    """From the root, the child with the highest probability (the first on ties), until a leaf."""
    path, node = [], -1
    while True:
        children = [i for i in range(len(d)) if d.parents[i] == node]
        if not children:
            return path
        best = children[0]
        for c in children[1:]:
            if d.probs[c] > d.probs[best]:
                best = c
        path.append(best)
        node = best


@given(trees())
def test_side_mask_shape_and_width_against_brute_force(d):
    main = set(main_path_brute(d))
    assert d.side_mask().tolist() == [i not in main for i in range(len(d))]
    children = [sum(1 for p in d.parents if p == i) for i in range(-1, len(d))]
    assert d.shape == ("tree" if max(children) > 1 else "chain")
    depths = d.depths().tolist()
    assert d.width() == (max(depths.count(k) for k in set(depths)) if len(d) else 0)


@given(trees(), st.data())
def test_kept_keeps_marked_nodes_whose_ancestors_are_kept(d, data):
    keep = np.array(data.draw(st.lists(st.booleans(), min_size=len(d), max_size=len(d))), dtype=bool)
    out, idx = d.kept(keep)

    def ancestors_kept(i):
        while i >= 0:
            if not keep[i]:
                return False
            i = int(d.parents[i])
        return True

    assert idx.tolist() == [i for i in range(len(d)) if ancestors_kept(i)]
    assert out.token_ids.tolist() == d.token_ids[idx].tolist()
    # the kept nodes' parents are the same nodes, renumbered
    for j, i in enumerate(idx):
        p = int(d.parents[i])
        assert (out.parents[j] == -1) if p < 0 else (idx[out.parents[j]] == p)


CHAIN = Draft.chain([1, 2, 3, 4], np.array([0.9, 0.8, 0.7, 0.6]), source="suffix")
# The same main path cut to three nodes, and a sibling of its first node (probability 0.5).
TREE = Draft(np.array([1, 2, 3, 9]), np.array([-1, 0, 1, -1]), np.array([0.9, 0.8, 0.7, 0.5]),
             source="suffix")


def test_better_shape_follows_the_side_nodes_record():
    r = Router(RouterConfig(cost_aware=False))
    # no record: the tree's side node is trusted as drafted (2.9 expected against 3.0: the chain)
    assert r.better_shape("a", [CHAIN, TREE], 1) is CHAIN
    tree_hi = Draft(TREE.token_ids, TREE.parents, np.array([0.9, 0.8, 0.7, 0.8]), source="suffix")
    assert r.better_shape("a", [CHAIN, tree_hi], 1) is tree_hi
    # the request's side nodes were never right: its trees lose their value
    for _ in range(10):
        r.observe("b", 4, 3, expected=3.2, source="suffix", side=(1, 0, 0.8))
    assert r.calibration("b", "suffix" + SIDE) < 0.3
    assert r.calibration("b", "suffix") >= 1.0  # the main path stays trusted
    assert r.better_shape("b", [CHAIN, tree_hi], 1) is CHAIN
    # and where they were right, trees win even against a longer chain
    for _ in range(10):
        r.observe("c", 4, 1, expected=1.7, source="suffix", side=(1, 1, 0.8))
    assert r.better_shape("c", [CHAIN, tree_hi], 1) is tree_hi
    assert len(r.better_shape("d", [Draft.empty(), Draft.empty()], 1)) == 0


def test_plan_batch_prunes_side_nodes_by_their_own_calibration():
    r = Router(RouterConfig())
    r.cost.observe(1, 1, 100.0, verify=False)
    r.cost.observe(1, 9, 120.0, verify=True)
    theta = r.cost.token_threshold(1)
    assert 0.0 < theta < 0.5
    tree = Draft(np.array([1, 2, 3, 9]), np.array([-1, 0, 1, -1]),
                 np.array([0.9, 0.8, 0.7, 0.45]), source="suffix")
    assert len(r.plan_batch(["fresh"], [tree])[0]) == 4  # side node above the break-even
    for _ in range(10):
        r.observe("burnt", 4, 3, expected=2.85, source="suffix", side=(1, 0, 0.45))
    kept = r.plan_batch(["burnt"], [tree])[0]
    assert kept.token_ids.tolist() == [1, 2, 3] and kept.shape == "chain"
