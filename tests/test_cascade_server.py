"""Cascade attention at the server: a fleet of requests over one radix-cached context decodes and
verifies with the shared level (the CPU backend's counters say so) and gives, token for token, what
each request gives alone (a batch of one forms no group)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from test_longspec import CODE_SNIPPET, LONGSPEC_ARGS, chat

pytestmark = pytest.mark.server

# ~700 tokens of shared context, past the 256-slot threshold this server is given (the default,
# 3072, would need a longer context than this test can afford on two cores).
CONTEXT = "Here is our repository's utility module:\n" + "\n".join(
    CODE_SNIPPET.replace("merge_sorted", f"merge_sorted_{i}") for i in range(4))
QUESTIONS = ["Repeat merge_sorted_1 exactly.", "Repeat merge_sorted_2 exactly.",
             "Repeat merge_sorted_3 exactly.", "What does merge_sorted_0 return? One sentence."]
MAX_NEW = 48


def test_fleet_over_a_shared_context_uses_the_shared_level_and_matches_single_requests(server_pool, tmp_path):
    stats_file = tmp_path / "cascade_stats.json"
    srv = server_pool.get(LONGSPEC_ARGS + ("--longspec-cost-aware", "false", "--max-running-requests", "4"),
                          env={"LONGSPEC_STATS_FILE": str(stats_file), "LONGSPEC_CASCADE_MIN_SHARED": "256"})
    prompts = [chat(f"{CONTEXT}\n\n{q}") for q in QUESTIONS]

    def one(p):
        return srv.generate(text=p, sampling_params={"temperature": 0, "max_new_tokens": MAX_NEW})

    alone = [one(p) for p in prompts]  # also leaves the context in the radix cache
    assert all(a["meta_info"]["cached_tokens"] > 256 for a in alone[1:]), [a["meta_info"] for a in alone]
    before = json.loads(stats_file.read_text())
    with ThreadPoolExecutor(len(prompts)) as ex:
        fleet = list(ex.map(one, prompts))
    stats = json.loads(stats_file.read_text())
    for i, (a, f) in enumerate(zip(alone, fleet)):
        assert f["output_ids"] == a["output_ids"], f"request {i} differs in the fleet"
    grew = {k: stats[k] - before[k] for k in stats if k.startswith(("cascade_", "verify_attention_"))}
    # the shared level ran on verify steps (drafts verified against one copy of the context) and
    # on plain decode steps or prefill, with groups of several requests sharing > 256 slots
    assert grew["cascade_verify_groups"] > 0, grew
    assert grew["cascade_verify_group_requests"] >= 2 * grew["cascade_verify_groups"], grew
    assert grew["cascade_verify_shared_tokens"] > 256 * grew["cascade_verify_groups"], grew
    assert stats["accepted"] - before["accepted"] > 0, stats  # the fleet's drafts were accepted
    assert not stats["fallbacks"], stats["fallbacks"]
    # the singles formed no group: everything counted came from the fleet
    assert before["cascade_verify_groups"] == 0 and before["cascade_decode_groups"] == 0, before
    # the singles (~700 keys, no group) were verified in one attention call per request, the
    # fleet's grouped requests by the split path with the shared level: both give the same tokens
    assert before["verify_attention_single_pass"] > 0, before
    assert grew["verify_attention_split"] > 0, grew
