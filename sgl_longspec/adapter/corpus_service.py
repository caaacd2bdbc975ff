"""The scheduler side of SGLang's external-corpus calls on a LONGSPEC server: the corpus
endpoints (sgl_longspec.adapter.corpus_endpoints) route the scheduler's add / remove / list
calls here, in the scheduler process where the worker drafts from the corpus. Only the deciding
TP rank drafts, so only it holds the corpus; the others answer success and their reply is not
the one returned."""

from __future__ import annotations

from sgl_longspec.adapter import sglang_compat
from sgl_longspec.drafters.corpus import SuffixCorpus


class CorpusService:
    def __init__(self, corpus: SuffixCorpus, decides: bool, corpus_mb: int):
        self.corpus = corpus
        self.decides = decides
        self.corpus_mb = corpus_mb  # the configured budget, named in a reply when text was evicted

    def add_external_corpus(self, req):
        out = sglang_compat.name("AddExternalCorpusReqOutput")
        if not self.decides:
            return out(success=True, corpus_id=req.corpus_id)
        try:
            n = self.corpus.add(req.corpus_id, req.token_chunks or [])
        except ValueError as e:
            return out(success=False, message=f"LONGSPEC corpus: {e}")
        kept = self.corpus.token_counts().get(req.corpus_id, 0)
        message = f"indexed {n} tokens"
        if kept < n:
            message += (f"; {n - kept} of them already evicted: the corpus holds "
                        f"--longspec-corpus-mb {self.corpus_mb} MiB of index")
        return out(success=True, corpus_id=req.corpus_id, message=message, loaded_token_count=n)

    def remove_external_corpus(self, req):
        out = sglang_compat.name("RemoveExternalCorpusReqOutput")
        if not self.decides:
            return out(success=True)
        if self.corpus.remove(req.corpus_id):
            return out(success=True, message=f"removed corpus {req.corpus_id}")
        return out(success=False, message=f"no corpus with id {req.corpus_id!r}")

    def list_external_corpora(self, req):
        counts = self.corpus.token_counts() if self.decides else {}
        return sglang_compat.name("ListExternalCorporaReqOutput")(success=True, corpus_token_counts=counts)
