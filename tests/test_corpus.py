"""The external corpus (sgl_longspec.drafters.corpus): drafts from a context alone against the brute-force
reference, chunking that keeps every short match, the FIFO byte bound, corpus ids, and the file
walker used by --longspec-corpus."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent))
from suffix_reference import count_occurrences, speculate_seqs  # noqa: E402

from sgl_longspec.drafters.corpus import SuffixCorpus, iter_text_files, load_paths  # noqa: E402
from sgl_longspec.drafters.suffix_index import SuffixIndex  # noqa: E402

SETTINGS = settings(max_examples=80, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


@st.composite
def corpus_case(draw):
    alphabet = draw(st.integers(2, 6))
    tok = st.lists(st.integers(0, alphabet - 1), min_size=1, max_size=40)
    docs = draw(st.lists(tok, min_size=1, max_size=4))
    context = draw(st.lists(st.integers(0, alphabet - 1), min_size=1, max_size=30))
    D = draw(st.integers(2, 12))
    return D, docs, context, draw(st.integers(0, 2**32 - 1))


@SETTINGS
@given(corpus_case())
def test_context_drafts_match_the_reference(case):
    """speculate_context = the reference's draft over the global sequences alone."""
    D, docs, context, seed = case
    rng = random.Random(seed)
    idx = SuffixIndex(max_depth=D, max_cached_responses=100)
    for d in docs:
        idx.add_response(d)
    for _ in range(3):
        p = dict(max_spec_tokens=rng.choice([0, 1, 3, 8, D]), use_tree=rng.random() < 0.5,
                 max_tree_nodes=rng.choice([0, 2, 8, 20]))
        got = idx.speculate_context(np.asarray(context, dtype=rng.choice([np.int32, np.int64])), **p)
        cfg = idx.config
        etok, epar, eprob, escore, ematch, etree = speculate_seqs(
            [(1, docs)], context, D, p["max_spec_tokens"], cfg.spec_factor, cfg.spec_offset,
            cfg.min_token_prob, p["use_tree"], p["max_tree_nodes"])
        assert got.token_ids.tolist() == list(etok), (p, docs, context)
        assert got.parents.tolist() == list(epar)
        assert np.array_equal(got.probs, eprob)
        assert got.score == escore and got.match_len == ematch


def test_context_draft_does_not_touch_requests_and_rejects_bad_tokens():
    idx = SuffixIndex(max_depth=8, vocab_size=100)
    assert len(idx.speculate_context([1, 2, 3])) == 0  # empty global tree
    idx.add_response([1, 2, 3, 4, 5])
    d = idx.speculate_context([9, 1, 2, 3], max_spec_tokens=2)
    assert d.token_ids.tolist() == [4, 5] and d.match_len == 3
    assert idx.num_active_requests == 0
    with pytest.raises(ValueError):
        idx.speculate_context([1, 2, 100])
    with pytest.raises(ValueError):
        idx.speculate_context([1, 2, 3], max_spec_tokens=-1)


def test_chunks_keep_every_match_up_to_max_depth():
    """A document longer than a chunk: every window of <= max_depth tokens still occurs in the
    corpus, so chunking loses no draft a whole-document index would have had."""
    rng = random.Random(0)
    D = 6
    doc = [rng.randrange(5) for _ in range(300)]
    corpus = SuffixCorpus(max_bytes=1 << 30, max_depth=D, chunk_tokens=40)
    assert corpus.add("repo", [doc]) >= len(doc)
    assert len(corpus) > 1
    for a in range(len(doc) - D + 1):
        assert corpus.index.count(doc[a:a + D]) >= count_occurrences([doc], doc[a:a + D]) > 0
    # The continuation of a context taken from the middle of the document is drafted.
    ctx = doc[100:100 + D - 1]
    draft = corpus.speculate(ctx, budget=1)
    assert len(draft) == 1 and draft.source == "corpus"


def test_byte_bound_is_fifo_and_ids_group_documents():
    rng = random.Random(1)
    docs = [[rng.randrange(1000) for _ in range(400)] for _ in range(12)]
    one = SuffixCorpus(max_bytes=1 << 30)
    one.add("a", docs[:1])
    per_doc = one.memory_bytes()
    corpus = SuffixCorpus(max_bytes=int(3.5 * per_doc))
    corpus.add("old", docs[:4])
    corpus.add("new", docs[4:8])
    assert corpus.memory_bytes() <= corpus.max_bytes
    counts = corpus.token_counts()
    assert "old" not in counts and counts["new"] == 3 * 400  # the oldest went first
    assert corpus.num_evicted_chunks == 5
    # The newest text drafts; the evicted does not.
    assert len(corpus.speculate(docs[7][:20], budget=4)) == 4
    assert len(corpus.speculate(docs[0][:20], budget=4)) == 0
    assert corpus.remove("new") and not corpus.remove("new")
    assert corpus.token_counts() == {} and len(corpus) == 0
    assert corpus.memory_bytes() == SuffixCorpus(max_bytes=1).memory_bytes()  # the empty root
    with pytest.raises(ValueError):
        corpus.add("", [[1]])
    assert corpus.add("empty", [[], []]) == 0


def test_text_files_of_a_repository(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("def a():\n    return 1\n")
    (tmp_path / "README.md").write_text("# hello\n")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "config").write_text("[core]\n")
    (tmp_path / "pkg" / "__pycache__").mkdir()
    (tmp_path / "pkg" / "__pycache__" / "a.pyc").write_bytes(b"\0\1\2")
    (tmp_path / "blob.bin").write_bytes(b"PK\0\3binary")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "big.txt").write_text("x" * 2000)
    found = [p.relative_to(tmp_path).as_posix() for p, _ in iter_text_files([tmp_path], max_file_bytes=1000)]
    assert found == ["README.md", "pkg/a.py"]
    assert [p.name for p, _ in iter_text_files([tmp_path / "big.txt"])] == ["big.txt"]
    with pytest.raises(FileNotFoundError):
        list(iter_text_files([tmp_path / "missing"]))
    corpus = SuffixCorpus(max_bytes=1 << 20)
    files, tokens = load_paths(corpus, [tmp_path / "pkg", tmp_path / "README.md"],
                               encode=lambda s: [ord(c) for c in s])
    assert (files, tokens) == (2, len("def a():\n    return 1\n") + len("# hello\n"))
    assert corpus.token_counts() == {"startup": tokens}
