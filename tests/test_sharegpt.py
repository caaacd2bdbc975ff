"""The one ShareGPT reader (sgl_longspec.tools.sharegpt) against brute force on truncated JSON arrays, and
on the pinned wheel's real file."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sgl_longspec.tools import sharegpt

_TURN = st.fixed_dictionaries({"from": st.sampled_from(["human", "gpt"]),
                               "value": st.text(alphabet=st.sampled_from(list('ab ,[]{}"\\\n é中🙂')), max_size=30)})
_RECORD = st.fixed_dictionaries({"id": st.text(alphabet="xyz0", max_size=4), "conversations": st.lists(_TURN, max_size=4)})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records=st.lists(_RECORD, max_size=8), cut=st.floats(0, 1), chunk=st.integers(1, 64),
       limit=st.one_of(st.none(), st.integers(0, 9)), max_chars=st.one_of(st.none(), st.integers(0, 600)),
       indent=st.sampled_from([None, 1]))
def test_iter_sharegpt_yields_the_complete_records(tmp_path, monkeypatch, records, cut, chunk, limit,
                                                    max_chars, indent):
    """Every record that ends before the cut (and within max_chars), in order, up to limit, with
    records split across any chunk boundary."""
    text = json.dumps(records, ensure_ascii=False, indent=indent)
    text = text[:int(len(text) * cut)]
    path = tmp_path / "sharegpt.json"
    path.write_text(text, encoding="utf-8")
    monkeypatch.setattr(sharegpt, "CHUNK_CHARS", chunk)
    # brute force: a record is complete when the prefix up to its end, closed with "]", parses
    seen = text if max_chars is None else text[:max_chars]
    want = [r for i, r in enumerate(records)
            if len(json.dumps(records[:i + 1], ensure_ascii=False, indent=indent).rstrip("]\n ")) <= len(seen)]
    if limit is not None:
        want = want[:limit]
    assert list(sharegpt.iter_sharegpt(limit, max_chars, path=path)) == want


def test_real_file_reads_in_order_and_stops_at_the_limit():
    recs = list(sharegpt.iter_sharegpt(300))
    assert len(recs) == 300 and all("conversations" in r for r in recs)
    assert [r["id"] for r in sharegpt.iter_sharegpt(10)] == [r["id"] for r in recs[:10]]
