"""SGLang's external-corpus endpoints for a LONGSPEC server (HookRegistry AROUND hooks).

SGLang serves `POST /add_external_corpus`, `POST /remove_external_corpus` and
`GET /list_external_corpora` for its NGRAM algorithm: the tokenizer manager tokenizes the documents
and fans the token chunks out to the schedulers, whose corpus manager loads them. Both ends refuse
every other algorithm. The hooks below take over those three calls on a LONGSPEC server only (NGRAM
and plain servers run SGLang's code unchanged) and hand the tokens to the LONGSPEC worker's corpus
(`sgl_longspec.drafters.corpus.SuffixCorpus`). The request and reply shapes are SGLang's.

Security: the endpoints take content (`documents`), never a server-side `file_path` (a client
must not make the server read its files; `--longspec-corpus` indexes server files at start). The
routes are SGLang's `ADMIN_OPTIONAL` ones: when the server has `--admin-api-key` they require it.
"""

from __future__ import annotations

import uuid

from sgl_longspec.adapter import sglang_compat


def _is_longspec(server_args) -> bool:
    return str(getattr(server_args, "speculative_algorithm", "") or "").upper() == "LONGSPEC"


def _io(name: str):
    return sglang_compat.name(name)


def _merge(results) -> tuple[bool, str]:
    ok = all(r.success for r in results)
    return ok, "; ".join(dict.fromkeys(r.message for r in results if r.message))


# ---- tokenizer manager (HTTP side) --------------------------------------------------------
async def _tm_add(original, tm, obj, *args, **kwargs):
    if not _is_longspec(tm.server_args):
        return await original(tm, obj, *args, **kwargs)
    out = _io("AddExternalCorpusReqOutput")
    if obj.file_path is not None:
        return out(success=False, message=(
            "LONGSPEC takes corpus content as `documents`, never a server-side `file_path`; "
            "index files of the server at start with --longspec-corpus"))
    docs = obj.documents
    if not isinstance(docs, list) or not all(isinstance(d, str) for d in docs):
        return out(success=False, message="`documents` must be a list of strings")
    tm.auto_create_handle_loop()
    corpus_id = obj.corpus_id or uuid.uuid4().hex
    try:
        chunks = [list(tm.tokenizer.encode(d, add_special_tokens=False)) for d in docs if d]
    except Exception as e:  # a tokenizer failure is the client's document, not the server
        return out(success=False, message=f"tokenizing the documents failed: {e}")
    obj.corpus_id, obj.documents, obj.token_chunks = corpus_id, None, [c for c in chunks if c]
    results = await tm.add_external_corpus_communicator(obj)
    ok, message = _merge(results)
    return out(success=ok, corpus_id=corpus_id if ok else "", message=message,
               loaded_token_count=results[0].loaded_token_count if ok else 0)


async def _tm_remove(original, tm, corpus_id, *args, **kwargs):
    if not _is_longspec(tm.server_args):
        return await original(tm, corpus_id, *args, **kwargs)
    tm.auto_create_handle_loop()
    results = await tm.remove_external_corpus_communicator(
        _io("RemoveExternalCorpusReqInput")(corpus_id=corpus_id))
    ok, message = _merge(results)
    return _io("RemoveExternalCorpusReqOutput")(success=ok, message=message)


async def _tm_list(original, tm, *args, **kwargs):
    if not _is_longspec(tm.server_args):
        return await original(tm, *args, **kwargs)
    tm.auto_create_handle_loop()
    results = await tm.list_external_corpora_communicator(_io("ListExternalCorporaReqInput")())
    ok, message = _merge(results)
    counts: dict = {}
    for r in results:
        for cid, n in (r.corpus_token_counts or {}).items():
            counts[cid] = max(counts.get(cid, 0), n)
    return _io("ListExternalCorporaReqOutput")(success=ok, corpus_token_counts=counts, message=message)


# ---- scheduler (where the corpus lives, with the worker) ----------------------------------
def _corpus_service(scheduler):
    """The LONGSPEC worker's CorpusService (sgl_longspec.adapter.corpus_service), None on any
    other server (SGLang keeps the scheduler's speculative worker as `draft_worker`)."""
    worker = getattr(scheduler, "draft_worker", None)
    return getattr(worker, "corpus_service", None)


def _to_worker(call: str):
    """The scheduler's `call` (one of sglang_compat.CORPUS_CALLS): the LONGSPEC worker's corpus
    service's method of the same name on a LONGSPEC server, SGLang's own otherwise."""
    def hook(original, scheduler, recv_req, *args, **kwargs):
        service = _corpus_service(scheduler)
        if service is None:
            return original(scheduler, recv_req, *args, **kwargs)
        return getattr(service, call)(recv_req)

    return hook


def register() -> None:
    c = sglang_compat
    add, remove, listing = c.CORPUS_CALLS
    for call, fn in {add: _tm_add, remove: _tm_remove, listing: _tm_list}.items():
        c.hook(f"{c.TOKENIZER_MANAGER}.{call}", fn, "AROUND")
    for call in c.CORPUS_CALLS:
        c.hook(f"{c.SCHEDULER}.{call}", _to_worker(call), "AROUND")
