"""What a LONGSPEC worker loads at start beside the target: the OWL drafter (bound to the target's
embedding and head) and the --longspec-corpus files (tokenized by the server's tokenizer)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from sgl_longspec.config import LongSpecConfig
from sgl_longspec.drafters.corpus import SuffixCorpus, load_paths

logger = logging.getLogger("sgl_longspec")


def load_owl_drafter(config: LongSpecConfig, model, device):
    """The OWL drafter: the configured checkpoint (errors stop the server start with the reason),
    else the one shipped for the model if it matches, else none (suffix-only)."""
    path = config.drafter_path
    if path.lower() == "none":
        return None
    from sgl_longspec.drafters.owl import load_drafter, shipped_checkpoint

    explicit = bool(path)
    if not explicit:
        path = str(shipped_checkpoint())
        if not (Path(path) / "config.json").is_file():
            logger.warning("LONGSPEC: no OWL drafter checkpoint shipped (%s); suffix drafts only", path)
            return None
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else model.model.embed_tokens
    head = getattr(model, "lm_head", emb)
    try:
        drafter = load_drafter(path, emb, head, device=device, dtype=emb.weight.dtype)
    except (ValueError, OSError) as e:
        if explicit:
            raise ValueError(f"--longspec-drafter-path: {e}") from e
        logger.warning("LONGSPEC: shipped OWL drafter does not fit this model (%s); suffix drafts only", e)
        return None
    logger.info("LONGSPEC: OWL drafter %s (%d parameters of its own)", path, drafter.num_parameters())
    return drafter


def load_startup_corpus(corpus: SuffixCorpus, config: LongSpecConfig, server_args, target_worker) -> None:
    """--longspec-corpus: index the files under the given paths, tokenized by the server's
    tokenizer, as corpus "startup" (a path that vanished since the launch stops the start)."""
    tok = getattr(target_worker, "tokenizer", None)
    if tok is None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(server_args.tokenizer_path or server_args.model_path)
    t0 = time.perf_counter()
    files, tokens = load_paths(corpus, config.corpus_paths(),
                               lambda text: tok.encode(text, add_special_tokens=False))
    logger.info("LONGSPEC corpus: %d files, %d tokens indexed in %.1f s (%d KiB of %d MiB)",
                files, tokens, time.perf_counter() - t0, corpus.memory_bytes() >> 10, config.corpus_mb)
