"""End-to-end tests against a real SGLang server on the embedded SmolLM2-135M-Instruct (float32).

- greedy output of the server equals Hugging Face transformers greedy, token for token;
- the OpenAI-compatible endpoints (chat, completions, streaming SSE) and native /generate work;
- NGRAM speculative decoding gives output identical to plain decoding, with drafts accepted.

Test order matters for cost: the HF reference runs before any server starts, then all plain-server
tests, then the NGRAM server (one server alive at a time; see conftest.py).
"""

from __future__ import annotations

import json
import os

import pytest
import requests

from conftest import NGRAM_ARGS, REQUEST_TIMEOUT

pytestmark = pytest.mark.server

MAX_NEW_TOKENS = int(os.environ.get("LONGSPEC_TEST_NEW_TOKENS", "48"))

# (kind, text): "chat" prompts go through the model's chat template, "raw" ones are plain text.
# Several repeat text (lists, code, records) so that NGRAM drafts get accepted.
PROMPTS: list[tuple[str, str]] = [
    ("chat", "What is the capital of France? Answer in one sentence."),
    ("chat", "Write a Python function that returns the factorial of n."),
    ("chat", "Explain what a hash table is to a beginner."),
    ("chat", "Repeat this list exactly, twice: apple, banana, cherry, apple, banana, cherry."),
    ("chat", "Here is my code:\n```python\nfor i in range(10):\n    print(i)\n```\n"
             "Rewrite it so that it prints only the even numbers."),
    ("raw", "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy "
            "dog. The quick brown fox"),
    ("raw", "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\n"
            "def mul(a, b):\n"),
    ("raw", "Once upon a time, in a small village by the sea,"),
    ("raw", "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,"),
    ("raw", '{"name": "Alice", "age": 30, "city": "Paris"}\n'
            '{"name": "Bob", "age": 25, "city": "London"}\n{"name": "Carol",'),
]

CHAT_MESSAGES = [{"role": "user", "content": "List the days of the week, one per line."}]
CHAT_MAX_TOKENS = 32
SHORT = 12  # new tokens for the endpoint tests

_CACHE: dict = {}  # results shared between tests of this module


def _strip_eos(ids: list[int], eos: set[int]) -> list[int]:
    for i, t in enumerate(ids):
        if t in eos:
            return ids[:i]
    return list(ids)


@pytest.fixture(scope="session")
def model_path() -> str:
    from sgl_longspec.tools.models import ensure_embedded_model

    return str(ensure_embedded_model())


@pytest.fixture(scope="session")
def tokenizer(model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


@pytest.fixture(scope="session")
def eos_ids(tokenizer, model_path) -> set[int]:
    from transformers import GenerationConfig

    ids = {tokenizer.eos_token_id}
    eos = GenerationConfig.from_pretrained(model_path).eos_token_id
    ids.update(eos if isinstance(eos, list) else [eos])
    return {i for i in ids if i is not None}


@pytest.fixture(scope="session")
def prompt_ids(tokenizer) -> list[list[int]]:
    out = []
    for kind, text in PROMPTS:
        if kind == "chat":
            ids = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                add_generation_prompt=True, tokenize=True)
            if hasattr(ids, "keys"):  # transformers 5 may return a BatchEncoding
                ids = ids["input_ids"]
        else:
            ids = tokenizer(text)["input_ids"]
        out.append([int(t) for t in ids])
    return out


@pytest.fixture(scope="session")
def hf_greedy(model_path, prompt_ids, eos_ids, server_pool) -> list[list[int]]:
    """Hugging Face transformers greedy continuation of every prompt (float32, batch of one)."""
    import torch
    from transformers import AutoModelForCausalLM

    with server_pool.paused():  # an idle SGLang scheduler would steal one of the two cores
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
        outs = []
        with torch.inference_mode():
            for ids in prompt_ids:
                x = torch.tensor([ids])
                y = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                   max_new_tokens=MAX_NEW_TOKENS, pad_token_id=min(eos_ids))
                outs.append(_strip_eos(y[0, len(ids):].tolist(), eos_ids))
        del model
    return outs


def _server_greedy(srv, prompt_ids, eos_ids) -> tuple[list[list[int]], list[dict]]:
    """One request at a time (batch composition never changes the numerics)."""
    outs, metas = [], []
    for ids in prompt_ids:
        r = srv.generate(input_ids=ids,
                         sampling_params={"temperature": 0, "max_new_tokens": MAX_NEW_TOKENS})
        assert r["meta_info"]["completion_tokens"] == len(r["output_ids"])
        outs.append(_strip_eos([int(t) for t in r["output_ids"]], eos_ids))
        metas.append(r["meta_info"])
    return outs, metas


def _chat_stream(srv) -> str:
    parts = []
    for chunk in srv.openai_client().chat.completions.create(
            model="default", messages=CHAT_MESSAGES, max_tokens=CHAT_MAX_TOKENS, temperature=0,
            stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
    return "".join(parts)


@pytest.fixture
def vanilla_greedy(launch_server, prompt_ids, eos_ids):
    if "vanilla" not in _CACHE:
        srv = launch_server(())
        outs, _ = _server_greedy(srv, prompt_ids, eos_ids)
        _CACHE["vanilla"] = outs
        _CACHE["vanilla_chat_response"] = srv.openai_client().chat.completions.create(
            model="default", messages=CHAT_MESSAGES, max_tokens=CHAT_MAX_TOKENS, temperature=0)
        _CACHE["vanilla_chat"] = _CACHE["vanilla_chat_response"].choices[0].message.content
    return _CACHE["vanilla"]


def _first_diff(a: list[int], b: list[int]) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b)) if len(a) != len(b) else -1


def _report_mismatches(name_a, outs_a, name_b, outs_b, tokenizer) -> list[str]:
    bad = []
    for (kind, text), a, b in zip(PROMPTS, outs_a, outs_b):
        if a != b:
            i = _first_diff(a, b)
            bad.append(f"[{kind}] {text[:40]!r}: first difference at token {i}\n"
                       f"  {name_a}: {tokenizer.decode(a)!r}\n  {name_b}: {tokenizer.decode(b)!r}")
    return bad


# ---------------------------------------------------------------- plain server


def test_greedy_matches_hf_token_for_token(hf_greedy, vanilla_greedy, tokenizer):
    assert len(PROMPTS) >= 10
    bad = _report_mismatches("HF", hf_greedy, "SGLang", vanilla_greedy, tokenizer)
    assert not bad, "\n".join(bad)
    assert sum(len(o) for o in vanilla_greedy) >= 5 * len(PROMPTS)  # real continuations


def test_generate_text_matches_input_ids(server, tokenizer, prompt_ids, vanilla_greedy):
    """/generate with text (server-side tokenisation) gives the same ids as with input_ids."""
    i = next(i for i, (kind, _) in enumerate(PROMPTS) if kind == "raw")
    r = server.generate(text=PROMPTS[i][1], sampling_params={"temperature": 0,
                                                             "max_new_tokens": SHORT})
    assert r["output_ids"] == vanilla_greedy[i][:SHORT]
    assert r["text"] == tokenizer.decode(r["output_ids"], skip_special_tokens=True)
    assert r["meta_info"]["prompt_tokens"] == len(prompt_ids[i])
    assert r["meta_info"]["completion_tokens"] == SHORT
    assert r["meta_info"]["finish_reason"]["type"] == "length"


def test_generate_streaming_sse(server, prompt_ids, vanilla_greedy, tokenizer):
    i = len(PROMPTS) - 1
    payload = {"input_ids": prompt_ids[i], "stream": True,
               "sampling_params": {"temperature": 0, "max_new_tokens": SHORT}}
    chunks = []
    with requests.post(server.base_url + "/generate", json=payload, stream=True,
                       timeout=REQUEST_TIMEOUT) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines(decode_unicode=True):
            if not line:
                continue
            assert line.startswith("data: "), line
            data = line[len("data: "):]
            if data == "[DONE]":
                break
            chunks.append(json.loads(data))
        else:
            pytest.fail("stream ended without data: [DONE]")
    assert len(chunks) >= 2  # really streamed, not one final message
    assert chunks[-1]["output_ids"] == vanilla_greedy[i][:SHORT]
    assert chunks[-1]["text"] == tokenizer.decode(vanilla_greedy[i][:SHORT])
    assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "length"


def test_openai_chat_completions(server, vanilla_greedy):
    r = _CACHE["vanilla_chat_response"]  # made by vanilla_greedy on this server
    assert r.object == "chat.completion"
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert 0 < r.usage.completion_tokens <= CHAT_MAX_TOKENS
    assert r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_openai_chat_streaming(server, vanilla_greedy):
    assert _chat_stream(server) == _CACHE["vanilla_chat"]


def test_openai_completions_and_streaming(server):
    client = server.openai_client()
    prompt = "The capital of Italy is"
    r = client.completions.create(model="default", prompt=prompt, max_tokens=SHORT,
                                  temperature=0)
    assert r.object == "text_completion"
    text = r.choices[0].text
    assert text.strip()
    assert r.usage.completion_tokens == SHORT and r.choices[0].finish_reason == "length"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="default", prompt=prompt, max_tokens=SHORT, temperature=0, stream=True)
        if c.choices)
    assert streamed == text


def test_openai_models_endpoint(server):
    ids = [m.id for m in server.openai_client().models.list().data]
    assert ids == [server.model_path]  # served model name defaults to the model path


# ---------------------------------------------------------------- NGRAM speculative decoding


def test_ngram_greedy_identical_to_plain(vanilla_greedy, ngram_server, prompt_ids, eos_ids,
                                         tokenizer):
    outs, metas = _server_greedy(ngram_server, prompt_ids, eos_ids)
    bad = _report_mismatches("plain", vanilla_greedy, "NGRAM", outs, tokenizer)
    assert not bad, "\n".join(bad)
    # Drafts must actually be accepted somewhere, or the comparison proves nothing.
    accept = [m.get("spec_accept_length", 0.0) for m in metas]
    correct = sum(m.get("spec_num_correct_drafts", 0) for m in metas)
    assert all("spec_verify_ct" in m for m in metas), metas[0]
    assert correct > 0 and max(accept) > 1.5, f"accept lengths {accept}"
    _CACHE["ngram_accept"] = accept


def test_ngram_openai_chat_streaming(ngram_server):
    assert "vanilla_chat" in _CACHE
    assert _chat_stream(ngram_server) == _CACHE["vanilla_chat"]
