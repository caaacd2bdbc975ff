"""The plugin on SGLang's public contracts: own algorithm and backend names, stock backends
untouched, the --longspec-* flags on SGLang's own parser, bare-launch defaults, the version check,
the request check, and rank-0 decisions under tensor parallelism (two gloo processes)."""

from __future__ import annotations

import json
import os
import types

import numpy as np
import pytest
import torch

pytest.importorskip("sglang")

from sgl_longspec.adapter import sglang_compat  # noqa: E402
from sgl_longspec.config import ENV_VAR, LongSpecConfig  # noqa: E402


@pytest.fixture(scope="module")
def registered():
    from sgl_longspec.adapter import plugin

    plugin.register()
    plugin.register()  # idempotent
    return True


def test_own_names_and_stock_backends_untouched(registered):
    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS

    for name in ("longspec_cpu", "longspec_flashinfer"):
        assert name in ATTENTION_BACKENDS and name in ATTENTION_BACKEND_CHOICES
        assert ATTENTION_BACKEND_CHOICES.count(name) == 1
    for stock in ("torch_native", "flashinfer", "triton"):
        assert ATTENTION_BACKENDS[stock].__module__.startswith("sglang."), stock


def test_longspec_is_its_own_algorithm(registered):
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    algo = SpeculativeAlgorithm.from_string("longspec")
    assert algo.name == "LONGSPEC"
    assert not algo.is_ngram() and not algo.is_eagle() and algo.is_speculative()
    assert not algo.has_draft_kv() and not algo.supports_mixed_chunk()
    assert algo.carries_draft_hidden_states() is False and algo.need_topk() is False


@pytest.fixture
def no_config_env(monkeypatch):
    """No LONGSPEC_CONFIG during the test, and whatever the test writes there undone after it
    (a bare delenv of an absent variable records nothing to restore: the write would leak into
    every server later tests start)."""
    monkeypatch.setenv(ENV_VAR, "")
    monkeypatch.delenv(ENV_VAR)


def fake_args(**kw):
    base = dict(speculative_draft_model_path=None, speculative_num_draft_tokens=None,
                device="cpu", attention_backend=None, disable_overlap_schedule=False,
                enable_mixed_chunk=False, cuda_graph_config=None)
    base.update(kw)
    return types.SimpleNamespace(**base)


def test_server_args_defaults_for_a_bare_launch(no_config_env):
    from sgl_longspec.adapter.algorithm import configure_server_args

    a = fake_args(attention_backend="torch_native")
    configure_server_args(a)
    assert a.speculative_num_draft_tokens == LongSpecConfig().max_spec_tokens + 1
    assert a.attention_backend == "longspec_cpu" and a.disable_overlap_schedule
    b = fake_args(device="cuda")
    configure_server_args(b)
    assert b.attention_backend == "longspec_flashinfer"
    c = fake_args(device="cuda", attention_backend="flashinfer")  # the dense-mask baseline
    configure_server_args(c)
    assert c.attention_backend == "flashinfer"
    with pytest.raises(ValueError, match="attention-backend intel_amx"):
        configure_server_args(fake_args(attention_backend="intel_amx"))
    with pytest.raises(ValueError, match="--longspec-max-spec-tokens"):
        configure_server_args(fake_args(speculative_num_draft_tokens=4))


def test_draft_model_path_names_the_owl_checkpoint(no_config_env):
    from sgl_longspec.drafters.owl import shipped_checkpoint
    from sgl_longspec.adapter.algorithm import configure_server_args

    ckpt = str(shipped_checkpoint())
    configure_server_args(fake_args(speculative_draft_model_path=ckpt))
    assert LongSpecConfig.from_env().drafter_path == ckpt


def test_a_refused_draft_model_path_leaves_no_configuration_behind(no_config_env, tmp_path):
    from sgl_longspec.adapter.algorithm import configure_server_args

    missing = str(tmp_path / "no-such-checkpoint")
    a = fake_args(speculative_draft_model_path=missing)
    with pytest.raises(ValueError, match="--longspec-drafter-path.*no-such-checkpoint"):
        configure_server_args(a)
    assert not os.environ.get(ENV_VAR) and a.speculative_num_draft_tokens is None


def test_longspec_flags_on_sglangs_own_parser(registered, monkeypatch):
    from sglang.srt.plugins.hook_registry import HookRegistry
    from sglang.srt.server_args import prepare_server_args

    HookRegistry.apply_hooks()
    monkeypatch.setenv(ENV_VAR, json.dumps({"min_score": 0.5}))  # the base flags override
    prepare_server_args(["--model-path", "m", "--longspec-max-spec-tokens", "7",
                         "--longspec-draft-shape", "tree"])
    cfg = LongSpecConfig.from_env()
    assert (cfg.max_spec_tokens, cfg.draft_shape, cfg.min_score) == (7, "tree", 0.5)
    with pytest.raises(SystemExit) as e:
        prepare_server_args(["--model-path", "m", "--longspec-min-token-prob", "2"])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        prepare_server_args(["--model-path", "m", "--longspec-no-such-flag", "1"])
    # flags not given leave a hand-set configuration alone
    monkeypatch.setenv(ENV_VAR, json.dumps({"max_spec_tokens": 3}))
    prepare_server_args(["--model-path", "m"])
    assert LongSpecConfig.from_env().max_spec_tokens == 3


def test_version_check_names_the_supported_range():
    assert sglang_compat.version_problem("0.5.23") is None
    for bad in ("0.5.22", "0.6.0", "0.5.24rc1"):
        problem = sglang_compat.version_problem(bad)
        assert problem and sglang_compat.SUPPORTED_RANGE in problem and bad in problem
    assert sglang_compat.version_problem() is None  # the installed one is supported


def test_out_of_vocab_message():
    from sgl_longspec.adapter.request_checks import out_of_vocab

    assert out_of_vocab([0, 5, 9], 10) is None
    assert out_of_vocab([], 10) is None
    assert "input_ids[2] = 10" in out_of_vocab([1, 2, 10, -1], 10)
    assert "input_ids[0] = -3" in out_of_vocab([-3], 10)


# ---- tensor parallelism: rank-0 decisions over gloo ---------------------------------------------

class GlooGroup:
    """The part of SGLang's GroupCoordinator that RankZeroDecisions uses."""

    def __init__(self, rank, world_size):
        self.rank_in_group, self.world_size = rank, world_size

    def broadcast_object(self, obj=None, src=0):
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=src)
        return box[0]


def _tp_rank(rank, world_size, init_file, out_dir):
    import torch.distributed as dist

    from sgl_longspec.drafters.draft import Draft
    from sgl_longspec.adapter.tp_sync import RankZeroDecisions
    from sgl_longspec.verify.acceptance import verify_greedy

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size)
    tp = RankZeroDecisions(GlooGroup(rank, world_size))
    # Each rank "would" decide differently (its own timings, its own RNG): only rank 0's counts.
    rng = np.random.default_rng(100 + rank)
    mine = [Draft.chain(rng.integers(0, 50, 3 + rank).tolist(), source="suffix"), Draft.empty(),
            Draft([1, 2, 3], [-1, -1, 0], [0.9, 0.5, 0.4], source="owl")]
    drafts = tp.share_drafts(mine if tp.decides else None)
    logits = torch.randn(sum(1 + len(d) for d in drafts), 50,
                         generator=torch.Generator().manual_seed(rank))
    vr = verify_greedy(drafts, logits) if tp.decides else None
    vr = tp.share(vr)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"drafts": [(d.token_ids.tolist(), d.parents.tolist(), d.source) for d in drafts],
                   "tokens": vr.flat_out_tokens.tolist(), "broadcasts": tp.broadcasts}, f)
    dist.destroy_process_group()


def test_rank_zero_decisions_reach_every_rank(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_tp_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0 == r1
    assert len(r0["drafts"][0][0]) == 3  # rank 0's draft, not rank 1's (4 tokens)
    assert r0["broadcasts"] == 2


def test_single_rank_sends_nothing():
    from sgl_longspec.drafters.draft import Draft
    from sgl_longspec.adapter.tp_sync import RankZeroDecisions

    tp = RankZeroDecisions(None)
    d = [Draft.chain([1, 2])]
    assert tp.decides and tp.share_drafts(d)[0].token_ids.tolist() == [1, 2] and tp.broadcasts == 0


def test_load_readers_on_sglang_shaped_objects():
    """The two readers behind the router's Load: the scheduler hook's waiting count, and the
    batch's KV headroom (free + evictable), tolerant of objects that lack them."""
    sched = types.SimpleNamespace(waiting_queue=[object()] * 5)
    assert sglang_compat._record_waiting(sched, None, None) is None  # arguments left unchanged
    assert sglang_compat.waiting_requests() == 5
    sglang_compat._record_waiting(types.SimpleNamespace(waiting_queue=[]))
    assert sglang_compat.waiting_requests() == 0
    alloc = types.SimpleNamespace(available_size=lambda: 700, size=4096)
    batch = types.SimpleNamespace(token_to_kv_pool_allocator=alloc,
                                  tree_cache=types.SimpleNamespace(evictable_size=lambda: 300))
    assert sglang_compat.kv_headroom(batch) == (1000, 4096)
    assert sglang_compat.kv_headroom(types.SimpleNamespace(token_to_kv_pool_allocator=alloc,
                                                           tree_cache=None)) == (700, 4096)
    assert sglang_compat.kv_headroom(types.SimpleNamespace()) == (None, None)


def test_the_load_hook_targets_a_real_scheduler_method():
    import importlib
    import inspect

    module, cls, meth = sglang_compat.NEXT_BATCH.rsplit(".", 2)
    fn = getattr(getattr(importlib.import_module(module), cls), meth)
    assert list(inspect.signature(fn).parameters)[0] == "self"


def test_corpus_hooks_target_real_methods_and_leave_other_servers_to_sglang():
    """The external-corpus hooks wrap methods that exist on SGLang's tokenizer manager and
    scheduler, and hand every call of a non-LONGSPEC server (NGRAM, plain) to SGLang unchanged."""
    import asyncio
    import importlib
    import inspect

    from sgl_longspec.adapter import corpus_endpoints as ce

    for owner in (sglang_compat.TOKENIZER_MANAGER, sglang_compat.SCHEDULER):
        module, cls = owner.rsplit(".", 1)
        klass = getattr(importlib.import_module(module), cls)
        for call in sglang_compat.CORPUS_CALLS:
            assert callable(getattr(klass, call)), (owner, call)
        if owner == sglang_compat.TOKENIZER_MANAGER:  # awaited by the HTTP routes
            assert all(inspect.iscoroutinefunction(inspect.unwrap(getattr(klass, c)))
                       for c in sglang_compat.CORPUS_CALLS)
    for name in ("AddExternalCorpusReqOutput", "RemoveExternalCorpusReqInput",
                 "RemoveExternalCorpusReqOutput", "ListExternalCorporaReqInput",
                 "ListExternalCorporaReqOutput"):
        sglang_compat.name(name)

    async def original(tm, *args):
        return ("sglang", args)

    ngram = types.SimpleNamespace(server_args=types.SimpleNamespace(speculative_algorithm="NGRAM"))
    assert asyncio.run(ce._tm_add(original, ngram, "obj")) == ("sglang", ("obj",))
    assert asyncio.run(ce._tm_remove(original, ngram, "id")) == ("sglang", ("id",))
    assert asyncio.run(ce._tm_list(original, ngram)) == ("sglang", ())
    from sgl_longspec.adapter.corpus_service import CorpusService

    for call in sglang_compat.CORPUS_CALLS:  # a LONGSPEC scheduler's calls land on these
        assert callable(getattr(CorpusService, call)), call
    plain = types.SimpleNamespace(draft_worker=None)
    for call in sglang_compat.CORPUS_CALLS:
        assert ce._to_worker(call)(lambda s, r: "sglang", plain, "req") == "sglang"
    # A LONGSPEC request naming a server-side file is refused before anything is read.
    longspec = types.SimpleNamespace(server_args=types.SimpleNamespace(speculative_algorithm="LONGSPEC"))
    obj = types.SimpleNamespace(file_path="/etc/hostname", documents=None, corpus_id=None)
    out = asyncio.run(ce._tm_add(original, longspec, obj))
    assert not out.success and "file_path" in out.message


def test_prometheus_counters_follow_the_step_counters():
    """Each exported counter grows by what its step counter grew (named fields, not positions)."""
    from collections import Counter

    import prometheus_client

    from sgl_longspec.adapter.metrics import PrometheusCounters
    from sgl_longspec.step.records import Counters, ShapeCounts, SourceCounts

    prom = PrometheusCounters()
    c = Counters(verify_steps=3, plain_steps=2, by_source={"suffix": SourceCounts(2, 9, 5)},
                 by_shape={"chain": ShapeCounts(2, 9, 5, 2, 9)})
    c.fallbacks["verify"] = 1
    prom.update(c, Counter({"unprofitable": 4}))
    c.by_source["suffix"].add(3, 1)
    c.by_source["owl"] = SourceCounts(1, 4, 4)
    c.by_shape["tree"] = ShapeCounts()
    c.by_shape["tree"].add(4, 4, 2, 3)
    prom.update(c, Counter({"unprofitable": 4}))

    def value(name, **labels):
        return prometheus_client.REGISTRY.get_sample_value(f"sglang:longspec_{name}_total", labels)

    assert value("drafts", drafter="suffix") == 3 and value("draft_tokens", drafter="suffix") == 12
    assert value("accepted_tokens", drafter="suffix") == 6 and value("accepted_tokens", drafter="owl") == 4
    assert value("steps", kind="verify") == 3 and value("steps", kind="plain") == 2
    assert value("shape_drafts", shape="chain") == 2 and value("shape_drafts", shape="tree") == 1
    assert value("refusals", reason="unprofitable") == 4 and value("fallbacks", cause="verify") == 1
