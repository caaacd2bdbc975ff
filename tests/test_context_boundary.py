"""Requests that run up to the model's context length, on a LONGSPEC server against plain decoding.

Every decode step of a speculative server reserves KV slots past each request's committed length
(SGLang's eagle_prepare_for_decode: committed + 2 x the verify window), and those slots are written
into the request's req_to_token row. Near the end of the context that reservation used to run past
the row (context length + 4 + window) and took the scheduler down with every request in flight
(issue 34). These tests put requests right at that boundary:

- prompts ending 1, 2, 15, 16 and 17 tokens before the context length (and 41, the shape of the
  report: 8,151 + 40 = 8,191 at 8,192) with max_new_tokens that reach it exactly. SGLang itself
  refuses prompts within 6 tokens of the context (its max_req_input_len = context - 6) and caps
  max_new_tokens at context - 2 - prompt; LONGSPEC must answer exactly as plain decoding does, the
  refusals included;
- repetitive text, so that suffix drafts are long and accepted right up to the boundary (asserted
  from the per-request and worker counters);
- alone, and as a batch beside short requests; retracted and resumed near the boundary
  (SGLANG_TEST_RETRACT); and once at the model's real 8,192-token context, the report itself.

Greedy output must be token for token plain decoding's, every request answered, the server alive
and nothing falling back. Most cases use --context-length 1024 (the model allows a shorter
context; prompts stay short on this CPU): the row, the reservation and SGLang's caps all scale
with the context length, so the boundary is the same boundary.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

CONTEXT = 1024  # short context for most cases (see the module docstring)
MODEL_CONTEXT = 8192  # SmolLM2-135M-Instruct's own
WINDOW = 16  # the default verify window (--longspec-max-spec-tokens 15 + the root)
# Tokens before the context length at which each prompt ends (max_new_tokens = the same number).
MARGINS = (1, 2, 15, 16, 17, 41)
# SGLang refuses a prompt this close to the context (max_req_input_len = max_req_len - 5, with
# max_req_len = context - 1): such requests are answered with an error, by plain decoding too.
SGLANG_INPUT_MARGIN = 6
# ... and caps max_new_tokens at max_req_len - prompt - 1, so a request ends 2 tokens short.
SGLANG_OUTPUT_MARGIN = 2
REPEATED = "alpha beta gamma delta, "  # the report's text: drafts long and accepted
REPORT_REPEATS = 1630  # 8,151 tokens
REPORT_MAX_NEW = 40
SHORT_PROMPTS = [
    "<|im_start|>user\nList the days of the week.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nCount from 1 to 20, separated by commas.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\n",
]
SHORT_MAX_NEW = 24

PLAIN_ARGS = ("--random-seed", "0")
# The cost-aware router is off: on two busy cores it may rightly refuse drafts, and these tests
# must see drafts verified at the boundary (the router's refusals have their own tests).
LONGSPEC_ARGS = PLAIN_ARGS + ("--speculative-algorithm", "LONGSPEC",
                              "--speculative-num-draft-tokens", str(WINDOW),
                              "--longspec-cost-aware", "false")
SHORT_CONTEXT = ("--context-length", str(CONTEXT))



def _post(srv, payload: dict) -> dict:
    """/generate, any status: (status, body)."""
    r = requests.post(srv.base_url + "/generate", json=payload, timeout=900)
    try:
        body = r.json()
    except ValueError:
        body = {"text": r.text}
    return {"status": r.status_code, "body": body}


def _answer(res: dict) -> tuple:
    """What must equal plain decoding's: the status, and for a 200 the tokens and finish type."""
    if res["status"] != 200:
        return (res["status"],)
    mi = res["body"]["meta_info"]
    return (200, tuple(res["body"]["output_ids"]), (mi.get("finish_reason") or {}).get("type"))


@pytest.fixture(scope="module")
def tokenizer(server_pool):
    from transformers import AutoTokenizer

    from sgl_longspec.tools.models import resolve_model_path

    return AutoTokenizer.from_pretrained(str(resolve_model_path(None)))


@pytest.fixture(scope="module")
def repeated_ids(tokenizer) -> list[int]:
    """The report's text, long enough for every prompt of either context (prefixes of one
    tokenization: the radix cache shares them)."""
    ids = tokenizer.encode(REPEATED * (REPORT_REPEATS + 20), add_special_tokens=False)
    assert len(ids) > MODEL_CONTEXT
    return ids


def boundary_requests(ids: list[int], context: int) -> dict:
    """Prompt ending `m` tokens before the context, max_new_tokens m: together exactly the context."""
    return {m: {"input_ids": ids[: context - m],
                "sampling_params": {"temperature": 0, "max_new_tokens": m}}
            for m in MARGINS}


def short_requests() -> list[dict]:
    return [{"text": p, "sampling_params": {"temperature": 0, "max_new_tokens": SHORT_MAX_NEW}}
            for p in SHORT_PROMPTS]


def read_stats(path: Path) -> dict:
    return json.loads(path.read_text())


def check_reached_the_boundary(results: dict, context: int) -> None:
    """The cases that decode at all end where SGLang's cap puts them: the test really ran there."""
    for m, res in results.items():
        if m <= SGLANG_INPUT_MARGIN:
            assert res["status"] != 200, (m, res)  # SGLang's own refusal (plain alike)
            continue
        mi = res["body"]["meta_info"]
        assert mi["prompt_tokens"] + mi["completion_tokens"] == context - SGLANG_OUTPUT_MARGIN, (m, mi)


def check_speculated(results: dict, min_margin: int = 15) -> None:
    """Drafts were verified and accepted at the boundary, per request (its meta_info counters)."""
    for m, res in results.items():
        if m < min_margin:
            continue
        mi = res["body"]["meta_info"]
        ls = mi["longspec"][0] if isinstance(mi.get("longspec"), list) else mi["longspec"]
        accepted = sum(ls["accepted"].values())
        assert ls["verify_steps"] > 0 and accepted > 0, (m, ls)
        assert mi["spec_verify_ct"] < mi["completion_tokens"], (m, mi)


def check_clean(srv, stats_file: Path) -> dict:
    """The server still answers, and nothing fell back."""
    assert srv.alive(), srv.log_tail(60)
    probe = _post(srv, {"text": SHORT_PROMPTS[0], "sampling_params": {"temperature": 0, "max_new_tokens": 4}})
    assert probe["status"] == 200, probe
    stats = read_stats(stats_file)
    assert stats["accepted"] > 0 and not stats["fallbacks"], stats
    return stats


# ------------------------------------------------------------------------- without a server

def test_drafts_never_pass_the_kv_room():
    """The controller drafts within RequestView.room (what the request's reserved KV window, its
    req_to_token row and the context leave): fewer tokens near the end, none at 0, counted."""
    from sgl_longspec.config import LongSpecConfig
    from sgl_longspec.step.controller import LongSpecController, RequestView

    ctl = LongSpecController(LongSpecConfig(drafter_path="none", cost_aware=False), window=WINDOW)
    unit = [11, 12, 13, 14, 15, 16, 17]
    prompt, output = unit * 12, unit[:3]

    def draft(room):
        view = RequestView("r", prompt, output, remaining=64, room=room)
        return ctl.plan_step([view]).drafts[0]

    assert len(draft(0)) == 0 and ctl.counters.room_capped == 1
    capped = draft(3)
    assert 0 < len(capped) <= 3 and ctl.counters.room_capped == 2
    full = draft(None)
    assert len(full) == WINDOW - 1 and ctl.counters.room_capped == 2  # a long repetition drafts in full
    assert len(draft(WINDOW + 5)) == WINDOW - 1 and ctl.counters.room_capped == 2  # room to spare


def test_cpu_slot_ops_refuse_ranges_past_the_row():
    """The CPU twins of SGLang's slot ops refuse a range past a req_to_token row before writing
    anything (the Triton kernels would spill into the next request's row), and take one that
    ends exactly at the row's end."""
    from sgl_longspec.cpu.ops import assign_extend_cache_locs_cpu, assign_req_to_token_pool_cpu

    width = 10
    table = torch_zeros(3, width)
    rows = torch_tensor([1, 2])
    with pytest.raises(IndexError, match="does not fit a req_to_token row of 10"):
        assign_req_to_token_pool_cpu(rows, table, torch_tensor([2, 5]), torch_tensor([6, 12]),
                                     torch_tensor(list(range(100, 111))), width)
    assert int(table.abs().sum()) == 0, "nothing may be written"
    with pytest.raises(IndexError):
        assign_extend_cache_locs_cpu(rows, table, torch_tensor([2, 5]), torch_tensor([6, 11]),
                                     torch_zeros(9), width)
    assign_req_to_token_pool_cpu(rows, table, torch_tensor([2, 5]), torch_tensor([6, 10]),
                                 torch_tensor(list(range(100, 109))), width)
    assert table[1, 2:6].tolist() == [100, 101, 102, 103] and table[2, 5:].tolist() == [104, 105, 106, 107, 108]
    out = torch_zeros(9)
    assign_extend_cache_locs_cpu(rows, table, torch_tensor([2, 5]), torch_tensor([6, 10]), out, width)
    assert out.tolist() == list(range(100, 109))


def test_gpu_verify_plan_refuses_slots_past_the_row():
    """The GPU hybrid plan reads each request's tree slots from its row: a range past the row
    is refused (a short slice would shift every later request's tree KV), an exact fit taken."""
    import torch

    from sgl_longspec.attention.flashinfer_hybrid import hybrid_verify_plan_args
    from sgl_longspec.verify.layout import VerifyLayout

    table = torch.arange(2 * 12, dtype=torch.int32).view(2, 12)
    masks = [torch.ones(3, 3, dtype=torch.bool).tril()]
    args = hybrid_verify_plan_args(VerifyLayout(masks, [9]), [1], table)
    assert args["tree_kv_indices"].tolist() == [21, 22, 23]
    with pytest.raises(IndexError, match="row of 12"):
        hybrid_verify_plan_args(VerifyLayout(masks, [10]), [1], table)


def test_longspec_rows_hold_the_decode_reservation(monkeypatch):
    """The hook on SGLang's row sizing widens the rows to the decode-step reservation on a
    LONGSPEC server only, and its target exists in this SGLang."""
    import pkgutil

    from sgl_longspec import cpu

    from sgl_longspec.adapter import algorithm as sglang_algo

    from sgl_longspec.adapter import sglang_compat

    cpu.prepare_environment()
    assert callable(pkgutil.resolve_name(sglang_compat.REQ_TO_TOKEN_EXTRA))
    sglang_default = 4 + WINDOW  # SGLang 0.5.23 at page size 1
    monkeypatch.setattr(sglang_algo, "req_to_token_headroom", lambda: 2 * WINDOW)
    for longspec, expected in ((False, sglang_default), (True, 2 * WINDOW)):
        monkeypatch.setattr(sglang_algo, "serving_longspec", lambda: longspec)
        assert sglang_algo._widen_req_to_token_rows(lambda: sglang_default) == expected


def torch_tensor(values):
    import torch

    return torch.tensor(values, dtype=torch.int64)


def torch_zeros(*shape):
    import torch

    return torch.zeros(*shape, dtype=torch.int64)


# ------------------------------------------------------------------------- context 1024

@pytest.fixture(scope="module")
def plain_short(server_pool, repeated_ids):
    """Plain decoding's answers at the short context, computed first (one server at a time)."""
    srv = server_pool.get(PLAIN_ARGS + SHORT_CONTEXT)
    boundary = {m: _post(srv, r) for m, r in boundary_requests(repeated_ids, CONTEXT).items()}
    short = [_post(srv, r) for r in short_requests()]
    check_reached_the_boundary(boundary, CONTEXT)
    return {"boundary": boundary, "short": short}


@pytest.fixture(scope="module")
def stats_short(tmp_path_factory):
    return tmp_path_factory.mktemp("boundary") / "stats.json"


@pytest.fixture(scope="module")
def longspec_short(server_pool, plain_short, stats_short):
    return server_pool.get(LONGSPEC_ARGS + SHORT_CONTEXT, env={"LONGSPEC_STATS_FILE": str(stats_short)})


@pytest.mark.server
def test_single_requests_at_the_boundary(longspec_short, plain_short, stats_short, repeated_ids):
    """One request at a time, each ending m tokens before the context: plain decoding's answer."""
    results = {}
    for m, req in boundary_requests(repeated_ids, CONTEXT).items():
        results[m] = _post(longspec_short, req)
        assert longspec_short.alive(), f"server died on the request ending {m} before the context"
        assert _answer(results[m]) == _answer(plain_short["boundary"][m]), m
    check_reached_the_boundary(results, CONTEXT)
    check_speculated(results)
    check_clean(longspec_short, stats_short)


@pytest.mark.server
def test_boundary_batch_beside_short_requests(longspec_short, plain_short, stats_short, repeated_ids):
    """The boundary requests all at once, in one batch with short ones: every request answered,
    each with its plain answer, and batched verify steps (drafts of several requests in one
    forward) really ran."""
    reqs = list(boundary_requests(repeated_ids, CONTEXT).items())
    shorts = short_requests()
    with ThreadPoolExecutor(len(reqs) + len(shorts)) as ex:
        boundary = dict(zip([m for m, _ in reqs], ex.map(lambda r: _post(longspec_short, r[1]), reqs)))
        short = list(ex.map(lambda r: _post(longspec_short, r), shorts))
    for m, res in boundary.items():
        assert _answer(res) == _answer(plain_short["boundary"][m]), m
    for i, res in enumerate(short):
        assert res["status"] == 200 and _answer(res) == _answer(plain_short["short"][i]), i
    check_reached_the_boundary(boundary, CONTEXT)
    check_speculated(boundary)
    stats = check_clean(longspec_short, stats_short)
    assert stats["batched_verify_steps"] > 0, stats


@pytest.mark.server
def test_retracted_and_resumed_at_the_boundary(server_pool, plain_short, repeated_ids, tmp_path):
    """SGLang's retraction test mode (every 3rd step retracts running requests, which re-enter
    through prefill with their output so far) while every request decodes within 41 tokens of
    the context: each finishes with plain decoding's answer, retraction really happened, drafts
    were accepted, nothing fell back, and the worker tracks nothing afterwards but the probe."""
    stats_file = tmp_path / "retract_stats.json"
    srv = server_pool.get(LONGSPEC_ARGS + SHORT_CONTEXT, env={
        "SGLANG_TEST_RETRACT": "1", "SGLANG_TEST_RETRACT_INTERVAL": "3",
        "LONGSPEC_STATS_FILE": str(stats_file)})
    reqs = [(m, r) for m, r in boundary_requests(repeated_ids, CONTEXT).items()
            if m > SGLANG_INPUT_MARGIN]
    with ThreadPoolExecutor(len(reqs)) as ex:
        results = dict(zip([m for m, _ in reqs], ex.map(lambda r: _post(srv, r[1]), reqs)))
    for m, res in results.items():
        assert _answer(res) == _answer(plain_short["boundary"][m]), f"margin {m} differs after retraction"
    check_reached_the_boundary(results, CONTEXT)
    retracted = [int(n) for n in re.findall(r"Testing retraction\. #retracted_reqs: (\d+)", srv.log_tail(100000))]
    assert any(retracted), f"no request was retracted: {retracted}"
    stats = check_clean(srv, stats_file)
    assert stats["verify_steps"] > 0, stats
    assert stats["tracked_requests"] <= 1 and stats["num_active_requests"] <= 1, stats  # the probe only


# ------------------------------------------------------------------------- context 8192

@pytest.fixture(scope="module")
def report_request(tokenizer) -> dict:
    """The report itself: the text repeated 1,630 times (8,151 tokens) and 40 new tokens."""
    text = REPEATED * REPORT_REPEATS
    assert len(tokenizer.encode(text, add_special_tokens=False)) == 8151
    return {"text": text, "sampling_params": {"temperature": 0, "max_new_tokens": REPORT_MAX_NEW}}


@pytest.mark.server
def test_report_at_the_models_context(server_pool, report_request, repeated_ids, tmp_path):
    """Issue 34 as reported, at the model's own 8,192-token context, beside the 16-before case:
    plain decoding's answers, drafts accepted, the server alive."""
    cases = {"report": report_request,
             16: boundary_requests(repeated_ids, MODEL_CONTEXT)[16]}
    plain_srv = server_pool.get(PLAIN_ARGS)
    plain = {k: _post(plain_srv, r) for k, r in cases.items()}
    assert all(p["status"] == 200 for p in plain.values()), plain
    stats_file = tmp_path / "report_stats.json"
    srv = server_pool.get(LONGSPEC_ARGS, env={"LONGSPEC_STATS_FILE": str(stats_file)})
    spec = {}
    for k, r in cases.items():
        spec[k] = _post(srv, r)
        assert srv.alive(), f"server died on case {k}"
        assert _answer(spec[k]) == _answer(plain[k]), k
    mi = spec["report"]["body"]["meta_info"]
    assert mi["prompt_tokens"] == 8151 and mi["completion_tokens"] == MODEL_CONTEXT - 8151 - SGLANG_OUTPUT_MARGIN, mi
    check_reached_the_boundary({16: spec[16]}, MODEL_CONTEXT)
    check_speculated({41: spec["report"], 16: spec[16]})
    check_clean(srv, stats_file)
