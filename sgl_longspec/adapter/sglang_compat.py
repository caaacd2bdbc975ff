"""Every SGLang name sgl-longspec uses, in one place, behind a version check.

The rest of the package imports SGLang only through this module (tests/test_plugin.py checks it,
the attention backends' base classes included). When
SGLang moves a name, this file is the one to change; when SGLang is outside the supported range,
`check_version()` says so by name instead of failing somewhere deep in the scheduler.

What is used, and why it is public enough:
- `SpeculativeAlgorithm.register` / `from_string` and the `CustomSpecAlgo` hooks (spec_info.py):
  the plugin route for speculative algorithms.
- `register_attention_backend` and `add_attention_backend_choices`: the attention registry.
- `HookRegistry`: the plugin framework's hooks (extra CLI flags, request validation).
- The speculative worker protocol (`BaseSpecWorker`, `GenerationBatchResult`, `ForwardMode`,
  `CaptureHiddenMode`) and the helpers SGLang's own speculative workers share
  (`assign_extend_cache_locs_func`, `move_accept_tokens_to_target_kvcache`,
  `compute_spec_logprobs`, `NgramVerifyInput` as the draft input the batch carries between
  steps, `SpecInput`/`SpecInputType` as the base and tag of LONGSPEC's own verify input).
"""

from __future__ import annotations

import functools
import importlib
from importlib import metadata

# The SGLang releases this package is written and tested against: [min, max).
SUPPORTED_MIN = (0, 5, 23)
SUPPORTED_MAX = (0, 5, 24)
SUPPORTED_RANGE = ">=0.5.23,<0.5.24"


class SGLangVersionError(RuntimeError):
    pass


def _parse(version: str) -> tuple[int, ...]:
    parts = []
    for p in version.split("+")[0].split("."):
        digits = "".join(ch for ch in p if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
        if not p.isdigit():  # 0.5.24rc1 -> (0, 5, 24)
            break
    return tuple(parts)


def installed_version() -> str | None:
    try:
        return metadata.version("sglang")
    except metadata.PackageNotFoundError:
        return None


def version_problem(version: str | None = None) -> str | None:
    """Why the installed SGLang cannot be used (None when it can)."""
    version = installed_version() if version is None else version
    if version is None:
        return f"sglang is not installed (sgl-longspec needs sglang{SUPPORTED_RANGE})"
    v = _parse(version)
    if not (SUPPORTED_MIN <= v < SUPPORTED_MAX):
        return (f"sgl-longspec supports sglang{SUPPORTED_RANGE}, but sglang {version} is "
                "installed; install a supported SGLang or an sgl-longspec release for this one")
    return None


def check_version() -> None:
    problem = version_problem()
    if problem:
        raise SGLangVersionError(problem)


# ---- names --------------------------------------------------------------------------------
# Resolved lazily: importing SGLang's scheduler modules is slow and, in the launcher process,
# must happen after the CPU environment is prepared.

_NAMES = {
    "SpeculativeAlgorithm": "sglang.srt.speculative.spec_info",
    "CustomSpecAlgo": "sglang.srt.speculative.spec_info",
    "BaseSpecWorker": "sglang.srt.speculative.base_spec_worker",
    "NgramVerifyInput": "sglang.srt.speculative.ngram_info",
    # the base of LONGSPEC's verify input (sgl_longspec.adapter.verify_input) and its phase tag
    "SpecInput": "sglang.srt.speculative.spec_info",
    "SpecInputType": "sglang.srt.speculative.spec_info",
    "move_accept_tokens_to_target_kvcache": "sglang.srt.speculative.spec_utils",
    "compute_spec_logprobs": "sglang.srt.layers.logprob_processor",
    "apply_custom_logit_processor": "sglang.srt.layers.sampler",
    # read once by the sampler at import: its returned logprobs ignore the temperature
    "SGLANG_RETURN_ORIGINAL_LOGPROB": "sglang.srt.layers.sampler",
    "assign_extend_cache_locs_func": "sglang.kernels.ops.speculative.cache_locs",
    "GenerationBatchResult": "sglang.srt.managers.utils",
    "ForwardMode": "sglang.srt.model_executor.forward_batch_info",
    # The attention backends LONGSPEC's own subclass (sgl_longspec.attention), and what their
    # forward calls take.
    "TorchNativeAttnBackend": "sglang.srt.layers.attention.torch_native_backend",
    "FlashInferAttnBackend": "sglang.srt.layers.attention.flashinfer_backend",
    "FlashInferMLAAttnBackend": "sglang.srt.layers.attention.flashinfer_mla_backend",
    "AttentionType": "sglang.srt.layers.radix_attention",
    "RadixAttention": "sglang.srt.layers.radix_attention",
    "KVWriteLoc": "sglang.srt.mem_cache.memory_pool",
    # The overlap scheduler's future map, for SGLang builds whose algorithm base lacks the factory.
    "FutureMap": "sglang.srt.managers.overlap_utils",
    "CaptureHiddenMode": "sglang.srt.model_executor.forward_batch_info",
    "get_device": "sglang.srt.runtime_context",
    "get_spec": "sglang.srt.runtime_context",
    "get_tp_group": "sglang.srt.distributed",
    # KV slots reserved past each request's committed length at every speculative decode step
    # (eagle_prepare_for_decode), and the page size it is rounded to: the req_to_token row must
    # hold them (sgl_longspec.adapter.algorithm.req_to_token_headroom).
    "get_alloc_reserve_per_decode": "sglang.srt.mem_cache.allocation_sizing",
    "get_alloc_page_size": "sglang.srt.mem_cache.allocation_sizing",
    # CUDA graph phases: a LONGSPEC server on CUDA hands the resolution a copy of the graph
    # config with its decode phase changed (sgl_longspec.adapter.algorithm).
    "with_phase": "sglang.srt.model_executor.cuda_graph_config",
    "Phase": "sglang.srt.model_executor.cuda_graph_config",
    "Backend": "sglang.srt.model_executor.cuda_graph_config",
    "register_attention_backend": "sglang.srt.layers.attention.attention_registry",
    "ATTENTION_BACKENDS": "sglang.srt.layers.attention.attention_registry",
    "add_attention_backend_choices": "sglang.srt.server_args",
    "HookRegistry": "sglang.srt.plugins.hook_registry",
    "HookType": "sglang.srt.plugins.hook_registry",
    # The external-corpus messages between the tokenizer manager and the schedulers.
    "AddExternalCorpusReqOutput": "sglang.srt.managers.io_struct",
    "RemoveExternalCorpusReqInput": "sglang.srt.managers.io_struct",
    "RemoveExternalCorpusReqOutput": "sglang.srt.managers.io_struct",
    "ListExternalCorporaReqInput": "sglang.srt.managers.io_struct",
    "ListExternalCorporaReqOutput": "sglang.srt.managers.io_struct",
}


@functools.cache
def name(attr: str):
    """The SGLang object `attr` (one of _NAMES), imported on first use."""
    module = importlib.import_module(_NAMES[attr])
    try:
        return getattr(module, attr)
    except AttributeError as e:
        raise SGLangVersionError(
            f"sglang {installed_version()} has no {_NAMES[attr]}.{attr}; "
            f"sgl-longspec supports sglang{SUPPORTED_RANGE}") from e


def __getattr__(attr: str):  # `from sgl_longspec.adapter.sglang_compat import ForwardMode`
    if attr in _NAMES:
        return name(attr)
    raise AttributeError(attr)


# ---- registries ---------------------------------------------------------------------------

def algorithm_registered(algo: str) -> bool:
    try:
        name("SpeculativeAlgorithm").from_string(algo)
    except ValueError:
        return False
    return True


def attention_backend_registered(backend: str) -> bool:
    return backend in name("ATTENTION_BACKENDS")


def add_backend(backend: str, factory) -> None:
    """Register an attention backend under a new name (idempotent) and let the CLI accept it."""
    if attention_backend_registered(backend):
        return
    name("register_attention_backend")(backend)(factory)
    name("add_attention_backend_choices")([backend])


def user_value(server_args, field: str):
    """What the user gave for `field`, before SGLang's resolution filled its defaults in (SGLang
    0.5.23 keeps the input in `_raw_input` and resolves `attention_backend` ahead of the
    speculative hook); the current value where there is no such record."""
    raw = getattr(server_args, "_raw_input", None)
    if isinstance(raw, dict) and field in raw:
        return raw[field]
    return getattr(server_args, field)


def hook(target: str, fn, kind: str) -> None:
    """HookRegistry.register(target, fn, HookType[kind]) for 'BEFORE' / 'AFTER' / 'AROUND'."""
    name("HookRegistry").register(target, fn, getattr(name("HookType"), kind))


# Hook targets (dotted paths into SGLang), kept here with the other names.
ADD_CLI_ARGS = "sglang.srt.server_args.ServerArgs.add_cli_args"
FROM_CLI_ARGS = "sglang.srt.server_args.ServerArgs.from_cli_args"
VALIDATE_REQUEST = "sglang.srt.managers.tokenizer_manager.TokenizerManager._validate_one_request"
# The external-corpus calls (sgl_longspec.adapter.corpus_endpoints): TokenizerManager.<call> on the HTTP
# side, Scheduler.<call> where the worker and its corpus live.
CORPUS_CALLS = ("add_external_corpus", "remove_external_corpus", "list_external_corpora")
TOKENIZER_MANAGER = "sglang.srt.managers.tokenizer_manager.TokenizerManager"
# The width of the req_to_token rows past the context length, where the pool builder reads it
# (the name as bound in that module, so the hook holds whatever the import order).
REQ_TO_TOKEN_EXTRA = ("sglang.srt.mem_cache.kv_cache_configurator."
                      "get_req_to_token_extra_context_len")
SCHEDULER = "sglang.srt.managers.scheduler.Scheduler"


# ---- the server's load, for the router (Router.draft_budget) ------------------------------
# SGLang gives a speculative worker the running batch, not the scheduler: the number of requests
# waiting for admission is read by a BEFORE hook on the scheduler's per-iteration batch choice
# (in the scheduler process, the worker's own), the KV headroom from the batch's own pool.
NEXT_BATCH = "sglang.srt.managers.scheduler.Scheduler.get_next_batch_to_run"
_waiting = [0]


def _record_waiting(scheduler, *args, **kwargs):
    _waiting[0] = len(getattr(scheduler, "waiting_queue", None) or ())
    return None  # the arguments unchanged


def register_load_hook() -> None:
    hook(NEXT_BATCH, _record_waiting, "BEFORE")


def waiting_requests() -> int:
    """Requests in the scheduler's waiting queue at the start of this scheduling iteration."""
    return _waiting[0]


def kv_headroom(batch) -> tuple[int | None, int | None]:
    """(KV slots free or evictable from the radix cache, the pool's size) of a ScheduleBatch;
    (None, None) where the batch does not say."""
    alloc = getattr(batch, "token_to_kv_pool_allocator", None)
    try:
        free = int(alloc.available_size())
        total = int(alloc.size)
    except Exception:  # noqa: BLE001 - an allocator without these: no KV limit from it
        return None, None
    cache = getattr(batch, "tree_cache", None)
    try:
        free += int(cache.evictable_size())
    except Exception:  # noqa: BLE001 - no prefix cache (--disable-radix-cache): nothing evictable
        pass
    return free, total


# ---- what SGLang's sampler leaves behind (sgl_longspec.adapter.worker reads it) -----------------
# Sampler.forward (srt/layers/sampler.py, 0.5.23) works IN PLACE on
# `logits_output.next_token_logits`. After penalties, grammar mask and logit bias
# (ModelRunner._preprocess_logits) and custom processors, its standard path for a batch that is
# not all greedy does `logits.div_(temperatures)`, then `logits[:] = softmax(logits)`,
# `probs = logits`: the tensor ends up holding softmax(processed logits / T), probabilities
# BEFORE top-k / top-p / min-p, not logits. The token it returns is drawn from those filtered, and
# the logprob it returns for a token is `torch.log(probs)[token]` (log_softmax of the processed
# logits without temperature when SGLANG_RETURN_ORIGINAL_LOGPROB is set). An all-greedy batch is
# argmaxed and its logits stay logits. Other paths (the Ascend backend, the RL on-policy
# deterministic path) leave other things there; deterministic inference batches are left to
# SGLang's sampler altogether (adapter.request_params.batch_needs_engine_sampler).

def sampled_probs(sampler, sampling_info, tensor):
    """The probabilities a non-greedy batch was sampled from, as Sampler.forward left them in
    `next_token_logits` (above), or None where that is not what the tensor holds: an all-greedy
    batch, a sampler on another path, or rows that are not probability vectors (checked:
    finite, non-negative, summing to 1 within 1e-3)."""
    import torch

    if tensor is None or sampling_info.is_all_greedy:
        return None
    if getattr(sampler, "use_ascend_backend", False):
        return None
    if getattr(sampler, "rl_on_policy_target", None) is not None:
        return None
    x = tensor.float()
    if not bool(torch.isfinite(x).all()) or bool((x < 0).any()):
        return None
    if not bool(((x.sum(dim=-1) - 1.0).abs() < 1e-3).all()):
        return None
    return x


def sampled_token_logprobs(probs, tokens, temperatures):
    """The logprob SGLang's sampler returns for `tokens` drawn from rows `probs` (sampled_probs)
    at `temperatures` ([rows] or [rows, 1]): log p[token], or with SGLANG_RETURN_ORIGINAL_LOGPROB
    the log-softmax of the processed logits without temperature, which is the log-softmax of
    T * log p (the logits and T * log p differ by a per-row constant)."""
    import torch

    logp = torch.log(probs)
    if name("SGLANG_RETURN_ORIGINAL_LOGPROB"):
        logp = torch.log_softmax(logp * temperatures.reshape(-1, 1).to(logp.dtype), dim=-1)
    return logp.gather(1, tokens.view(-1, 1).to(torch.long)).view(-1)
