"""An external corpus for suffix drafting: text an agent is likely to copy from before it has been
in any prompt (a repository's files, API references, earlier sessions). Engine independent.

The documents live in the global tree of a `SuffixIndex` of their own, so that they never compete
with past outputs for that tree's bound, and drafts come from `SuffixIndex.speculate_context` on
the request's last `max_depth` tokens (a request never has to be registered here). The corpus is
bounded by bytes of index (nodes + tokens, ~105 bytes a token) and evicts first in, first out.
Documents are indexed in chunks of at most `chunk_tokens` tokens, overlapping by `max_depth`
tokens so that every match and continuation of up to `max_depth` tokens stays inside one chunk;
eviction therefore drops old text chunk by chunk, not whole repositories at once.

Documents are grouped under a corpus id, as in SGLang's NGRAM external corpus
(`POST /add_external_corpus`, `/remove_external_corpus`, `/list_external_corpora`).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from sgl_longspec.drafters.draft import Draft
from sgl_longspec.drafters.suffix_index import INT32_MAX, SuffixIndex, SuffixIndexConfig

__all__ = ["SuffixCorpus", "iter_text_files", "load_paths"]

# Folders that are never corpus material: version control, caches, virtual environments.
SKIPPED_DIRS = {".git", ".hg", ".svn", "__pycache__", "node_modules", ".venv", "venv", ".tox",
                ".mypy_cache", ".pytest_cache", "build", "dist"}


class SuffixCorpus:
    def __init__(self, max_bytes: int, max_depth: int = 64, max_spec_tokens: int = 32,
                 min_token_prob: float = 0.1, spec_factor: float = 1.0, spec_offset: float = 0.0,
                 chunk_tokens: int = 16384):
        if chunk_tokens <= max_depth:
            raise ValueError(f"chunk_tokens ({chunk_tokens}) must exceed max_depth ({max_depth})")
        self.max_bytes = int(max_bytes)
        self.max_depth = int(max_depth)
        self.chunk_tokens = int(chunk_tokens)
        self.index = SuffixIndex(SuffixIndexConfig(
            max_depth=max_depth, max_cached_responses=INT32_MAX,  # bound by bytes only
            max_cache_bytes=self.max_bytes,
            eviction="fifo", max_spec_tokens=max_spec_tokens, spec_factor=spec_factor,
            spec_offset=spec_offset, min_token_prob=min_token_prob, max_tree_nodes=max_spec_tokens))
        # chunk (the index's global sequence id, which the index reuses once freed) -> its tokens,
        # oldest first: the index evicts in the same order
        self._chunk_tokens: OrderedDict[int, int] = OrderedDict()
        self.num_evicted_chunks = 0

    # ---- contents -----------------------------------------------------------------------------
    def add(self, corpus_id: str, documents: Iterable[Sequence[int]]) -> int:
        """Index the documents (token id lists) under corpus_id; returns the tokens indexed (empty
        documents are skipped). Older chunks are evicted first when the byte bound is reached."""
        if not isinstance(corpus_id, str) or not corpus_id:
            raise ValueError("corpus_id must be a non-empty string")
        loaded = 0
        for doc in documents:
            for chunk in self._chunks(list(doc)):
                evicted = self.index.num_evicted
                seq = self.index.add_response(chunk, req_id=corpus_id)
                self._chunk_tokens[seq] = len(chunk)
                loaded += len(chunk)
                for _ in range(self.index.num_evicted - evicted):
                    self._chunk_tokens.popitem(last=False)
                    self.num_evicted_chunks += 1
        return loaded

    def remove(self, corpus_id: str) -> bool:
        """Drop every chunk of corpus_id; False when there was none (left, or already evicted)."""
        seqs = [seq for seq, cid in self.index.cached_responses() if cid == corpus_id]
        for seq in seqs:
            self.index.evict_response(seq)
            self._chunk_tokens.pop(seq, None)
        return bool(seqs)

    def token_counts(self) -> dict[str, int]:
        """Tokens indexed per corpus id (what eviction has left)."""
        counts: dict[str, int] = {}
        for seq, cid in self.index.cached_responses():
            counts[cid] = counts.get(cid, 0) + self._chunk_tokens.get(seq, 0)
        return counts

    def __len__(self) -> int:
        """Chunks indexed."""
        return self.index.num_cached_responses

    def memory_bytes(self) -> int:
        return self.index.global_memory_bytes()

    def _chunks(self, doc: list[int]) -> Iterator[list[int]]:
        if not doc:
            return
        step = self.chunk_tokens - self.max_depth
        start = 0
        while True:
            yield doc[start:start + self.chunk_tokens]
            if start + self.chunk_tokens >= len(doc):
                return
            start += step

    # ---- drafting -----------------------------------------------------------------------------
    def speculate(self, context: Sequence[int], budget: int, use_tree: bool = False) -> Draft:
        """A draft continuing `context` (only its last max_depth tokens matter), source "corpus"."""
        if not len(self):
            return Draft.empty()
        d = self.index.speculate_context(context[-self.max_depth:], max_spec_tokens=budget,
                                         use_tree=use_tree, max_tree_nodes=budget)
        if len(d):
            d.source = "corpus"
        return d


def iter_text_files(paths: Iterable[str | os.PathLike], max_file_bytes: int = 1 << 20
                    ) -> Iterator[tuple[Path, str]]:
    """(path, text) of every UTF-8 text file under `paths` (files or folders), in sorted order.
    Hidden and build folders, files over max_file_bytes and binary files are skipped. A path
    that does not exist raises FileNotFoundError (a typo should stop the server, not shrink the
    corpus silently)."""
    for root in paths:
        root = Path(root)
        if not root.exists():
            raise FileNotFoundError(f"corpus path does not exist: {root}")
        files = [root] if root.is_file() else _walk(root)
        for f in files:
            text = _read_text(f, max_file_bytes)
            if text:
                yield f, text


def _walk(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIPPED_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath) / name


def _read_text(path: Path, max_file_bytes: int) -> str | None:
    try:
        if path.stat().st_size > max_file_bytes:
            return None
        data = path.read_bytes()
    except OSError:
        return None
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def load_paths(corpus: SuffixCorpus, paths: Iterable[str | os.PathLike],
               encode: Callable[[str], list[int]], corpus_id: str = "startup") -> tuple[int, int]:
    """Index the text files under `paths` into the corpus: (files, tokens) loaded."""
    files = 0
    docs = []
    for _, text in iter_text_files(paths):
        ids = encode(text)
        if ids:
            docs.append(ids)
            files += 1
    return files, corpus.add(corpus_id, docs)
