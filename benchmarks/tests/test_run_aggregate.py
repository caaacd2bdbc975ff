"""The benchmark suite's per-cell figures (benchmarks/run.py): tau from SGLang's per-request
counters, and the verified drafts per shape from the LONGSPEC server's stats file."""

from __future__ import annotations

import json

from benchmarks.run import aggregate, server_counts


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


def test_server_counts_from_the_stats_file(tmp_path):
    f = tmp_path / "stats.json"
    nothing = {"drafts_by_shape": {}, "refusals": {}, "refused_scored": {}}
    assert server_counts(f) == nothing  # no file yet (a plain server, or before the first step)
    f.write_text("{not json")
    assert server_counts(f) == nothing  # caught mid-write
    f.write_text(json.dumps({"by_shape": {"chain": {"drafts": 7, "accepted": 9},
                                          "tree": {"drafts": 2}},
                             "refusals": {"unprofitable": 5, "batch_budget": 1},
                             "refused_scored": {"suffix": [4, 20, 6.5, 9]}}))
    assert server_counts(f) == {"drafts_by_shape": {"chain": 7, "tree": 2},
                                "refusals": {"unprofitable": 5, "batch_budget": 1},
                                "refused_scored": {"suffix:drafts": 4, "suffix:tokens": 20,
                                                   "suffix:expected": 6.5, "suffix:accepted": 9}}


def test_rounds_pool_each_cell_and_give_the_ratio_per_round(monkeypatch, tmp_path):
    """--rounds 2: each configuration's server runs twice in turn; a cell's figures pool both
    rounds (tokens over the summed walls), its ratio to vanilla is also given per round (whose
    spread is the comparison's noise), and outputs are compared with vanilla's of the same round."""
    import argparse

    from benchmarks import run as R

    walls = {("vanilla", 0): 2.0, ("vanilla", 1): 4.0, ("longspec", 0): 1.0, ("longspec", 1): 4.0}
    calls = []

    def fake_sessions(base_url, tok, sessions, concurrency, context_len, progress=None):
        cfg, rnd = base_url.rsplit("/", 1)[1], len([c for c in calls if c == base_url])
        calls.append(base_url)
        if cfg == "longspec":  # the server's running counts, as its stats file has them
            stats = tmp_path / "logs" / f"suite-longspec-r{rnd + 1}-longspec-stats.json"
            stats.write_text(json.dumps({"refusals": {"unprofitable": 3 + rnd}}))
        recs = [dict(_rec(10, 5), sid=s.sid, workload=s.workload, label=s.label, turn=k,
                     text_sha="same" if (cfg, rnd) != ("longspec", 1) or k else "other")
                for s in sessions for k in range(len(s.turns))]
        return recs, walls[(cfg, rnd)]

    monkeypatch.setattr(R, "run_sessions", fake_sessions)
    monkeypatch.setattr(R, "warmup", lambda url, tok: None)
    monkeypatch.setattr(R, "flush_cache", lambda url: None)
    phase = R.Phase("suite", None, ["vanilla", "longspec"], [2],
                    [R.WorkloadSpec("chat", {"turns": 2, "max_new_tokens": 8}, min_sessions=2)])
    args = argparse.Namespace(rounds=2, base_url="http://x", seed=0, port=None, startup_timeout=1,
                              server_args=[], bench_serving=False)
    results = {"phases": {}, "notes": []}
    real_run_config = R.run_config

    def per_config(phase, args, out_dir, results, run, tag, *rest):
        # One "server" per configuration (--base-url: no process), told apart by its URL.
        args = argparse.Namespace(**{**vars(args), "base_url": "http://x/" + tag.split("-")[1]})
        return real_run_config(phase, args, out_dir, results, run, tag, *rest)

    monkeypatch.setattr(R, "run_config", per_config)
    (tmp_path / "logs").mkdir()
    R.run_phase(phase, args, tmp_path, results)
    runs = results["phases"]["suite"]["runs"]
    van, spec = runs["vanilla"]["results"]["chat@c2"], runs["longspec"]["results"]["chat@c2"]
    assert van["requests"] == 8 and van["wall_s"] == 6.0 and spec["wall_s"] == 5.0
    assert abs(spec["speedup_vs_vanilla"] - 6.0 / 5.0) < 1e-9
    assert spec["speedup_vs_vanilla_rounds"] == [2.0, 1.0]
    assert runs["longspec"]["output_match_vs_vanilla"] == {"same": 6, "different": 2}
    # the router's refusals over each cell: per round, and pooled over the rounds
    assert [rd["chat@c2"]["refusals"] for rd in runs["longspec"]["rounds"]] == [
        {"unprofitable": 3}, {"unprofitable": 4}]
    assert spec["refusals"] == {"unprofitable": 7} and van["refusals"] == {}
    assert "(1.00-2.00, 2 rounds)" in R.markdown({"title": "t", "command": "c", "date": "d",
                                                   "machine": "m", **results})
