"""Verification of drafts against the target: the step's ragged verify layout (built once, read by
the worker and the attention backends), acceptance (greedy and lossless sampling over chains and
trees) and the per-path logit rules (penalties, bias, grammars)."""
