"""LONGSPEC as a speculative algorithm of its own in SGLang's registry (public route only).

`SpeculativeAlgorithm.register("LONGSPEC", spec_class=LongSpecAlgo)`: the spec class answers SGLang's
capability hooks for what LONGSPEC is, a host-drafted algorithm without draft KV, and not an NGRAM
in disguise (`is_ngram()` stays False, so none of NGRAM's scheduler branches run for it).
`handle_server_args` gives a bare `python -m sglang.launch_server --speculative-algorithm
LONGSPEC` sane defaults: the verify window from --longspec-max-spec-tokens, LONGSPEC's attention
backend for the device, and the synchronous schedule (see below).
"""

from __future__ import annotations

import logging
import os

from sgl_longspec.adapter import sglang_compat
from sgl_longspec.config import LongSpecConfig

logger = logging.getLogger("sgl_longspec")

ALGORITHM_NAME = "LONGSPEC"

# Why not the overlap schedule: LONGSPEC drafts on the host from each request's committed tokens
# (suffix index, router record), which under overlap are one step behind when the next step is
# prepared; its verify also runs the rejection sampler on the host. Supporting overlap means
# drafting from the relayed accept buffers as NGRAM does, a GPU-only change that has not run yet.
# SGLang's CPU engine runs every speculative algorithm synchronously anyway.
SUPPORTS_OVERLAP = False

# Whether plain decoding with this server's flags runs SGLang's overlap schedule (SGLang's default;
# "0" with --disable-overlap-schedule). SGLang's penalizers count different tokens under the two
# schedules (sgl_longspec.verify.logit_rules), and a LONGSPEC request is penalised as plain decoding on
# the same flags is. Set by configure_server_args in the launcher, inherited by the schedulers.
PLAIN_OVERLAP_ENV = "LONGSPEC_PLAIN_OVERLAP"


def plain_runs_overlap() -> bool:
    return os.environ.get(PLAIN_OVERLAP_ENV, "1") != "0"


def _spec_class():
    base = sglang_compat.name("CustomSpecAlgo")

    class LongSpecAlgo(base):
        def has_draft_kv(self) -> bool:
            return False  # drafts live in the verify pass only: one KV slot per draft token

        def supports_mixed_chunk(self) -> bool:
            return False

        def handle_server_args(self, server_args) -> None:
            configure_server_args(server_args)

    # SGLang 0.5.23's CustomSpecAlgo lacks three methods that its scheduler calls for every
    # algorithm (init_disaggregation, overlap set-up); defined only where the base lacks them.
    if not hasattr(base, "carries_draft_hidden_states"):
        LongSpecAlgo.carries_draft_hidden_states = lambda self: False
    if not hasattr(base, "need_topk"):
        LongSpecAlgo.need_topk = lambda self: False
    if not hasattr(base, "create_future_map"):
        def create_future_map(self, device, req_to_token_pool, needs_cpu_seq_lens=True,
                              needs_confidence_relay=False):
            FutureMap = sglang_compat.name("FutureMap")
            return FutureMap(device, self, req_to_token_pool, needs_cpu_seq_lens,
                             needs_confidence_relay)

        LongSpecAlgo.create_future_map = create_future_map
    return LongSpecAlgo


def configure_server_args(server_args) -> None:
    """SGLang's per-algorithm server-args hook (it records what is assigned here)."""
    from sgl_longspec.attention.registration import select_backend

    cfg = LongSpecConfig.from_env()
    from_draft_flag = bool(server_args.speculative_draft_model_path and not cfg.drafter_path)
    if from_draft_flag:
        # The OWL checkpoint may come as SGLang's own draft-model flag.
        cfg.drafter_path = str(server_args.speculative_draft_model_path)
    window = server_args.speculative_num_draft_tokens
    if window is None:
        window = cfg.max_spec_tokens + 1
    cfg.validate(int(window))
    # Only a configuration that passed reaches the environment the scheduler processes inherit.
    server_args.speculative_num_draft_tokens = window
    if from_draft_flag:
        cfg.to_env()
    device = str(server_args.device or "cuda")
    # The user's choice, not the default SGLang resolved before this hook (fa3 on an H100, say):
    # a LONGSPEC server picks its own backend unless told otherwise.
    asked = sglang_compat.user_value(server_args, "attention_backend")
    backend = select_backend("cpu" if device == "cpu" else "cuda", asked)
    if backend != server_args.attention_backend:
        logger.info("LONGSPEC: attention backend %s (asked: %s, SGLang's default: %s)", backend,
                    asked, server_args.attention_backend)
    server_args.attention_backend = backend
    if device != "cpu":
        _eager_decode_on_cuda(server_args)
    # Recorded before LONGSPEC forces the synchronous schedule: plain decoding on these flags
    # (the reference a LONGSPEC request must match) penalises by its own schedule's rule.
    os.environ[PLAIN_OVERLAP_ENV] = "0" if server_args.disable_overlap_schedule else "1"
    if not SUPPORTS_OVERLAP and not server_args.disable_overlap_schedule:
        server_args.disable_overlap_schedule = True
    server_args.enable_mixed_chunk = False


def _eager_decode_on_cuda(server_args) -> None:
    """Decode steps run without CUDA graphs on a LONGSPEC server (issue 28). SGLang captures a
    speculative algorithm's decode graphs as fixed-width TARGET_VERIFY steps with the
    algorithm's verify input, which a LONGSPEC step is not: its verify widths are ragged and its
    steps that verify nothing are plain one-token DECODE steps, which those graphs would replay
    wrongly. Until LONGSPEC captures graphs of its own (plain decode graphs for the steps that
    draft nothing), decode runs eagerly; prefill graphs are SGLang's and stay."""
    graphs = server_args.cuda_graph_config
    Phase, Backend = sglang_compat.name("Phase"), sglang_compat.name("Backend")
    if graphs is None or getattr(graphs, Phase.DECODE).backend == Backend.DISABLED:
        return
    server_args.cuda_graph_config = sglang_compat.name("with_phase")(
        graphs, Phase.DECODE, backend=Backend.DISABLED)
    logger.warning("LONGSPEC: decode CUDA graphs off (the steps run eagerly): SGLang's graphs for "
                   "a speculative algorithm replay fixed-width verify steps, and LONGSPEC's are "
                   "ragged (sgl-longspec issue 28)")


# ---- req_to_token rows that hold what each decode step reserves --------------------------------
# At every decode step SGLang's speculative preparation (eagle_prepare_for_decode, which LONGSPEC
# goes through like NGRAM) reserves KV slots up to committed + get_alloc_reserve_per_decode() (twice
# the verify window: a double buffer for its overlap schedule), rounded up to a page, and writes
# them into the request's req_to_token row. The row is the context length plus
# get_req_to_token_extra_context_len(): 4 + window at page size 1, widened to the reservation only
# for UNO and for pages > 1. At page 1 the reservation therefore ran up to window - 4 columns past
# the row once a request neared the end of the context, and the scheduler died (issue 34). A
# LONGSPEC server sizes its rows the way SGLang sizes them for UNO: reservation + page - 1.

def serving_longspec() -> bool:
    """Whether this process serves --speculative-algorithm LONGSPEC (SGLang's resolved config)."""
    algo = sglang_compat.name("get_spec")().speculative_algorithm
    return algo is not None and str(algo).upper() == ALGORITHM_NAME


def req_to_token_headroom() -> int:
    """Columns a LONGSPEC request's req_to_token row needs past the context length: the slots a
    decode step reserves past the committed length, plus the rounding to a page."""
    reserve = int(sglang_compat.name("get_alloc_reserve_per_decode")())
    return reserve + int(sglang_compat.name("get_alloc_page_size")()) - 1


def _widen_req_to_token_rows(original, *args, **kwargs):
    """AROUND hook on the pool builder's row headroom: at least req_to_token_headroom() on a
    LONGSPEC server; every other server keeps SGLang's own value."""
    extra = original(*args, **kwargs)
    if not serving_longspec():
        return extra
    return max(int(extra), req_to_token_headroom())


def register_row_sizing() -> None:
    """Hook the req_to_token row sizing (plugin.register: once per process, before SGLang applies
    the hooks and before any pool is built)."""
    sglang_compat.hook(sglang_compat.REQ_TO_TOKEN_EXTRA, _widen_req_to_token_rows, "AROUND")


def register_longspec_algorithm() -> None:
    """Register LONGSPEC (idempotent: SGLang calls plugins in every process)."""
    if sglang_compat.algorithm_registered(ALGORITHM_NAME):
        return

    def factory(server_args):
        from sgl_longspec.adapter.worker import LongSpecWorker

        return LongSpecWorker

    sglang_compat.name("SpeculativeAlgorithm").register(
        ALGORITHM_NAME, supports_overlap=SUPPORTS_OVERLAP, spec_class=_spec_class())(factory)


def register_unsupported(problem: str) -> None:
    """Under an unsupported SGLang: register LONGSPEC, if the registry can still be reached, with
    a validator that stops the server start with `problem`; plain servers start as usual."""
    try:
        SpeculativeAlgorithm = sglang_compat.name("SpeculativeAlgorithm")
    except (ImportError, sglang_compat.SGLangVersionError):
        return  # no registry at all: SGLang will answer "unknown algorithm"; the log says why

    def refuse(server_args):
        raise ValueError(f"--speculative-algorithm {ALGORITHM_NAME}: {problem}")

    def factory(server_args):
        refuse(server_args)

    try:
        SpeculativeAlgorithm.register(ALGORITHM_NAME, validate_server_args=refuse)(factory)
    except Exception as e:
        logger.error("sgl-longspec: cannot register %s either: %s", ALGORITHM_NAME, e)
