"""The benchmark suite's per-cell figures (benchmarks/run.py): tau from SGLang's per-request
counters, and the verified drafts per shape from the LONGSPEC server's stats file."""

from __future__ import annotations

import json

from benchmarks.run import aggregate, drafts_by_shape


def _rec(n, ver, error=False):
    r = {"prompt_tokens": 10, "completion_tokens": n, "spec_verify_ct": ver, "latency": 2.0,
         "ttft": 0.5, "tpot": 1.5 / (n - 1)}
    if error:
        r["error"] = "boom"
    return r


def test_tau_sums_over_the_cells_requests():
    agg = aggregate([_rec(40, 10), _rec(20, 20), _rec(30, 5, error=True), _rec(10, 0)], wall=4.0)
    assert agg["requests"] == 4 and agg["errors"] == 1
    assert agg["output_tokens"] == 70 and agg["throughput"] == 17.5
    assert agg["tau"] == 70 / (10 + 20 + 10)  # no verify count: one step per token


def test_drafts_by_shape_from_the_stats_file(tmp_path):
    f = tmp_path / "stats.json"
    assert drafts_by_shape(f) == {}  # no file yet (a plain server, or before the first step)
    f.write_text("{not json")
    assert drafts_by_shape(f) == {}  # caught mid-write
    f.write_text(json.dumps({"by_shape": {"chain": {"drafts": 7, "accepted": 9},
                                          "tree": {"drafts": 2}}}))
    assert drafts_by_shape(f) == {"chain": 7, "tree": 2}
