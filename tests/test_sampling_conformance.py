"""LONGSPEC's sampling against plain SGLang decoding, end to end (issue 33).

Two servers, each configuration once: every plain reference is computed first on a plain server
(SGLang's default schedule, as a user would compare), then the LONGSPEC server answers the same
requests. What is checked:
- seeded sampling (`sampling_seed`, one seed per request) follows plain decoding's law: two-sample
  chi-square per position (the first token included) and on the joint law of the first 3 tokens,
  with a biased control that must fail the same test, while drafts are verified and accepted;
  the same for unseeded requests (p-values of both are printed, `-s` shows them);
- the OpenAI `seed` field through /v1/completions and /v1/chat/completions at temperature > 0:
  the first tokens follow plain decoding's law, the first token's logprob is plain decoding's for
  the same token, and a seed reproduces its text;
- greedy output identical to plain decoding under repetition, frequency and presence penalties and
  logit bias, each on a prompt where it changes the output (asserted: the request without it
  gives other text), alone and combined, with draft tokens accepted (counters).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from test_longspec import (LONGSPEC_ARGS, PLAIN_ARGS, PROMPTS, SAMPLING_PARAMS, SAMPLING_PROMPT,
                           two_sample_p)

# Smaller than test_longspec's unseeded law test (240 x 8 tokens): sized for a shared 2-core
# machine; the first-token defect of issue 33 is gross, the control shows what the size can see.
SAMPLING_N = 96
SAMPLING_LEN = 6
SAMPLING_PARAMS = {**SAMPLING_PARAMS, "max_new_tokens": SAMPLING_LEN}
SEEDS = list(range(1000, 1000 + SAMPLING_N))
CHAT_PROMPT = "Name three primary colors."
OPENAI_N = 32  # requests per route and server
OPENAI_TOKENS = 3
RGB = "red, green, blue, " * 4 + "red,"
CODE = "def add(a, b):\n    return a + b\n\n" * 2 + "def add(a, b):\n"

# (name, prompt, greedy parameters, new tokens, drafts accepted): each parameter changes plain
# decoding's output on its prompt (asserted), and where the prompt holds text the answer copies,
# drafts are accepted (asserted). The last two are issue 33's own cases, on which the penalty
# leaves almost nothing to copy: they are checked for the output and the verify path only.
DAYS, RENAME = PROMPTS[4], PROMPTS[2]
NEWLINE = "198"  # "\n": the days prompt's answer begins "The days of the week are:\nMonday"
PENALTY_CASES = [
    ("repetition 1.3", RENAME, {"repetition_penalty": 1.3}, 40, True),
    ("repetition 1.1", DAYS, {"repetition_penalty": 1.1}, 40, True),
    ("frequency 0.8", RGB, {"frequency_penalty": 0.8}, 32, True),
    ("presence 1.5", DAYS, {"presence_penalty": 1.5}, 40, True),
    ("logit bias", DAYS, {"logit_bias": {NEWLINE: -100.0}}, 40, True),
    ("combined", DAYS, {"repetition_penalty": 1.1, "frequency_penalty": 0.3,
                        "presence_penalty": 0.3, "logit_bias": {NEWLINE: -100.0}}, 40, True),
    ("issue: repetition 1.3, code", CODE, {"repetition_penalty": 1.3}, 32, False),
    ("issue: repetition 1.1, colours", RGB, {"repetition_penalty": 1.1}, 32, False),
]


def seeded_samples(srv, seeds=SEEDS, params=SAMPLING_PARAMS, unseeded_too=False):
    """One request per seed, 16 per /generate call (batched: the verify path sees batches). With
    `unseeded_too`, every other request of a call has no seed (seeded and unseeded requests share
    each batch): returns (seeded, unseeded) samples, half the seeds each."""
    seeded, unseeded = [], []
    for i in range(0, len(seeds), 16):
        chunk = seeds[i:i + 16]
        sps = [{**params, "sampling_seed": s} if not unseeded_too or j % 2 == 0 else dict(params)
               for j, s in enumerate(chunk)]
        res = srv.generate(text=[SAMPLING_PROMPT] * len(chunk), sampling_params=sps)
        for sp, o in zip(sps, res):
            (seeded if "sampling_seed" in sp else unseeded).append(tuple(o["output_ids"]))
    return (seeded, unseeded) if unseeded_too else seeded


def p_values(a: list[tuple], b: list[tuple]) -> list[float]:
    """Two-sample chi-square p-values: the joint law of the first 3 tokens, then the law of each
    position (the first token included)."""
    def at(o, i):
        return o[i] if len(o) > i else -1

    return [two_sample_p([o[:3] for o in a], [o[:3] for o in b])] + [
        two_sample_p([at(o, i) for o in a], [at(o, i) for o in b]) for i in range(SAMPLING_LEN)]


def openai_samples(srv) -> dict:
    """Per route, for seeds 0..OPENAI_N-1 at temperature > 0 (16 in flight): the first tokens and
    the first token's logprob; and one seed asked twice."""
    client = srv.openai_client()

    def completion(seed):
        r = client.completions.create(model="default", prompt=SAMPLING_PROMPT, seed=seed,
                                      max_tokens=OPENAI_TOKENS, temperature=1.0, top_p=0.95,
                                      logprobs=1)
        lp = r.choices[0].logprobs
        return tuple(lp.tokens), lp.token_logprobs[0], r.choices[0].text

    def chat(seed):
        r = client.chat.completions.create(
            model="default", messages=[{"role": "user", "content": CHAT_PROMPT}], seed=seed,
            max_tokens=OPENAI_TOKENS, temperature=0.7, logprobs=True)
        content = r.choices[0].logprobs.content
        return tuple(c.token for c in content), content[0].logprob, r.choices[0].message.content

    out = {}
    with ThreadPoolExecutor(16) as ex:
        for name, fn in (("completions", completion), ("chat", chat)):
            out[name] = list(ex.map(fn, range(OPENAI_N)))
            out[name + "_again"] = fn(7)
    return out


def penalty_outputs(srv) -> dict:
    """Per case: greedy output with its parameters and without them."""
    out = {}
    for name, prompt, params, n, _ in PENALTY_CASES:
        base = {"temperature": 0, "max_new_tokens": n}
        out[name] = (srv.generate(text=prompt, sampling_params={**base, **params}),
                     srv.generate(text=prompt, sampling_params=base))
    return out


@pytest.fixture(scope="module")
def plain(server_pool, request):
    """The plain references the selected tests of this module need, computed first on one plain
    server (so that one test group runs without paying for the others' references)."""
    wanted = {it.originalname for it in request.session.items if it.module is request.module}
    srv = server_pool.get(PLAIN_ARGS)
    out = {}
    if "test_seeded_sampling_follows_plain_decodings_law" in wanted:
        out["seeded"] = seeded_samples(srv)
        # the control: a biased sampler (temperature 0.7 instead of 1)
        out["biased"] = seeded_samples(srv, params={**SAMPLING_PARAMS, "temperature": 0.7})
    if "test_openai_seed_follows_plain_decodings_law" in wanted:
        out["openai"] = openai_samples(srv)
    if "test_penalties_and_bias_greedy_identical_to_plain" in wanted:
        out["penalties"] = penalty_outputs(srv)
    return out


@pytest.fixture(scope="module")
def stats_path(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("conformance") / "stats.json"


@pytest.fixture(scope="module")
def longspec(server_pool, plain, stats_path):
    # The cost-aware router off: on an idle machine it may rightly find that verifying sampled
    # drafts does not pay and refuse them, and this module tests the law under verification (the
    # router's refusals have their own tests). The router picks each request's draft shape (a
    # chain or a tree) every step (issue 30): the law must hold under both.
    return server_pool.get(LONGSPEC_ARGS + ("--longspec-cost-aware", "false",
                                            "--longspec-draft-shape", "auto"),
                           env={"LONGSPEC_STATS_FILE": str(stats_path)})


def read_stats(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.mark.server
def test_seeded_sampling_follows_plain_decodings_law(longspec, plain, stats_path):
    """Seeded requests sample from plain decoding's law, the first token included (it used to be
    drawn from the softmax of probabilities: nearly uniform), while drafts are verified and
    accepted, chains and trees as the router chose them per request and step; unseeded requests
    too; the control (temperature 0.7 against 1) must fail."""
    before = read_stats(stats_path)
    spec, unseeded = seeded_samples(longspec, unseeded_too=True)
    after = read_stats(stats_path)
    ps = p_values(spec, plain["seeded"])
    ps_unseeded = p_values(unseeded, plain["seeded"])
    control = p_values(plain["biased"], plain["seeded"])
    alpha = 1e-3 / len(ps)
    print(f"\nseeded LONGSPEC vs plain: min p {min(ps):.3g} {[round(p, 4) for p in ps]}"
          f"\nunseeded LONGSPEC vs plain: min p {min(ps_unseeded):.3g} "
          f"{[round(p, 4) for p in ps_unseeded]}"
          f"\ncontrol (plain T=0.7 vs T=1): min p {min(control):.3g} "
          f"{[round(p, 4) for p in control]}")
    assert min(ps) > alpha, ps
    assert min(ps_unseeded) > alpha, ps_unseeded
    assert min(control) < alpha, control
    none = [0, 0, 0]  # [verified drafts, draft tokens, accepted tokens] of a source not yet seen
    verified = after["by_source"].get("suffix", none)[0] - before["by_source"].get("suffix", none)[0]
    drafted = after["by_source"].get("suffix", none)[1] - before["by_source"].get("suffix", none)[1]
    assert verified > 0 and drafted / verified >= 2.0, (verified, drafted, after)  # multi-token drafts
    assert after["accepted"] - before["accepted"] >= SAMPLING_N, after  # and accepted ones
    assert after["max_verify_batch"] >= 2 and not after["fallbacks"], after
    shapes = {shape: after["by_shape"].get(shape, {}).get("drafts", 0)
              - before["by_shape"].get(shape, {}).get("drafts", 0) for shape in ("chain", "tree")}
    print(f"verified drafts by shape: {shapes}")
    assert shapes["chain"] > 0 and shapes["tree"] > 0, shapes  # both shapes were verified
    # A seed reproduces its sample in another batch (here: alone).
    again = longspec.generate(text=SAMPLING_PROMPT,
                              sampling_params={**SAMPLING_PARAMS, "sampling_seed": SEEDS[2]})
    assert tuple(again["output_ids"]) == spec[1]  # SEEDS[2]: the second seeded request
    assert len(set(spec)) > 1


@pytest.mark.server
def test_openai_seed_follows_plain_decodings_law(longspec, plain, stats_path):
    """The OpenAI `seed` field at temperature > 0, /v1/completions and /v1/chat/completions: the
    first tokens (joint and the first alone) follow plain decoding's law, the first token's
    logprob is plain decoding's for that token, and a seed asked twice gives the same text."""
    before = read_stats(stats_path)
    spec = openai_samples(longspec)
    for route in ("completions", "chat"):
        ours, ref = spec[route], plain["openai"][route]
        ps = [two_sample_p([t for t, _, _ in ours], [t for t, _, _ in ref]),
              two_sample_p([t[0] for t, _, _ in ours], [t[0] for t, _, _ in ref])]
        print(f"\n{route}: p-values (first {OPENAI_TOKENS} tokens, first token) {ps}")
        assert min(ps) > 1e-3 / 4, (route, ps, sorted(ours)[:10], sorted(ref)[:10])
        plain_lp = {t[0]: lp for t, lp, _ in ref}
        common = [(t[0], lp) for t, lp, _ in ours if t[0] in plain_lp]
        assert len(common) >= OPENAI_N // 2, route
        for tok, lp in common:
            assert abs(lp - plain_lp[tok]) <= 1e-3, (route, tok, lp, plain_lp[tok])
        assert spec[route + "_again"][2] == ours[7][2], route  # seed 7, asked twice
    # Seeded requests always take LONGSPEC's verify path (their draws use the seeded uniforms),
    # with or without drafts: requests of 3 tokens leave the router little to draft (the law
    # test above is where drafts are verified and accepted).
    after = read_stats(stats_path)
    assert after["rule_steps"] > before["rule_steps"] and not after["fallbacks"], after


@pytest.mark.server
@pytest.mark.parametrize("case", PENALTY_CASES, ids=[c[0] for c in PENALTY_CASES])
def test_penalties_and_bias_greedy_identical_to_plain(longspec, plain, stats_path, case):
    """Greedy under each penalty / logit bias (alone and combined) equals plain decoding, on a
    prompt where the parameter changes plain decoding's output, while drafts are accepted."""
    name, prompt, params, n, accepts = case
    ref, ref_without = plain["penalties"][name]
    assert ref["output_ids"] != ref_without["output_ids"], (name, ref["text"])
    before = read_stats(stats_path)
    out = longspec.generate(text=prompt, sampling_params={"temperature": 0, "max_new_tokens": n,
                                                          **params})
    after = read_stats(stats_path)
    assert out["output_ids"] == ref["output_ids"], (name, ref["text"], out["text"])
    own = out["meta_info"]["longspec"][0]
    assert own["verify_steps"] > 0, (name, own)  # penalties: every step on the verify path
    if accepts:
        assert sum(own["accepted"].values()) > 0, (name, own)
    assert after["rule_steps"] > before["rule_steps"] and not after["fallbacks"], (name, after)
