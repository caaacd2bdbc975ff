"""Request checks SGLang lacks, added through its HookRegistry (every server this package loads in).

A prompt given as `input_ids` with an id outside the vocabulary reaches the embedding unchecked:
on a CPU it raises IndexError inside the scheduler and the whole server goes down, on a GPU it is a
device-side assert that does the same. SGLang's tokenizer manager validates every request before
it is queued (`_validate_one_request`, whose ValueError becomes an HTTP 400); a BEFORE hook there
rejects the request with the bad id and its position, and nothing reaches the scheduler.
"""

from __future__ import annotations

from sgl_longspec.adapter import sglang_compat


def out_of_vocab(input_ids, vocab_size: int) -> str | None:
    """Why these prompt ids cannot be embedded, or None. `input_ids` is a flat list of ints."""
    if not input_ids:
        return None
    lo, hi = min(input_ids), max(input_ids)
    if lo >= 0 and hi < vocab_size:
        return None
    pos, tok = next((i, t) for i, t in enumerate(input_ids) if not 0 <= t < vocab_size)
    return (f"input_ids[{pos}] = {tok} is not a token id of this model: valid ids are "
            f"0 .. {vocab_size - 1}")


def _check_input_ids(tokenizer_manager, obj, input_ids, *args, **kwargs):
    vocab = getattr(getattr(tokenizer_manager, "model_config", None), "vocab_size", None)
    if vocab and input_ids and isinstance(input_ids[0], int):
        problem = out_of_vocab(input_ids, int(vocab))
        if problem:
            raise ValueError(problem)
    return None  # arguments unchanged


def register() -> None:
    sglang_compat.hook(sglang_compat.VALIDATE_REQUEST, _check_input_ids, "BEFORE")
