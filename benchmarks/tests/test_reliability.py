"""The load-and-fault suite's own logic (benchmarks/reliability.py), without a server: its checks
fail on each kind of loss or leak, and the report renders. The suite itself runs against real
servers (`python -m benchmarks.reliability`, results in benchmarks/results/reliability/)."""

from __future__ import annotations

import copy
import os

from benchmarks import reliability as REL

IDLE = {"rss_mb": 3000.0, "tracked_requests": 1, "router_records": 1, "hidden_states": 1,
        "num_active_requests": 1, "index_request_bytes": 500, "index_global_bytes": 10_000,
        "num_cached_responses": 20, "num_used_tokens": 0}


def _report() -> dict:
    return {"command": "python -m benchmarks.reliability", "date": "d", "machine": "m", "clients": 64,
            "minutes": 10, "faults": REL.FAULTS, "global_cache_requests": 4096,
            "baseline": dict(IDLE), "after": {**IDLE, "rss_mb": 3100.0, "index_global_bytes": 90_000},
            "end_of_load": dict(IDLE), "outcomes": {"completed": 90, "aborted": 5, "dropped": 4, "rejected": 3},
            "by_action": {}, "abort_late": 1, "output_tokens": 9000, "tau": 1.8,
            "replay": {"compared": 90, "distinct_requests": 40, "wrong": []},
            "faults_injected": {"index": 3, "verify": 2}, "fallbacks": {}, "breaker_trips": {},
            "server_alive_after": True}


def test_a_clean_run_passes_every_check():
    checks = REL.verdict(_report(), 0.05)
    assert all(checks.values()), checks
    md = REL.markdown({**_report(), "checks": checks})
    assert "PASS" in md and "FAIL" not in md


def _break(path, value):
    r = copy.deepcopy(_report())
    d = r
    for k in path[:-1]:
        d = d[k]
    d[path[-1]] = value
    return r


def test_each_loss_or_leak_fails_its_check():
    cases = {
        "no request lost": _break(("outcomes", "lost"), 1),
        "every bad request got a 4xx": _break(("outcomes", "wrong-status"), 1),
        "completed outputs identical to plain": _break(("replay", "wrong"), ["rel-3-4"]),
        "per-request state back to baseline": _break(("after", "hidden_states"), 7),
        "per-request index bytes back to baseline (within 1 KiB)": _break(("after", "index_request_bytes"), 5000),
        "KV tokens in use back to baseline": _break(("after", "num_used_tokens"), 64),
        "RSS within 5% of baseline": _break(("after", "rss_mb"), 3200.0),
        "every fault point fired and the server survived": _break(("server_alive_after",), False),
        "global tree within its bound": _break(("after", "num_cached_responses"), 5000),
    }
    for name, report in cases.items():
        checks = REL.verdict(report, 0.05)
        assert not checks[name], name
        assert sum(not v for v in checks.values()) == 1, (name, checks)
    assert not REL.verdict(_break(("faults_injected", "verify"), 0), 0.05)[
        "every fault point fired and the server survived"]


def test_a_probe_that_a_fault_made_smaller_is_no_leak():
    """After the load, the idle probe can hold less state than at baseline (an injected fault
    turned it plain, which takes it out of the suffix index): that passes; more than baseline
    never does."""
    r = _break(("after", "num_active_requests"), 0)
    r["after"]["index_request_bytes"] = 0
    assert all(REL.verdict(r, 0.05).values())
    assert not REL.verdict(_break(("after", "router_records"), 2), 0.05)["per-request state back to baseline"]


def test_group_rss_sees_this_process_group():
    assert REL.group_rss_mb(os.getpgid(0)) > 10


def test_boundary_requests_reach_the_context_exactly():
    """The suite's boundary requests (issue 34): each prompt ends its margin before the context
    and max_new_tokens reaches it exactly; all are prefixes of one text (one shared prefill)."""
    class WordTokenizer:
        def encode(self, text, add_special_tokens=False):
            return [len(w) for w in text.split()]

    reqs = REL.boundary_requests(WordTokenizer(), 256)
    assert [r["max_new_tokens"] for r in reqs] == list(REL.BOUNDARY_MARGINS)
    longest = max((r["input_ids"] for r in reqs), key=len)
    for r in reqs:
        assert r["kind"] == "boundary" and len(r["input_ids"]) + r["max_new_tokens"] == 256
        assert r["input_ids"] == longest[: len(r["input_ids"])]
    md = REL.markdown({**_report(), "checks": REL.verdict(_report(), 0.05), "context_length": 256,
                       "by_kind": {"boundary": {"completed": 3}}})
    assert '"boundary": {"completed": 3}' in md and "256-token context" in md
