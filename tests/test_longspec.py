"""LONGSPEC end to end on the real SGLang server: lossless greedy and sampling, request lifecycle.

Greedy identity is checked token for token against the same server build without speculation, in
float32 (the CPU default). Sampling is checked statistically (two-sample chi-square on the joint
distribution of the first generated tokens, fixed seeds). The worker's state is read from the JSON
snapshot it writes when LONGSPEC_STATS_FILE is set.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from sgl_longspec.config import LongSpecConfig
from sgl_longspec.drafters.draft import Draft
from sgl_longspec.step.router import Router, RouterConfig

LONGSPEC_ARGS = ("--speculative-algorithm", "LONGSPEC", "--speculative-num-draft-tokens", "16",
                 "--random-seed", "0")
# For tests that count what speculation did: the cost-aware router decides from measured step
# times, and on a loaded machine it may rightly refuse every draft (its refusals have their own
# tests). The shared `longspec` server has it off too; identity under the default router has a
# server of its own (test_default_router_greedy_identical_to_plain).
FIXED_ROUTER = ("--longspec-cost-aware", "false")
PLAIN_ARGS = ("--random-seed", "0")
MAX_NEW = 40

CODE_SNIPPET = '''def merge_sorted(a, b):
    """Merge two sorted lists into one sorted list."""
    out = []
    i = j = 0
    while i < len(a) and j < len(b):
        if a[i] <= b[j]:
            out.append(a[i])
            i += 1
        else:
            out.append(b[j])
            j += 1
    out.extend(a[i:])
    out.extend(b[j:])
    return out
'''

JSON_SNIPPET = ('{"name": "search_files", "arguments": {"pattern": "*.py", "path": "src/", '
                '"recursive": true}}\n{"name": "read_file", "arguments": {"path": "src/main.py"}}')


def chat(user: str) -> str:
    return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


PROMPTS = [
    chat(f"Repeat this code exactly, without any change:\n{CODE_SNIPPET}"),
    chat(f"Copy the following JSON lines verbatim:\n{JSON_SNIPPET}"),
    chat(f"Rename the function merge_sorted to merge_lists in this code and return it:\n{CODE_SNIPPET}"),
    chat("Count from 1 to 30, separated by commas."),
    chat("List the days of the week, then list them again in the same order."),
    chat("What is the capital of France? Answer in one sentence."),
    chat("Write a haiku about autumn leaves."),
    chat("Explain what a hash table is in two sentences."),
    chat("Give three tips for writing clean Python code."),
    chat("Translate 'good morning, how are you?' into Spanish and French."),
    "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog. The quick",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\n"
    "def fibonacci_memo(n, memo={}):\n",
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,",
    "Once upon a time, in a small village by the sea,",
    "import os\nimport sys\nimport json\n\n",
    "<html>\n<head>\n<title>Home</title>\n</head>\n<body>\n<h1>Home</h1>\n</body>\n</html>\n<html>\n<head>\n",
    "Q: What is 2 + 2?\nA: 4\nQ: What is 3 + 3?\nA: 6\nQ: What is 4 + 4?\nA:",
    chat("Write a Python function that reverses a string."),
    chat("Summarise the plot of Romeo and Juliet in three sentences."),
    chat(f"Here is a file:\n{CODE_SNIPPET}\nReturn the same file with a docstring added to nothing else."),
]


def greedy(srv, prompts, max_new=MAX_NEW):
    """One request at a time (batch composition can change float rounding; see the concurrency test)."""
    return [srv.generate(text=p, sampling_params={"temperature": 0, "max_new_tokens": max_new})
            for p in prompts]


MULTI_TURN = [f"Here is a function:\n{CODE_SNIPPET}\nRepeat it exactly.",
              "Now repeat it once more, unchanged.",
              "Rename the variable out to result and return the function."]


def run_multi_turn(srv):
    history, outs, cached = "", [], []
    for t in MULTI_TURN:
        history += chat(t)
        o = srv.generate(text=history, sampling_params={"temperature": 0, "max_new_tokens": 96})
        outs.append(o["output_ids"])
        cached.append(o["meta_info"].get("cached_tokens", 0))
        history += o["text"] + "<|im_end|>\n"
    return outs, cached


# A pattern the model continues with high probability at temperature 1 (so drafts are accepted)
# but not always (so the law has a tail a biased sampler would change).
SAMPLING_PROMPT = "The quick brown fox jumps over the lazy dog. " * 6 + "The quick"
SAMPLING_N = 240
SAMPLING_LEN = 8  # long enough that chains of several draft tokens are verified
SAMPLING_PARAMS = {"temperature": 1.0, "max_new_tokens": SAMPLING_LEN, "top_p": 0.95}


def sample_outputs(srv, params=SAMPLING_PARAMS) -> list[tuple]:
    outs = []
    for _ in range(0, SAMPLING_N, 16):
        res = srv.generate(text=[SAMPLING_PROMPT] * 16, sampling_params=params)
        outs += [tuple(o["output_ids"]) for o in res]
    return outs


def two_sample_p(xa: list, xb: list) -> float:
    """Two-sample chi-square p-value of the laws of two samples of outcomes (rare outcomes
    pooled so expected counts stay >= 5)."""
    from scipy.stats import chi2_contingency

    ca, cb = Counter(xa), Counter(xb)
    rows, other = [], [0, 0]
    for k in sorted(set(ca) | set(cb), key=lambda k: -(ca[k] + cb[k])):
        if ca[k] + cb[k] >= 10:
            rows.append([ca[k], cb[k]])
        else:
            other[0] += ca[k]
            other[1] += cb[k]
    if sum(other):
        rows.append(other)
    return 1.0 if len(rows) < 2 else float(chi2_contingency(rows)[1])


def sampling_p_values(a: list[tuple], b: list[tuple]) -> list[float]:
    """Two-sample chi-square p-values: the joint law of the first 3 tokens, then the marginal
    law of each later position."""
    p_value = two_sample_p
    ps = [p_value([o[:3] for o in a], [o[:3] for o in b])]
    for pos in range(3, SAMPLING_LEN):
        ps.append(p_value([o[pos] if len(o) > pos else -1 for o in a],
                          [o[pos] if len(o) > pos else -1 for o in b]))
    return ps


LOGPROB_PROMPTS = [PROMPTS[0], PROMPTS[12], PROMPTS[5]]  # copy, counting, chat
LOGPROB_TOKEN_IDS = [11, 28, 216]


def with_logprobs(srv):
    """Greedy outputs with logprobs, top-2 logprobs and chosen-token-id logprobs, one at a time."""
    return [srv.generate(text=p, return_logprob=True, top_logprobs_num=2,
                         token_ids_logprob=LOGPROB_TOKEN_IDS,
                         sampling_params={"temperature": 0, "max_new_tokens": 24})
            for p in LOGPROB_PROMPTS]


TOOL_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "enum": ["search_files", "read_file", "write_file"]},
        "arguments": {"type": "object",
                      "properties": {"path": {"type": "string"}, "pattern": {"type": "string"},
                                     "recursive": {"type": "boolean"}},
                      "required": ["path"]},
    },
    "required": ["name", "arguments"],
}
FILES = "src/main.py, src/utils.py, src/io_tools.py, src/main.py, src/utils.py, src/io_tools.py"
# (name, prompt, sampling params): grammars of every kind SGLang accepts, penalties, logit bias.
# The prompts repeat what the answer needs, so the suffix index drafts under every rule.
RULE_CASES = [
    ("json_schema", chat(f"Copy the first of these JSON lines verbatim:\n{JSON_SNIPPET}"),
     {"json_schema": json.dumps(TOOL_SCHEMA)}),
    ("regex", chat(f"Repeat this list of files exactly: {FILES}"),
     {"regex": r"src/[a-z_]+\.py(, src/[a-z_]+\.py){2,9}"}),
    ("ebnf", chat("Count from 1 to 30, separated by commas."),
     {"ebnf": 'root ::= num (", " num)*\nnum ::= [0-9]+'}),
    ("penalties", PROMPTS[0],
     {"frequency_penalty": 0.4, "presence_penalty": 0.3, "repetition_penalty": 1.1}),
    ("min_new_tokens", chat("Say OK."), {"min_new_tokens": 20}),
    ("logit_bias", PROMPTS[12], {"logit_bias": {"11": -100.0}}),  # 11 = ","
]


def with_rules(srv, cases=RULE_CASES):
    return {name: srv.generate(text=prompt, sampling_params={"temperature": 0,
                                                             "max_new_tokens": MAX_NEW, **params})
            for name, prompt, params in cases}


def tool_call(srv, tool_choice):
    """An OpenAI chat completion that must call a tool (tool_choice "required" or named)."""
    tools = [{"type": "function", "function": {"name": n, "description": d, "parameters": {
        "type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}}
        for n, d in (("read_file", "Read a file"), ("list_dir", "List a directory"))]
    r = srv.openai_client().chat.completions.create(
        model="default", temperature=0, max_tokens=48, tools=tools, tool_choice=tool_choice,
        messages=[{"role": "user", "content": "Read the file src/main.py, then read "
                                              "src/main.py again: call read_file for src/main.py."}])
    msg = r.choices[0].message
    calls = [(c.function.name, c.function.arguments) for c in msg.tool_calls or []]
    return msg.content, calls


TOOL_CHOICES = ["required", {"type": "function", "function": {"name": "read_file"}}]


def assert_same_logprobs(plain: dict, spec: dict, tol: float = 1e-3) -> None:
    """Same tokens; per position, the same (logprob, token id) entries within tol."""
    assert plain["output_ids"] == spec["output_ids"]
    a, b = plain["meta_info"], spec["meta_info"]
    n = len(plain["output_ids"])
    per_position = {
        "output_token_logprobs": lambda m, i: [m["output_token_logprobs"][i]],
        "output_top_logprobs": lambda m, i: m["output_top_logprobs"][i],
        "output_token_ids_logprobs": lambda m, i: m["output_token_ids_logprobs"][i],
    }
    for key, entries in per_position.items():
        assert len(a[key]) == len(b[key]) == n, key
        for i in range(n):
            for ex, ey in zip(entries(a, i), entries(b, i), strict=True):
                assert ex[1] == ey[1] and isinstance(ey[0], float), (key, i, ex, ey)
                assert abs(ex[0] - ey[0]) <= tol, (key, i, ex, ey)


# ---------------------------------------------------------------------------- unit: router, config

def test_router_budget_and_min_score():
    r = Router(RouterConfig(min_score=1.0, batch_draft_budget=10, max_draft_tokens=8))
    good = Draft.chain(list(range(8)), probs=[0.9] * 8)  # score 7.2
    weak = Draft.chain([1, 2], probs=[0.3, 0.1])  # score 0.4 < min_score
    mid = Draft.chain(list(range(6)), probs=[0.8] * 6)  # score 4.8
    out = r.plan_batch(["a", "b", "c"], [weak, mid, good])
    assert len(out[0]) == 0  # not worth a verify
    assert len(out[2]) == 8  # best score served first
    assert len(out[1]) == 2  # what is left of the budget of 10
    assert sum(len(d) for d in out) <= 10


def test_draft_pruned_keeps_a_valid_tree():
    d = Draft([5, 6, 7, 8, 9], [-1, 0, -1, 1, 2], [0.9, 0.5, 0.3, 0.4, 0.2])
    p = d.pruned(0.35)
    # node 3 (0.4) survives with its ancestors 0 and 1; node 2 (0.3) and its child 4 do not
    assert p.token_ids.tolist() == [5, 6, 8] and p.parents.tolist() == [-1, 0, 1]
    assert abs(p.score - 1.8) < 1e-6
    q = Draft([1, 2], [-1, 0], [0.2, 0.9]).pruned(0.5)  # child above threshold, parent below
    assert len(q) == 0


def test_cost_model_recovers_step_costs():
    """Fed exact timings from a = 30 ms, b = 2 ms/token, c = 5 ms, the fit converges to them."""
    from sgl_longspec.step.cost_model import StepCostModel

    m = StepCostModel()
    rng = __import__("random").Random(0)
    for _ in range(300):
        bs = rng.randint(1, 8)
        if rng.random() < 0.5:
            m.observe(bs, bs, 30 + 2 * bs, verify=False)
        else:
            n = bs + rng.randint(1, 30)
            m.observe(bs, n, 30 + 2 * n + 5, verify=True)
    a, r, b, c = m.params
    assert abs(a - 30) < 1.0 and r < 0.1 and abs(b - 2) < 0.1 and abs(c - 5) < 1.0, (a, r, b, c)
    # a draft token pays off only above b * bs / (a + b * bs)
    assert abs(m.token_threshold(1) - 2 / 32) < 0.01
    assert m.speedup(1, expected_tokens=0.2, draft_tokens=8) < 1.0 < m.speedup(1, 4.0, 8)


def test_router_stops_speculating_when_it_does_not_pay():
    """Expensive verify tokens + a request whose drafts are over-confident: after a few failed
    verifies, its drafts are pruned to nothing, while a well-calibrated request keeps speculating."""
    r = Router(RouterConfig(min_score=0.0, backoff_steps=0))
    for _ in range(20):  # a = 20 ms, b = 4 ms per token: a draft token needs p >= 4/24
        r.observe_step(1, 1, 24.0, verify=False)
        r.observe_step(1, 9, 20 + 4 * 9 + 2, verify=True)
    overconfident = Draft.chain([1, 2, 3, 4], probs=[0.9, 0.8, 0.7, 0.6], source="suffix")
    for _ in range(10):
        r.observe("chat", drafted=4, accepted=0, expected=3.0)
        r.observe("copy", drafted=4, accepted=4, expected=3.0)
    out = r.plan_batch(["chat", "copy"], [overconfident, overconfident])
    assert len(out[0]) == 0 and len(out[1]) == 4
    # A new request is given a chance even in a full batch with a wide verify window ...
    assert r.wants_source("new", "suffix", 8, 15)
    # ... drafting itself stops for the over-confident request (nothing it drafts could pay) ...
    assert not r.wants_source("chat", "suffix", 2, 4) and r.wants_source("copy", "suffix", 2, 4)
    # ... a costly model drafter needs a better record than the cheap suffix index ...
    r.observe_draft_cost("owl", 200.0)  # ms per call, ~8 plain steps' worth
    r.observe("copy", drafted=4, accepted=4, expected=3.0, source="owl")
    assert not r.wants_source("copy", "owl", 2, 4)
    # ... and plain steps let the evidence fade, so drafting is tried again later.
    for _ in range(100):
        r.plan_batch(["chat"], [Draft.empty()])
    assert r.wants_source("chat", "suffix", 2, 4)
    # The server-wide record is the prior of new requests: after chat-like failures only, a new
    # request starts skeptical, and that record fades during plain steps too.
    r2 = Router(RouterConfig(min_score=0.0, backoff_steps=0))
    for _ in range(20):
        r2.observe_step(1, 1, 24.0, verify=False)
        r2.observe_step(1, 9, 20 + 4 * 9 + 2, verify=True)
    for i in range(30):
        r2.observe(f"chat{i}", drafted=6, accepted=0, expected=3.0)
    assert not r2.wants_source("fresh", "suffix", 8, 15)
    for _ in range(3000):
        r2.plan_batch(["other"], [Draft.empty()])
    assert r2.wants_source("fresh", "suffix", 8, 15)
    # The same drafts with cost-awareness off: both verified.
    r.config.cost_aware = False
    out = r.plan_batch(["chat", "copy"], [overconfident, overconfident])
    assert len(out[0]) == 4 and len(out[1]) == 4


def test_ragged_verify_args_equal_hybrid_attention():
    """The FlashInfer custom-mask arguments of a ragged LONGSPEC verify batch (the GPU dense-mask
    path) give the same attention as the hybrid prefix + tree decomposition."""
    import torch

    from flashinfer_ext.reference import attention_with_lse, hybrid_tree_attention
    from sgl_longspec.verify.layout import VerifyLayout

    g = torch.Generator().manual_seed(0)
    drafts = [Draft.empty(), Draft.chain([1, 2, 3]), Draft([4, 5, 6, 7], [-1, -1, 0, 1])]
    masks = [torch.from_numpy(d.tree_mask(include_root=True)) for d in drafts]
    prefix = torch.tensor([5, 0, 9])
    layout = VerifyLayout.build(drafts, prefix.tolist(), [0, 0, 0])
    kv_idx, kv_indptr, qo_indptr, packed = layout.dense_verify_args(prefix, "cpu")
    assert qo_indptr.tolist() == [0, 1, 5, 10]
    assert kv_indptr.tolist() == [0, 6, 10, 24] and kv_idx.numel() == 24
    hq, hkv, d = 4, 2, 16
    off = 0
    for i, m in enumerate(masks):
        q_len, p = m.shape[0], int(prefix[i])
        mask = packed[off: off + q_len * (p + q_len)].view(q_len, p + q_len)
        off += q_len * (p + q_len)
        q = torch.randn(q_len, hq, d, generator=g)
        k = torch.randn(p + q_len, hkv, d, generator=g)
        v = torch.randn(p + q_len, hkv, d, generator=g)
        dense, _ = attention_with_lse(q, k, v, mask=mask)
        hybrid = hybrid_tree_attention(q, k[:p], v[:p], k[p:], v[p:], m)
        torch.testing.assert_close(dense, hybrid, rtol=1e-5, atol=1e-5)
    assert off == packed.numel()


def test_gpu_hybrid_plan_args_match_reference():
    """The plan metadata the GPU backend builds from SGLang's req_to_token table, run through
    HybridTreeVerifyWrapper (torch path here; Triton/FlashInfer on GPU), equals per-request hybrid
    attention."""
    import torch

    from flashinfer_ext.reference import hybrid_tree_attention
    from flashinfer_ext.wrapper import HybridTreeVerifyWrapper
    from sgl_longspec.attention.flashinfer_hybrid import hybrid_verify_plan_args
    from sgl_longspec.verify.layout import VerifyLayout

    g = torch.Generator().manual_seed(1)
    drafts = [Draft.chain([1, 2]), Draft.empty(), Draft([4, 5, 6], [-1, -1, 1])]
    masks = [torch.from_numpy(d.tree_mask(include_root=True)) for d in drafts]
    seq_lens, rows = [7, 3, 12], [2, 0, 1]
    slots = torch.randperm(64, generator=g).to(torch.int32)
    req_to_token = slots[:3 * 20].view(3, 20)
    args = hybrid_verify_plan_args(VerifyLayout(masks, seq_lens), rows, req_to_token)
    hq, hkv, d = 4, 2, 8
    k_cache = torch.randn(64, hkv, d, generator=g)
    v_cache = torch.randn(64, hkv, d, generator=g)
    q = torch.randn(int(args["qo_indptr"][-1]), hq, d, generator=g)
    w = HybridTreeVerifyWrapper()
    w.plan(**args, num_qo_heads=hq, num_kv_heads=hkv, head_dim=d, q_data_type=torch.float32)
    out = w.run(q, (k_cache, v_cache))
    start = 0
    for m, s, r in zip(masks, seq_lens, rows):
        n = m.shape[0]
        pre, tree = req_to_token[r, :s].long(), req_to_token[r, s:s + n].long()
        ref = hybrid_tree_attention(q[start:start + n], k_cache[pre], v_cache[pre],
                                    k_cache[tree], v_cache[tree], m)
        torch.testing.assert_close(out[start:start + n], ref, rtol=1e-5, atol=1e-5)
        start += n


def test_router_backoff_after_rejections():
    r = Router(RouterConfig(backoff_steps=4))
    r.observe("a", drafted=5, accepted=0)
    assert not r.wants_draft("a", "suffix")
    r.plan_batch(["a"], [Draft.empty()])  # one plain step
    assert r.wants_draft("a", "suffix")
    r.observe("a", drafted=5, accepted=0)  # second failure: longer pause
    for _ in range(2):
        assert not r.wants_draft("a", "suffix")
        r.plan_batch(["a"], [Draft.empty()])
    assert r.wants_draft("a", "suffix")
    r.observe("a", drafted=5, accepted=3)
    assert r.wants_draft("a", "suffix") and r.stats("a").accepted == 3


def test_router_backs_off_drafting_that_is_never_verified():
    """Drafts the router refuses (they do not pay) make the drafter pause for that request, as a
    rejected draft does, so traffic that speculation cannot help stops paying drafter time."""
    r = Router(RouterConfig(min_score=1000.0, backoff_steps=8))
    calls = 0
    for step in range(64):
        if r.wants_source("chat", "owl", 1, 8):
            calls += 1
            out = r.plan_batch(["chat"], [Draft.chain([1, 2, 3], probs=[0.5] * 3, source="owl")])
            assert len(out[0]) == 0
        else:
            r.plan_batch(["chat"], [Draft.empty()])
    assert calls <= 64 // 8 + 4, calls  # doubling pauses up to the cap of 8 steps
    assert r.refusals["unprofitable"] == calls
    assert r.wants_source("chat", "suffix", 1, 8)  # per drafter


def test_router_stops_calling_a_drafter_whose_drafts_are_never_verified():
    """A costly drafter whose drafts the step cost model keeps refusing (a 16-request batch on a
    CPU, where a draft token needs p >= 0.44) is rarely called for that request, even with no
    backoff at all: its refused calls count as drafts with nothing accepted. A request whose
    drafts pass keeps being drafted, and the refused one is tried again once plain steps fade the
    evidence."""
    r = Router(RouterConfig(min_score=0.0, backoff_steps=0))
    for _ in range(20):  # a = 20 ms, b = 1 ms per token: at bs 16, p >= 16/36
        r.observe_step(16, 16, 36.0, verify=False)
        r.observe_step(16, 40, 20 + 40 + 2, verify=True)
    r.observe_draft_cost("owl", 25.0)  # one batched call: 1.6 ms per request of 16
    weak = Draft([1, 2, 3], [-1, -1, 0], probs=[0.4, 0.3, 0.2], source="owl")
    strong = Draft.chain([1, 2, 3], probs=[0.95, 0.9, 0.85], source="owl")
    ids = ["weak", "strong"] + [f"plain{i}" for i in range(14)]  # a batch of 16
    calls = []
    for step in range(40):
        drafts = [Draft.empty()] * 16
        for i, d in enumerate((weak, strong)):
            if r.wants_source(ids[i], "owl", 16, 8):
                drafts[i] = d
        calls.append([rid for rid, d in zip(ids, drafts) if len(d)])
        out = r.plan_batch(ids, drafts)
        assert len(out[0]) == 0 and len(out[1]) == 3
        r.observe("strong", 3, 3, expected=float(strong.probs.sum()), source="owl")
    # Without counting refused calls it is called every step; with it, retried now and then as
    # plain steps fade the evidence (here 3 of the last 20 steps).
    assert sum("weak" in ids for ids in calls[-20:]) <= 4, calls
    assert all("strong" in ids for ids in calls)
    assert r.refusals["unprofitable"] < 20
    for _ in range(200):
        r.plan_batch(ids, [Draft.empty()] * 16)
    assert r.wants_source("weak", "owl", 16, 8)


def test_router_backoff_is_per_drafter():
    """Rejected OWL drafts back off the OWL drafter only; the suffix index keeps drafting."""
    r = Router(RouterConfig(backoff_steps=4))
    r.observe("a", drafted=5, accepted=0, expected=2.0, source="owl")
    assert not r.wants_draft("a", "owl") and r.wants_draft("a", "suffix") and r.wants_draft("a")
    r.plan_batch(["a"], [Draft.chain([1, 2], source="suffix")])  # a decode step passes
    assert r.wants_draft("a", "owl")


def test_router_backs_off_only_drafters_whose_calls_cost_time():
    """With the step cost measured, a rejected draft pauses a drafter whose calls cost time (OWL,
    timed at 10 ms against a 24 ms step) but not the suffix index (untimed, microseconds): its next
    drafts are weighed by the request's record instead, so a confident one is verified at once
    while over-confident ones stop being verified; the same holds for refused drafts."""
    r = Router(RouterConfig(min_score=0.0, backoff_steps=8))
    for _ in range(20):  # a = 20 ms, b = 1 ms per token: a draft token needs p >= 1/21
        r.observe_step(1, 1, 21.0, verify=False)
        r.observe_step(1, 9, 20 + 9 + 2, verify=True)
    r.observe_draft_cost("owl", 10.0)
    assert r.worth_backing_off("owl", 1) and not r.worth_backing_off("suffix", 1)
    # A call of 0.3 ms shared by 16 requests costs 0.8% of a 2.25 ms output token: not paused.
    r.observe_draft_cost("corpus", 0.3)
    assert r.worth_backing_off("corpus", 1) and not r.worth_backing_off("corpus", 16)
    r.observe("a", drafted=5, accepted=0, expected=2.0, source="owl")
    r.observe("a", drafted=5, accepted=0, expected=2.0, source="suffix")
    assert not r.wants_draft("a", "owl") and r.wants_draft("a", "suffix")
    sure = Draft.chain([1, 2, 3], probs=[1.0, 1.0, 1.0], source="suffix")
    assert len(r.plan_batch(["a"], [sure])[0]) == 3  # verified the step after a rejection
    verified = 0
    for _ in range(30):  # over-confident drafts that keep failing: pruned, never paused
        assert r.wants_draft("a", "suffix")
        d = r.plan_batch(["a"], [Draft.chain([1, 2, 3, 4], probs=[0.5, 0.4, 0.3, 0.2],
                                             source="suffix")])[0]
        if len(d):
            verified += 1
            r.observe("a", drafted=len(d), accepted=0, expected=float(d.probs.sum()))
    assert verified <= 3, verified
    # Without a cost model every drafter is backed off (nothing else would stop it).
    r2 = Router(RouterConfig(backoff_steps=8))
    r2.observe("a", drafted=5, accepted=0, expected=2.0, source="suffix")
    assert not r2.wants_draft("a", "suffix")


def test_router_howl_pick():
    r = Router(RouterConfig(howl_threshold=2.0))
    suffix_hi = Draft.chain([1, 2, 3], probs=[1, 1, 1])
    suffix_lo = Draft.chain([1], probs=[0.5])
    owl = Draft([7, 8, 9], [-1, 0, -1], [0.8, 0.6, 0.1], score=1.5)
    assert r.pick(suffix_hi, owl) is suffix_hi
    assert r.pick(suffix_lo, owl) is owl
    assert len(r.pick(None, None)) == 0


@pytest.mark.parametrize("field,value", [("max_spec_tokens", 0), ("min_token_prob", 1.5),
                                         ("spec_factor", -1.0), ("owl_top_k", 0),
                                         ("corpus", "/no/such/repo"), ("corpus_mb", -1),
                                         ("draft_shape", "bush")])
def test_config_rejects_bad_values(field, value):
    cfg = LongSpecConfig(**{field: value})
    with pytest.raises(ValueError, match=field.replace("_", "-")):
        cfg.validate()


def test_config_window_must_fit():
    with pytest.raises(ValueError, match="speculative-num-draft-tokens"):
        LongSpecConfig(max_spec_tokens=15).validate(num_draft_tokens=8)


def test_cli_rejects_bad_longspec_option():
    exe = Path(sys.executable).parent / "sgl-longspec"
    for bad in (["--longspec-min-token-prob", "2"], ["--longspec-no-such-option", "1"],
                ["--longspec-max-spec-tokens", "20", "--speculative-num-draft-tokens", "8"]):
        p = subprocess.run([str(exe), "serve", "--speculative-algorithm", "LONGSPEC", *bad],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 2, p.stderr
        assert "--longspec-" in p.stderr, p.stderr


def _damaged_checkpoints(tmp_path: Path) -> dict:
    """Copies of the shipped drafter checkpoint, each damaged one way."""
    import shutil

    from sgl_longspec.drafters.owl import shipped_checkpoint

    src = shipped_checkpoint()
    out = {"missing": (tmp_path / "no-such-checkpoint", "is not a directory")}
    for name in ("truncated", "garbage-config", "no-weights"):
        d = tmp_path / name
        shutil.copytree(src, d)
        out[name] = (d, {"truncated": "drafter.safetensors is corrupt", "garbage-config": "not valid JSON",
                         "no-weights": "has no drafter.safetensors"}[name])
    raw = (out["truncated"][0] / "drafter.safetensors").read_bytes()
    (out["truncated"][0] / "drafter.safetensors").write_bytes(raw[: len(raw) // 3])
    (out["garbage-config"][0] / "config.json").write_text("{not json")
    (out["no-weights"][0] / "drafter.safetensors").unlink()
    return out


def test_cli_refuses_a_damaged_drafter_checkpoint_naming_the_file(tmp_path):
    """A missing, corrupt or truncated checkpoint stops the launch before any model is loaded
    (exit 2), with the file and the reason in the message."""
    exe = Path(sys.executable).parent / "sgl-longspec"
    for name, (path, reason) in _damaged_checkpoints(tmp_path).items():
        p = subprocess.run([str(exe), "serve", "--speculative-algorithm", "LONGSPEC",
                            "--longspec-drafter-path", str(path)], capture_output=True, text=True, timeout=180)
        assert p.returncode == 2, (name, p.stderr[-2000:])
        assert str(path) in p.stderr and reason in p.stderr, (name, p.stderr[-2000:])


@pytest.mark.server
def test_server_refuses_a_drafter_checkpoint_for_another_model(tmp_path):
    """A well-formed checkpoint trained for another target (its recorded target fingerprint
    differs) passes the file check, then stops the server start in the scheduler with the file
    and the reason in the log; nothing keeps running."""
    import os
    import shutil
    import signal
    import socket

    from sgl_longspec.tools.cli import start_server
    from sgl_longspec.drafters.owl import shipped_checkpoint

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ckpt = tmp_path / "other-target"
    shutil.copytree(shipped_checkpoint(), ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg.get("target_fingerprint"), "the shipped checkpoint records its target"
    cfg["target_fingerprint"]["probe_norms"] = [2 * x + 1 for x in cfg["target_fingerprint"]["probe_norms"]]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    log = tmp_path / "server.log"
    with open(log, "wb") as f:
        proc, _ = start_server(None, "127.0.0.1", port, [
            "--speculative-algorithm", "LONGSPEC", "--longspec-drafter-path", str(ckpt)], log_file=f)
        try:
            rc = proc.wait(timeout=600)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text(errors="replace")
    assert rc != 0, text[-3000:]
    assert "--longspec-drafter-path" in text and str(ckpt) in text and "fingerprint" in text, text[-3000:]


# ---------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def plain_outputs(server_pool):
    """Everything the LONGSPEC tests compare against, computed first on one plain server."""
    srv = server_pool.get(PLAIN_ARGS)
    return {"single": greedy(srv, PROMPTS), "multi_turn": run_multi_turn(srv)[0],
            "samples": sample_outputs(srv), "logprobs": with_logprobs(srv),
            # the control: a biased sampler (temperature 0.7 instead of 1)
            "samples_biased": sample_outputs(srv, {**SAMPLING_PARAMS, "temperature": 0.7}),
            "rules": with_rules(srv), "tools": [tool_call(srv, c) for c in TOOL_CHOICES]}


@pytest.fixture(scope="module")
def stats_path(tmp_path_factory):
    return tmp_path_factory.mktemp("longspec") / "stats.json"


@pytest.fixture(scope="module")
def longspec(server_pool, plain_outputs, stats_path):
    return server_pool.get(LONGSPEC_ARGS + FIXED_ROUTER, env={"LONGSPEC_STATS_FILE": str(stats_path)})


def read_stats(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.mark.server
def test_greedy_identical_to_plain_decoding(longspec, plain_outputs, stats_path):
    spec = greedy(longspec, PROMPTS)
    plain = plain_outputs["single"]
    mismatches = []
    for i, (a, b) in enumerate(zip(plain, spec)):
        if a["output_ids"] != b["output_ids"]:
            mismatches.append((i, a["text"][:80], b["text"][:80]))
    assert not mismatches, f"LONGSPEC differs from plain greedy on {len(mismatches)} prompts: {mismatches}"
    # Speculation must actually have happened on the repetitive prompts.
    verify_steps = sum(o["meta_info"].get("spec_verify_ct", 0) or 0 for o in spec)
    tokens = sum(o["meta_info"]["completion_tokens"] for o in spec)
    stats = read_stats(stats_path)
    assert stats["accepted"] > 0, stats
    assert verify_steps < tokens, (verify_steps, tokens)
    assert not stats["fallbacks"], stats["fallbacks"]


@pytest.mark.server
def test_multi_turn_reuses_radix_cache(longspec, plain_outputs):
    spec_outs, spec_cached = run_multi_turn(longspec)
    assert spec_cached[1] > 0 and spec_cached[2] > 0, spec_cached  # later turns hit the radix cache
    assert spec_outs == plain_outputs["multi_turn"]


@pytest.mark.server
def test_logprobs_under_speculation_equal_plain(longspec, plain_outputs, stats_path):
    """Logprob requests speculate (they used to crash the server) and return what plain decoding
    returns: the chosen tokens' logprobs, the top-2 and the requested token ids' logprobs (float32,
    within 1e-3)."""
    before = read_stats(stats_path)["accepted"]
    spec = with_logprobs(longspec)
    for p, s_ in zip(plain_outputs["logprobs"], spec):
        assert_same_logprobs(p, s_)
    copy = spec[0]["meta_info"]
    assert copy["spec_verify_ct"] < copy["completion_tokens"], copy  # multi-token steps ran
    stats = read_stats(stats_path)
    assert stats["accepted"] > before and not stats["fallbacks"], stats
    # The OpenAI route: logprobs + top_logprobs on a chat completion.
    client = longspec.openai_client()
    r = client.chat.completions.create(model="default", messages=[{"role": "user", "content":
                                       "Count from 1 to 20, separated by commas."}],
                                       max_tokens=24, temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens and all(len(c.top_logprobs) == 2 for c in content)


@pytest.mark.server
def test_grammars_penalties_and_bias_speculate_losslessly(longspec, plain_outputs, stats_path):
    """JSON schema, regex and EBNF grammars, frequency/presence/repetition penalties, min new
    tokens and logit bias: each request speculates (drafts verified under its rules, per
    position) and its output equals plain decoding's."""
    for name, prompt, params in RULE_CASES:
        before = read_stats(stats_path)
        out = with_rules(longspec, [(name, prompt, params)])[name]
        assert out["output_ids"] == plain_outputs["rules"][name]["output_ids"], (
            name, plain_outputs["rules"][name]["text"], out["text"])
        after = read_stats(stats_path)
        assert after["rule_steps"] > before["rule_steps"], (name, after)
        assert after["accepted"] > before["accepted"], (name, after)  # it really speculated
        meta = out["meta_info"]
        assert meta["spec_verify_ct"] < meta["completion_tokens"], name
        # the request's own LONGSPEC figures: every decode step is a verify or a plain step
        own = meta["longspec"][0]
        assert own["verify_steps"] + own["plain_steps"] == meta["spec_verify_ct"], (name, own)
        assert sum(own["accepted"].values()) > 0 and own["drafted"].keys() == own["accepted"].keys()
    opted_out = longspec.generate(text=PROMPTS[0], sampling_params={
        "temperature": 0, "max_new_tokens": 8, "custom_params": {"longspec_stats": "off"}})
    assert "longspec" not in opted_out["meta_info"]
    assert not read_stats(stats_path)["fallbacks"]


@pytest.mark.server
def test_tool_calls_under_speculation_equal_plain(longspec, plain_outputs, stats_path):
    before = read_stats(stats_path)["rule_steps"]
    for choice, plain in zip(TOOL_CHOICES, plain_outputs["tools"]):
        out = tool_call(longspec, choice)
        assert out == plain and (out[0] or out[1]), (choice, out, plain)
    assert read_stats(stats_path)["rule_steps"] > before


@pytest.mark.server
def test_mixed_batch_only_constrained_requests_follow_rules(longspec, plain_outputs, stats_path):
    """Constrained and unconstrained requests in flight together: each keeps its own output, and
    the unconstrained ones keep speculating (batched verify steps with rules ran)."""
    before = read_stats(stats_path)
    jobs = [("rule", c) for c in RULE_CASES[:3]] + [("free", i) for i in (0, 1, 12)]

    def one(job):
        kind, x = job
        if kind == "rule":
            return with_rules(longspec, [x])[x[0]]
        return longspec.generate(text=PROMPTS[x], sampling_params={"temperature": 0,
                                                                 "max_new_tokens": MAX_NEW})

    with ThreadPoolExecutor(len(jobs)) as ex:
        outs = list(ex.map(one, jobs))
    for (kind, x), o in zip(jobs, outs):
        ref = plain_outputs["rules"][x[0]] if kind == "rule" else plain_outputs["single"][x]
        assert o["output_ids"] == ref["output_ids"], (kind, x if kind == "free" else x[0])
    after = read_stats(stats_path)
    assert after["batched_verify_steps"] > before["batched_verify_steps"], after
    assert after["rule_steps"] > before["rule_steps"] and not after["fallbacks"], after


@pytest.mark.server
@pytest.mark.parametrize("bad", [[1, 2, 10 ** 8], [5, -1, 7]])
def test_out_of_vocab_token_ids_get_400(longspec, bad):
    import requests

    r = requests.post(longspec.base_url + "/generate", timeout=60,
                      json={"input_ids": bad, "sampling_params": {"max_new_tokens": 4}})
    assert r.status_code == 400, r.text
    assert f"= {bad[2] if bad[2] > 100 else bad[1]}" in r.text
    r = requests.post(longspec.base_url + "/v1/completions", timeout=60,
                      json={"model": "default", "prompt": bad, "max_tokens": 4})
    assert r.status_code == 400, r.text
    assert longspec.alive()
    ok = longspec.generate(input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 2})
    assert len(ok["output_ids"]) == 2


BAD_REQUESTS = [
    ("over the context limit", {"input_ids": [1] * 9000, "sampling_params": {"max_new_tokens": 4}}),
    ("invalid JSON schema", {"json_schema": "{not json"}),
    ("invalid regex", {"regex": "("}),
    ("invalid EBNF", {"ebnf": "root ::= "}),
    ("two grammars", {"regex": "a+", "json_schema": "{}"}),
    ("negative temperature", {"temperature": -1}),
    ("top_p > 1", {"top_p": 2}),
    ("logit bias outside the vocabulary", {"logit_bias": {"99999999": 1.0}}),
    ("negative max_new_tokens", {"max_new_tokens": -1}),
    ("repetition penalty 0", {"repetition_penalty": 0}),
    ("min_new_tokens > max_new_tokens", {"min_new_tokens": 10}),
]


@pytest.mark.server
@pytest.mark.parametrize("what,bad", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_400_and_lose_nothing(longspec, plain_outputs, what, bad):
    """Invalid options get a 400 with a message; a request in flight at the same time finishes
    with the output it would have had; the server keeps serving."""
    import requests

    body = bad if "input_ids" in bad else {"text": PROMPTS[0], "sampling_params": {
        "max_new_tokens": 4, **bad}}
    with ThreadPoolExecutor(1) as ex:
        good = ex.submit(longspec.generate, text=PROMPTS[3], sampling_params={
            "temperature": 0, "max_new_tokens": 16})
        r = requests.post(longspec.base_url + "/generate", json=body, timeout=120)
        out = good.result()
    assert r.status_code == 400 and r.json()["error"]["message"], (what, r.status_code, r.text)
    assert out["output_ids"] == plain_outputs["single"][3]["output_ids"][:16] and longspec.alive()


@pytest.mark.server
def test_abort_frees_request_state(longspec, stats_path):
    import requests

    # A streamed request that the client abandons mid-generation.
    r = requests.post(longspec.base_url + "/generate", stream=True, timeout=600, json={
        "text": PROMPTS[0], "stream": True, "rid": "abandoned-by-its-client",
        "sampling_params": {"temperature": 0, "max_new_tokens": 400, "ignore_eos": True}})
    got = 0
    for chunk in r.iter_lines():
        if chunk:
            got += 1
        if got >= 5:
            break
    r.close()
    time.sleep(2.0)
    # Two later requests: the worker notices departures at its next decode step.
    done = longspec.generate(text=PROMPTS[5], sampling_params={"temperature": 0, "max_new_tokens": 8})
    longspec.generate(text=PROMPTS[6], sampling_params={"temperature": 0, "max_new_tokens": 8})
    stats = read_stats(stats_path)
    assert stats["num_active_requests"] <= 1, stats
    assert stats["num_active_requests"] == len(stats["active_requests"])
    assert done["meta_info"]["id"] in stats["cached_response_ids"], stats  # finished -> global tree
    # the abandoned request's state is gone and its partial output stayed out of the global tree
    assert "abandoned-by-its-client" not in stats["active_requests"], stats
    assert "abandoned-by-its-client" not in stats["cached_response_ids"], stats
    assert stats["index_memory_bytes"] > 0


@pytest.mark.server
def test_sampling_matches_plain_distribution(longspec, plain_outputs, stats_path):
    """LONGSPEC's samples follow plain decoding's law: two-sample chi-square tests on the joint
    law of the first 3 tokens and on the marginal of each later position (8 tokens, fixed seeds),
    each required to give p > 1e-3 / (number of tests). The prompt repeats a pattern, so chains
    of several draft tokens are verified (asserted from the worker's counters). The control,
    plain decoding at temperature 0.7 against 1.0, must fail the same test: it has the power to
    see a biased sampler."""
    before = read_stats(stats_path)
    spec = sample_outputs(longspec)
    ps = sampling_p_values(spec, plain_outputs["samples"])
    alpha = 1e-3 / len(ps)
    assert min(ps) > alpha, ps
    control = sampling_p_values(plain_outputs["samples_biased"], plain_outputs["samples"])
    assert min(control) < alpha, control
    after = read_stats(stats_path)
    verified = after["by_source"]["suffix"][0] - before["by_source"]["suffix"][0]
    drafted = after["by_source"]["suffix"][1] - before["by_source"]["suffix"][1]
    assert verified > 0 and drafted / verified >= 2.0, (verified, drafted)  # multi-token drafts
    assert after["accepted"] - before["accepted"] >= SAMPLING_N, after  # and accepted ones
    assert after["max_verify_batch"] >= 2 and not after["fallbacks"], after


@pytest.mark.server
def test_sampling_seed_makes_speculative_sampling_reproducible(longspec):
    """A request with `sampling_seed` samples the same tokens alone and in a batch with other
    (unseeded) sampling requests, while speculating; other seeds give other samples."""
    params = {**SAMPLING_PARAMS, "max_new_tokens": 24, "sampling_seed": 1234}
    alone = longspec.generate(text=SAMPLING_PROMPT, sampling_params=params)
    with ThreadPoolExecutor(4) as ex:
        seeded = ex.submit(longspec.generate, text=SAMPLING_PROMPT, sampling_params=params)
        for i in (0, 3, 12):
            ex.submit(longspec.generate, text=PROMPTS[i],
                      sampling_params={"temperature": 1.0, "max_new_tokens": 24})
        batched = seeded.result()
    assert batched["output_ids"] == alone["output_ids"]
    assert sum(alone["meta_info"]["longspec"][0]["accepted"].values()) > 0  # it speculated
    others = {tuple(longspec.generate(text=SAMPLING_PROMPT, sampling_params={
        **params, "sampling_seed": s})["output_ids"]) for s in range(6)}
    assert len(others | {tuple(alone["output_ids"])}) > 1


@pytest.mark.server
def test_default_router_greedy_identical_to_plain(server_pool, plain_outputs, tmp_path):
    """The server as a user starts it (the cost-aware router on) gives plain decoding's outputs
    and falls back nowhere. How much it speculates depends on the machine's load (the router
    measures step times), so nothing here counts drafts."""
    stats_file = tmp_path / "default_router_stats.json"
    srv = server_pool.get(LONGSPEC_ARGS, env={"LONGSPEC_STATS_FILE": str(stats_file)})
    spec = greedy(srv, PROMPTS)
    for i, (a, b) in enumerate(zip(plain_outputs["single"], spec)):
        assert a["output_ids"] == b["output_ids"], f"prompt {i}: {a['text'][:80]!r} vs {b['text'][:80]!r}"
    assert not read_stats(stats_file)["fallbacks"]


@pytest.mark.server
def test_concurrent_requests_identical(server_pool, plain_outputs, tmp_path):
    """8 requests in flight at once, 4 running and the rest queued (ragged drafts, the draft
    budget shrunk by the queue the scheduler hook reports) give the single-request outputs, and
    batched verify steps (two or more requests verifying drafts in one forward) really ran.
    Its own server with the cost-aware router off: on two busy cores the router may rightly
    measure that verifying a batch does not pay and refuse every draft, which would leave the
    batched verify path unseen (the router's refusals have their own tests)."""
    stats_file = tmp_path / "concurrent_stats.json"
    srv = server_pool.get(LONGSPEC_ARGS + ("--longspec-cost-aware", "false", "--max-running-requests", "4"),
                          env={"LONGSPEC_STATS_FILE": str(stats_file)})
    plain = plain_outputs["single"]
    idx = list(range(8))

    def one(i):
        return srv.generate(text=PROMPTS[i], sampling_params={"temperature": 0, "max_new_tokens": MAX_NEW})

    with ThreadPoolExecutor(8) as ex:
        outs = list(ex.map(one, idx))
    for i, o in zip(idx, outs):
        assert o["output_ids"] == plain[i]["output_ids"], f"prompt {i} differs under concurrency"
    stats = read_stats(stats_file)
    assert stats["batched_verify_steps"] > 0, stats
    assert stats["max_verify_batch"] >= 2 and not stats["fallbacks"], stats
    # short contexts: the CPU backend attended each verify request in one call
    assert stats["verify_attention_single_pass"] > 0, stats
    assert stats["queued_steps"] > 0 and stats["saturated_steps"] == 0, stats  # the queue was seen


@pytest.mark.server
def test_retracted_requests_finish_losslessly(server_pool, plain_outputs, tmp_path):
    """SGLang's retraction test mode (SGLANG_TEST_RETRACT: every 10th step retracts running
    requests, which later re-enter through prefill) on a LONGSPEC server: every request finishes
    with plain decoding's output, retraction really happened (SGLang's log), drafts were accepted
    with nothing falling back, and the worker tracks nothing afterwards."""
    stats_file = tmp_path / "retract_stats.json"
    srv = server_pool.get(LONGSPEC_ARGS + FIXED_ROUTER, env={"SGLANG_TEST_RETRACT": "1", "SGLANG_TEST_RETRACT_INTERVAL": "10",
                                              "LONGSPEC_STATS_FILE": str(stats_file)})
    idx = list(range(6))
    with ThreadPoolExecutor(len(idx)) as ex:
        outs = list(ex.map(lambda i: srv.generate(text=PROMPTS[i], sampling_params={
            "temperature": 0, "max_new_tokens": MAX_NEW}), idx))
    for i, o in zip(idx, outs):
        assert o["output_ids"] == plain_outputs["single"][i]["output_ids"], f"prompt {i} differs after retraction"
    assert "Testing retraction" in srv.log_tail(100000), "no retraction happened"
    srv.generate(text=PROMPTS[7], sampling_params={"temperature": 0, "max_new_tokens": 4})
    stats = read_stats(stats_file)
    assert stats["verify_steps"] > 0 and stats["accepted"] > 0 and not stats["fallbacks"], stats
    assert stats["tracked_requests"] <= 1 and stats["num_active_requests"] <= 1, stats  # the probe only


@pytest.mark.server
def test_prometheus_counters_match_the_worker(server_pool, tmp_path):
    """With --enable-metrics, LONGSPEC's counters appear on SGLang's /metrics and agree with the
    worker's own record."""
    import re

    import requests

    stats_file = tmp_path / "metrics_stats.json"
    srv = server_pool.get(LONGSPEC_ARGS + FIXED_ROUTER + ("--enable-metrics",),
                          env={"LONGSPEC_STATS_FILE": str(stats_file)})
    greedy(srv, PROMPTS[:4])
    text = requests.get(srv.base_url + "/metrics", timeout=60).text
    stats = read_stats(stats_file)

    def value(name, **labels):
        sel = ",".join(f'{k}="{v}"' for k, v in labels.items())
        m = re.search(rf'^sglang:longspec_{name}_total{{[^}}]*{sel}[^}}]*}} ([0-9.e+]+)$', text, re.M)
        assert m, (name, labels, [ln for ln in text.splitlines() if "longspec" in ln])
        return float(m.group(1))

    drafts, drafted, accepted = stats["by_source"]["suffix"]
    assert accepted > 0
    assert value("accepted_tokens", drafter="suffix") == accepted
    assert value("draft_tokens", drafter="suffix") == drafted
    assert value("steps", kind="verify") == stats["verify_steps"]
    assert value("steps", kind="plain") == stats["plain_steps"]


@pytest.mark.server
def test_external_corpus_drafts_what_no_prompt_held(server_pool, tmp_path):
    """--longspec-corpus indexes a repository at start; POST /add_external_corpus (SGLang NGRAM's
    request shape, content only, behind the admin key) adds documents, and a request whose answer
    is in the corpus but in no prompt and no past output (the global tree is off) drafts from it,
    with output identical to plain decoding."""
    import requests

    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / "pkg" / "merge.py").write_text(CODE_SNIPPET)
    (repo / ".git").mkdir()
    (repo / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    stats_file = tmp_path / "corpus_stats.json"
    # The cost-aware router off: the test counts what the corpus drafts, and the router's
    # timing-based refusals (per machine and load) would decide part of that.
    srv = server_pool.get(LONGSPEC_ARGS + ("--longspec-global-cache-requests", "0",
                                           *FIXED_ROUTER,
                                           "--longspec-corpus", str(repo),
                                           "--admin-api-key", "corpus-admin"),
                          env={"LONGSPEC_STATS_FILE": str(stats_file)})
    url, admin = srv.base_url, {"Authorization": "Bearer corpus-admin"}

    def post(path, body, headers=admin):
        return requests.post(url + path, json=body, headers=headers, timeout=120)

    listed = requests.get(url + "/list_external_corpora", headers=admin, timeout=60)
    assert listed.status_code == 200, listed.text
    assert set(listed.json()["corpus_token_counts"]) == {"startup"}  # merge.py; .git skipped
    assert listed.json()["corpus_token_counts"]["startup"] > 50
    assert post("/add_external_corpus", {"documents": ["x = 1"]}, headers={}).status_code == 401
    r = post("/add_external_corpus", {"file_path": "/etc/hostname"})
    assert r.status_code == 400 and "file_path" in r.json()["message"], r.text
    assert post("/add_external_corpus", {"documents": "not a list"}).status_code == 400

    prompt = chat("Write a short Python function that checks whether a string is a palindrome.")
    params = {"temperature": 0, "max_new_tokens": 64}
    # The reference: this server's own plain decoding (speculation off for the request).
    ref = srv.generate(text=prompt, sampling_params={**params, "custom_params": {"longspec": "off"}})
    before = read_stats(stats_file)["by_source"].get("corpus", [0, 0, 0])
    r = post("/add_external_corpus", {"corpus_id": "notes", "documents": [ref["text"], ""]})
    assert r.status_code == 200 and r.json()["corpus_id"] == "notes", r.text
    assert r.json()["loaded_token_count"] >= 40
    spec = srv.generate(text=prompt, sampling_params=params)
    assert spec["output_ids"] == ref["output_ids"]
    stats = read_stats(stats_file)
    assert stats["by_source"]["corpus"][2] - before[2] >= 30, stats["by_source"]
    assert spec["meta_info"]["spec_verify_ct"] < spec["meta_info"]["completion_tokens"] / 2
    assert not stats["fallbacks"], stats["fallbacks"]
    assert stats["corpus_tokens"]["notes"] == r.json()["loaded_token_count"]

    assert post("/remove_external_corpus", {"corpus_id": "notes"}).status_code == 200
    assert post("/remove_external_corpus", {"corpus_id": "notes"}).status_code == 400
    listed = requests.get(url + "/list_external_corpora", headers=admin, timeout=60).json()
    assert set(listed["corpus_token_counts"]) == {"startup"}
    assert srv.alive()


@pytest.mark.server
def test_owl_drafts_greedy_identical_to_plain(server_pool, plain_outputs, tmp_path):
    """OWL-only LONGSPEC (`--longspec-suffix-drafts false`): the shipped drafter's trees are
    verified, some of their tokens accepted, and greedy output stays identical to plain decoding."""
    stats_file = tmp_path / "owl_stats.json"
    srv = server_pool.get(LONGSPEC_ARGS + FIXED_ROUTER + ("--longspec-suffix-drafts", "false"),
                          env={"LONGSPEC_STATS_FILE": str(stats_file)})
    spec = greedy(srv, PROMPTS)
    for i, (a, b) in enumerate(zip(plain_outputs["single"], spec)):
        assert a["output_ids"] == b["output_ids"], f"prompt {i} differs with OWL drafts"
    stats = read_stats(stats_file)
    drafts, drafted, accepted = stats["by_source"].get("owl", (0, 0, 0))
    assert drafts > 0 and accepted > 0, stats["by_source"]
    assert "suffix" not in stats["by_source"], stats["by_source"]
    assert sum(row[2] for row in stats["by_source"].values()) == stats["accepted"]


# Each point fires within the visits 12 greedy requests are sure to make (index: every request's
# first step, 12; suffix_drafter 6, owl_drafter 2 batched calls, verify 4 steps): the points
# draw from their own streams, so this holds on any batching (test_controller checks the draws).
FAULT_SEED = 1
FAULT_SPEC = "index:0.1,suffix_drafter:0.1,owl_drafter:0.3,verify:0.2"
FAULT_FIRST_VISIT = {"index": 2, "suffix_drafter": 6, "owl_drafter": 2, "verify": 4}


@pytest.mark.server
def test_injected_faults_fall_back_losslessly(server_pool, plain_outputs, tmp_path):
    """Every named fault point fires (LONGSPEC_INJECT_FAULTS): each failure is counted by its
    cause, only the requests it touched decode plainly, output stays identical to plain decoding,
    and the server keeps answering and speculating for new requests."""
    stats_file = tmp_path / "fault_stats.json"
    env = {"LONGSPEC_STATS_FILE": str(stats_file), "LONGSPEC_FAULT_SEED": str(FAULT_SEED),
           "LONGSPEC_INJECT_FAULTS": FAULT_SPEC}
    # The cost-aware router off: its timing-based refusals would change how often the drafting
    # points are reached (tests/test_controller.py pins the visits each point needs to fire).
    srv = server_pool.get(LONGSPEC_ARGS + FIXED_ROUTER, env=env)
    n = 12
    spec = greedy(srv, PROMPTS[:n])
    for i, (a, b) in enumerate(zip(plain_outputs["single"][:n], spec)):
        assert a["output_ids"] == b["output_ids"], f"prompt {i} differs under injected faults"
    stats = read_stats(stats_file)
    injected = {k: v for k, v in stats["injected_faults"].items() if v}
    assert set(injected) == {"index", "suffix_drafter", "owl_drafter", "verify"}, stats
    assert stats["fallbacks"] == injected, (stats["fallbacks"], injected)
    assert stats["verify_steps"] > 0 and stats["accepted"] > 0, stats
    assert srv.log_path.read_text(errors="replace").count("Traceback") >= len(injected)
    assert stats["num_active_requests"] <= 1 and stats["tracked_requests"] <= 1, stats


@pytest.mark.server
def test_bare_sglang_launch_server_longspec(server_pool, plain_outputs, tmp_path):
    """`python -m sglang.launch_server --speculative-algorithm LONGSPEC` with nothing else that
    LONGSPEC needs: the plugin derives the verify window, selects its CPU attention backend, and
    the --longspec-* flags reach it through SGLang's own parser. Greedy output equals plain
    decoding, drafts were verified, nothing fell back (the router fixed: FIXED_ROUTER)."""
    stats_file = tmp_path / "bare_stats.json"
    srv = server_pool.get(("--device", "cpu", "--dtype", "float32", "--max-total-tokens", "32768",
                           "--speculative-algorithm", "LONGSPEC", "--longspec-max-spec-tokens", "15",
                           "--random-seed", "0") + FIXED_ROUTER,
                          env={"LONGSPEC_STATS_FILE": str(stats_file)}, bare=True)
    log = srv.log_path.read_text(errors="replace")
    assert "attention backend longspec_cpu" in log and "window=16" in log
    spec = greedy(srv, PROMPTS[:8])
    for i, (a, b) in enumerate(zip(plain_outputs["single"][:8], spec)):
        assert a["output_ids"] == b["output_ids"], f"prompt {i} differs on the bare launch"
    stats = read_stats(stats_file)
    assert stats["accepted"] > 0 and stats["verify_steps"] > 0 and not stats["fallbacks"], stats


@pytest.mark.server
def test_tensor_parallel_two_ranks_on_cpu(server_pool, tmp_path):
    """`--tp 2` on this CPU (gloo all-reduce; the plugin keeps SGLang off NCCL): LONGSPEC's drafts
    and verification outcomes are decided on rank 0 and broadcast, and greedy output equals a
    plain `--tp 2` server's (same reduction order on both)."""
    prompts = PROMPTS[:3] + PROMPTS[10:13]
    plain = greedy(server_pool.get(("--tp", "2", "--random-seed", "0")), prompts)
    stats_file = tmp_path / "tp_stats.json"
    srv = server_pool.get(LONGSPEC_ARGS + FIXED_ROUTER + ("--tp", "2"), env={"LONGSPEC_STATS_FILE": str(stats_file)})
    spec = greedy(srv, prompts)
    for i, (a, b) in enumerate(zip(plain, spec)):
        assert a["output_ids"] == b["output_ids"], f"prompt {i} differs under --tp 2"
    stats = read_stats(stats_file)
    assert stats["verify_steps"] > 0 and stats["accepted"] > 0 and not stats["fallbacks"], stats
    assert stats["tp_broadcasts"] >= 2 * stats["verify_steps"], stats  # drafts + outcome per verify


@pytest.mark.server
def test_data_parallel_two_replicas_behind_an_api_key(server_pool, plain_outputs):
    """`--dp 2`: two replicas, each with its own LONGSPEC worker and suffix index, behind SGLang's
    round-robin dispatcher; concurrent greedy requests give plain decoding's output and speculate
    (per-request meta_info). `--api-key` passes through: without the key a request gets 401."""
    import requests

    srv = server_pool.get(LONGSPEC_ARGS + ("--dp", "2", "--api-key", "sekret"))
    r = requests.post(srv.base_url + "/generate", timeout=60,
                      json={"text": "hi", "sampling_params": {"max_new_tokens": 2}})
    assert r.status_code == 401, r.text
    headers = {"Authorization": "Bearer sekret"}
    idx = [0, 1, 2, 10, 11, 12]

    def one(i):
        r = requests.post(srv.base_url + "/generate", headers=headers, timeout=900, json={
            "text": PROMPTS[i], "sampling_params": {"temperature": 0, "max_new_tokens": MAX_NEW}})
        assert r.status_code == 200, r.text
        return r.json()

    with ThreadPoolExecutor(len(idx)) as ex:
        outs = list(ex.map(one, idx))
    for i, o in zip(idx, outs):
        assert o["output_ids"] == plain_outputs["single"][i]["output_ids"], f"prompt {i} under --dp 2"
    accepted = [sum(o["meta_info"]["longspec"][0]["accepted"].values()) for o in outs]
    assert sum(a > 0 for a in accepted) >= 4, accepted
    assert srv.log_path.read_text(errors="replace").count("LONGSPEC worker: window=") == 2


@pytest.mark.server
def test_two_replicas_behind_sglangs_model_gateway(server_pool, plain_outputs, tmp_path):
    """SGLang's model gateway (sglang-router, cache-aware policy) in front of two LONGSPEC servers,
    each with its own suffix index: a multi-turn session keeps reaching the replica that holds its
    prefix (radix-cache hits on the later turns), drafts are accepted there, and every turn equals
    plain decoding's. What is shared: nothing but the gateway's routing tree; each replica's
    suffix state stays its own."""
    pytest.importorskip("sglang_router")
    import os
    import signal

    import requests

    from conftest import HOST, ServerHandle, free_port
    from sgl_longspec.tools.cli import start_server, stop_server, wait_healthy

    server_pool.stop_all()  # room for this test's own two servers
    procs, urls, stats = [], [], [tmp_path / f"replica{k}.json" for k in range(2)]
    router = None
    try:
        for k in range(2):
            port = free_port()
            os.environ["LONGSPEC_STATS_FILE"] = str(stats[k])
            try:
                p, _ = start_server(None, HOST, port, list(LONGSPEC_ARGS) + ["--max-total-tokens", "8192"],
                                    log_file=open(tmp_path / f"replica{k}.log", "wb"))
            finally:
                del os.environ["LONGSPEC_STATS_FILE"]
            procs.append(p)
            urls.append(f"http://{HOST}:{port}")
        for u, p in zip(urls, procs):
            wait_healthy(u, p, 900)
        rport = free_port()
        router = subprocess.Popen(
            [sys.executable, "-m", "sglang_router.launch_router", "--host", HOST, "--port", str(rport),
             "--worker-urls", *urls, "--policy", "cache_aware", "--log-level", "warn"],
            stdout=open(tmp_path / "router.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
        base = f"http://{HOST}:{rport}"
        deadline = time.time() + 180
        while True:  # the gateway answers before it has registered its workers
            try:
                if requests.get(base + "/workers", timeout=5).json().get("total") == 2:
                    break
            except (requests.RequestException, ValueError):
                pass
            assert time.time() < deadline and router.poll() is None, (tmp_path / "router.log").read_text()
            time.sleep(1.0)
        gateway = ServerHandle(base, router, tmp_path / "router.log", (), rport, "")
        outs, cached = run_multi_turn(gateway)
        assert outs == plain_outputs["multi_turn"]
        assert cached[1] > 0 and cached[2] > 0, cached  # the session stayed on its replica
        per_replica = [json.loads(s.read_text()) if s.exists() else {} for s in stats]
        accepted = [st.get("accepted", 0) for st in per_replica]
        assert max(accepted) > 0, per_replica
        assert not any(st.get("fallbacks") for st in per_replica), per_replica
    finally:
        if router is not None and router.poll() is None:
            os.killpg(router.pid, signal.SIGTERM)
            router.wait(30)
        for p in procs:
            stop_server(p)
