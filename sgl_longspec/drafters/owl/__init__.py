"""OWL: an LSTM drafter conditioned only on the target's last (final-norm) hidden state.

See ``sgl_longspec.drafters.owl.model`` for the conditioning convention and ``sgl_longspec.training.owl_train`` for the
training command (``python -m sgl_longspec.training.owl_train``).
"""

from sgl_longspec.drafters.owl.checkpoint import (  # noqa: F401
    build_drafter,
    load_drafter,
    load_drafter_for_model,
    read_config,
    target_fingerprint,
)
from sgl_longspec.drafters.owl.model import OwlConfig, OwlModel, OwlState  # noqa: F401

SHIPPED_CHECKPOINTS = {"smollm2-135m-instruct": "owl-smollm2-135m"}


def shipped_checkpoint(model: str = "smollm2-135m-instruct"):
    """Path of the drafter checkpoint shipped in the package for an embedded model name."""
    from pathlib import Path

    name = SHIPPED_CHECKPOINTS.get(model)
    if name is None:
        raise KeyError(f"no shipped OWL checkpoint for {model!r}; have {sorted(SHIPPED_CHECKPOINTS)}")
    return Path(__file__).resolve().parents[2] / "checkpoints" / name
