"""Attention math and kernels for the speculative verify pass (LongSpec hybrid tree attention).

- :mod:`flashinfer_ext.reference`: pure PyTorch, the production CPU path and the reference.
- :mod:`flashinfer_ext.triton_tree`: Triton kernel for ragged (tree-)masked attention with LSE.
- :mod:`flashinfer_ext.wrapper`: ``HybridTreeVerifyWrapper`` (plan/run, FlashInfer style).

Nothing here imports triton or flashinfer at import time.
"""

from flashinfer_ext.reference import (  # noqa: F401
    attention_with_lse,
    batch_hybrid_tree_attention,
    dense_tree_verify_attention,
    hybrid_tree_attention,
    lse_from_base2,
    lse_to_base2,
    merge_attention_states,
    merge_attention_states_many,
)

__all__ = [
    "attention_with_lse",
    "merge_attention_states",
    "merge_attention_states_many",
    "hybrid_tree_attention",
    "batch_hybrid_tree_attention",
    "dense_tree_verify_attention",
    "lse_to_base2",
    "lse_from_base2",
]


def __getattr__(name):  # lazy: the wrapper module is only imported when asked for
    if name == "HybridTreeVerifyWrapper":
        from flashinfer_ext.wrapper import HybridTreeVerifyWrapper

        return HybridTreeVerifyWrapper
    raise AttributeError(name)
