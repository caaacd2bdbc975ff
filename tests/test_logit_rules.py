"""Logit rules per verified position (sgl_longspec.verify.logit_rules) against brute-force references.

- grammar_prune: a small DFA grammar with rollback; the kept nodes must be exactly those whose
  whole root path the DFA accepts (stopping below termination), the masks the DFA's allowed sets
  at each kept node, and the grammar must end in the state it started in. Also on a real xgrammar
  matcher (JSON schema) when xgrammar is installed.
- apply_penalties: each row must equal, bit for bit, what SGLang 0.5.23's own penalizer code
  (its orchestrator, ScheduleBatch.cumulate_penalty_output_tokens, SamplingBatchInfo's
  update_penalties / _apply_pre_grammar_logits_transforms, run on CPU tensors) makes of that row
  in a plain decode step after the output extended by the row's draft path, under the synchronous
  and the overlap schedule (which shifts the counted tokens onto the prompt's last token).
- a deliberately wrong rule (the root's penalties on every row, SGLang's "relaxed" speculative
  penalties) must fail the same comparison: the test can see the difference.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sgl_longspec.drafters.draft import Draft
from sgl_longspec.verify.logit_rules import (LogitRules, Penalties, StepRules, apply_penalties,
                                      grammar_prune)
from sgl_longspec.verify.acceptance import verify_greedy

V = 40
STOP = 39  # the DFA's stop token: accepting it terminates


class DfaGrammar:
    """States 0..S-1; table[s, t] = next state or -1 (forbidden); STOP allowed in final states."""

    def __init__(self, table: np.ndarray, final: set[int]):
        self.table, self.final = table, final
        self.stack = [0]
        self.terminated_at: list[bool] = [False]

    def allowed(self, state: int) -> set[int]:
        out = {t for t in range(V) if t != STOP and self.table[state, t] >= 0}
        if state in self.final:
            out.add(STOP)
        return out

    def accept_token(self, token: int) -> None:
        assert not self.terminated_at[-1]
        s = self.stack[-1]
        assert token in self.allowed(s), (s, token)
        if token == STOP:
            self.stack.append(s)
            self.terminated_at.append(True)
        else:
            self.stack.append(int(self.table[s, token]))
            self.terminated_at.append(False)

    def rollback(self, k: int) -> None:
        for _ in range(k):
            self.stack.pop()
            self.terminated_at.pop()

    def is_terminated(self) -> bool:
        return self.terminated_at[-1]

    def allocate_vocab_mask(self, vocab_size, batch_size, device):
        return torch.full((batch_size, (vocab_size + 31) // 32), -1, dtype=torch.int32)

    def fill_vocab_mask(self, vocab_mask, idx):
        bits = np.zeros(vocab_mask.shape[1] * 32, dtype=np.uint8)
        bits[list(self.allowed(self.stack[-1]))] = 1
        words = np.packbits(bits.reshape(-1, 32)[:, ::-1], axis=1, bitorder="big")
        vocab_mask[idx] = torch.from_numpy(words.view(">u4").astype(np.uint32).view(np.int32)
                                           .reshape(-1))

    def apply_vocab_mask(self, logits, vocab_mask):
        for r in range(logits.shape[0]):
            for t in range(logits.shape[1]):
                if not (int(vocab_mask[r, t >> 5]) >> (t & 31)) & 1:
                    logits[r, t] = float("-inf")


def random_grammar(seed: int, states: int = 4) -> DfaGrammar:
    rng = np.random.default_rng(seed)
    table = np.where(rng.random((states, V)) < 0.5, rng.integers(0, states, (states, V)), -1)
    return DfaGrammar(table, {s for s in range(states) if rng.random() < 0.5})


@st.composite
def trees(draw):
    n = draw(st.integers(0, 12))
    parents = [draw(st.integers(-1, i - 1)) for i in range(n)]
    tokens = [draw(st.integers(0, V - 1)) for _ in range(n)]
    return Draft(np.array(tokens, np.int64), np.array(parents, np.int32))


def brute_force_prune(draft: Draft, g: DfaGrammar):
    """Per node: kept iff every node on its path is allowed after its parent's path and no
    ancestor terminated; also the allowed set after each kept node's path (None if terminated)."""
    n = len(draft)
    paths = []
    for i, p in enumerate(draft.parents.tolist()):
        paths.append((paths[p] if p >= 0 else []) + [int(draft.token_ids[i])])

    def walk(path):
        s, term = 0, False
        for t in path:
            if term or t not in g.allowed(s):
                return False, None
            if t == STOP:
                term = True
            else:
                s = int(g.table[s, t])
        return True, None if term else g.allowed(s)

    kept, allowed = [], [g.allowed(0)]
    for i in range(n):
        ok, a = walk(paths[i])
        if ok:
            kept.append(i)
            allowed.append(a)
    return kept, allowed


def mask_sets(mask: torch.Tensor) -> list[set[int]]:
    return [{t for t in range(V) if (int(row[t >> 5]) >> (t & 31)) & 1} for row in mask]


@settings(max_examples=300, deadline=None)
@given(draft=trees(), seed=st.integers(0, 10 ** 6))
def test_grammar_prune_equals_brute_force(draft, seed):
    g = random_grammar(seed)
    kept, allowed = brute_force_prune(draft, g)
    pruned, mask = grammar_prune(draft, g, V)
    assert pruned.token_ids.tolist() == [int(draft.token_ids[i]) for i in kept]
    # kept nodes keep their (renumbered) parents
    old_of_new = kept
    for j, p in enumerate(pruned.parents.tolist()):
        op = int(draft.parents[old_of_new[j]])
        assert (p == -1 and op == -1) or old_of_new[p] == op
    assert mask.shape[0] == len(pruned) + 1
    for row, want in zip(mask_sets(mask), allowed):
        assert row == (want if want is not None else set(range(V)))  # terminated: unconstrained
    assert g.stack == [0] and g.terminated_at == [False]  # the grammar state is unchanged


def test_grammar_prune_on_xgrammar_json_schema():
    """A real xgrammar matcher (SGLang's default grammar backend) on a toy vocabulary."""
    xgr = pytest.importorskip("xgrammar")
    vocab = ['{', '}', '"', 'a', 'b', ':', ' ', '1', '2', ',', '"a"', '"b"', '</s>']
    info = xgr.TokenizerInfo(vocab, stop_token_ids=[12])
    schema = '{"type":"object","properties":{"a":{"type":"integer"}},"required":["a"]}'
    compiled = xgr.GrammarCompiler(info).compile_json_schema(schema, any_whitespace=False)
    matcher = xgr.GrammarMatcher(compiled)

    class Wrap:  # the interface SGLang's XGrammarGrammar gives
        def accept_token(self, t):
            assert matcher.accept_token(t)

        def rollback(self, k):
            matcher.rollback(k)

        def is_terminated(self):
            return matcher.is_terminated()

        def allocate_vocab_mask(self, vocab_size, batch_size, device):
            return xgr.allocate_token_bitmask(batch_size, vocab_size)

        def fill_vocab_mask(self, mask, idx):
            matcher.fill_next_token_bitmask(mask, idx)

        def apply_vocab_mask(self, logits, mask):
            xgr.apply_token_bitmask_inplace(logits, mask)

    ids = {t: i for i, t in enumerate(vocab)}
    chain = ['{', '"a"', ':', ' ', '1', '2', '}', '</s>', '{']
    draft = Draft.chain([ids[t] for t in chain])
    # a branch that the schema forbids after '{': the key "b"
    tree = Draft(np.array([ids['{'], ids['"b"'], ids['"a"'], ids[':']]), np.array([-1, 0, 0, 2]))
    g = Wrap()
    pruned, mask = grammar_prune(draft, g, len(vocab))
    assert [vocab[t] for t in pruned.token_ids] == chain[:8]  # nothing below termination
    pruned_tree, tmask = grammar_prune(tree, g, len(vocab))
    assert [vocab[t] for t in pruned_tree.token_ids] == ['{', '"a"', ':']
    assert pruned_tree.parents.tolist() == [-1, 0, 1]
    logits = torch.zeros(4, len(vocab))
    g.apply_vocab_mask(logits, tmask)
    assert torch.isinf(logits[1, ids['"b"']]) and not torch.isinf(logits[1, ids['"a"']])
    assert not matcher.is_terminated() and matcher.accept_token(ids['{'])  # state unchanged


PROMPT_TAIL = 23  # the last prompt token of the simulated requests


class _Tok:
    additional_stop_token_ids = None
    eos_token_id = None


class _Batch:  # the orchestrator keeps a weak reference to its batch
    def __init__(self, reqs):
        self.reqs, self.device = reqs, "cpu"


def sglang_plain_row(logits_row: torch.Tensor, emitted: list[int], pen: Penalties,
                     overlap: bool) -> torch.Tensor:
    """One row as a plain SGLang 0.5.23 decode step computes it after `emitted` output tokens:
    SGLang's penalizers fed by its own ScheduleBatch.cumulate_penalty_output_tokens, one step at a
    time, with output_ids as the scheduler holds them when it prepares each step (overlap: the
    previous step's token is not appended yet), then applied the way the forward applies them
    (SamplingBatchInfo.copy_for_forward -> update_penalties -> pre-grammar transforms)."""
    from types import SimpleNamespace

    import sglang.srt.sampling.penaltylib as penaltylib
    from sglang.srt.managers.schedule_batch import ScheduleBatch
    from sglang.srt.sampling.sampling_batch_info import SamplingBatchInfo

    sp = SimpleNamespace(frequency_penalty=pen.frequency, presence_penalty=pen.presence,
                         repetition_penalty=pen.repetition, min_new_tokens=pen.min_new_tokens,
                         stop_token_ids=set(pen.stop_token_ids))
    req = SimpleNamespace(sampling_params=sp, eos_token_ids=set(), tokenizer=_Tok(),
                          origin_input_ids=[3, 1, PROMPT_TAIL], output_ids=[])
    batch = _Batch([req])
    vocab = logits_row.shape[-1]
    orch = penaltylib.BatchedPenalizerOrchestrator(vocab, batch, {
        penaltylib.BatchedFrequencyPenalizer, penaltylib.BatchedMinNewTokensPenalizer,
        penaltylib.BatchedPresencePenalizer, penaltylib.BatchedRepetitionPenalizer})
    batch.sampling_info = SimpleNamespace(penalizer_orchestrator=orch)
    # The prefill drew emitted[0]; decode step j (1..k) draws emitted[j].
    for j in range(1, len(emitted) + 1):
        req.output_ids = list(emitted[: j - 1] if overlap else emitted[:j])
        if orch.is_required:
            ScheduleBatch.cumulate_penalty_output_tokens(batch)
    info = SimpleNamespace(penalizer_orchestrator=orch, temperatures=torch.ones(1, 1),
                           vocab_size=vocab)
    SamplingBatchInfo.update_penalties(info)
    info.penalizer_orchestrator = None  # copy_for_forward: the forward uses the accumulations
    x = logits_row.clone().unsqueeze(0)
    SamplingBatchInfo._apply_pre_grammar_logits_transforms(info, x)
    return x[0]


def draft_paths(d: Draft) -> list[list[int]]:
    paths = [[]]
    for i, p in enumerate(d.parents.tolist()):
        paths.append(paths[p + 1] + [int(d.token_ids[i])])
    return paths


penalties = st.builds(Penalties, st.sampled_from([0.0, 0.3, 1.7]), st.sampled_from([0.0, 0.5]),
                      st.sampled_from([1.0, 1.3]), st.integers(0, 12), st.just((0, 7)))


@settings(max_examples=150, deadline=None)
@given(draft=trees(), output=st.lists(st.integers(0, V - 1), min_size=1, max_size=10),
       pen=penalties, overlap=st.booleans(), seed=st.integers(0, 1000))
def test_penalties_per_position_equal_sglangs_penalizers(draft, output, pen, overlap, seed):
    """Every verify row, bit for bit, equals SGLang's penalizers in a plain decode step after the
    output extended by the row's draft path (a decode step always follows >= 1 output token)."""
    logits = torch.randn(len(draft) + 1, V, generator=torch.Generator().manual_seed(seed)) * 3
    got = logits.clone()
    pen = dataclasses.replace(pen, prompt_tail=PROMPT_TAIL if overlap else None)
    apply_penalties(got, output, draft, pen)
    for r, path in enumerate(draft_paths(draft)):
        want = sglang_plain_row(logits[r], output + path, pen, overlap)
        assert torch.equal(got[r], want), (r, path, overlap)


def test_overlap_schedule_counts_the_prompts_last_token():
    """The case of issue 33: SGLang's default (overlap) schedule penalises the prompt's last token
    at the first decode step and not yet the newest output token; the synchronous rule differs
    there, so the comparison above tells the two apart."""
    logits = torch.full((2, V), 2.0)
    out, draft = [5], Draft.chain([6])
    for overlap in (False, True):
        pen = Penalties(frequency=0.5, presence=0.25, repetition=2.0,
                        prompt_tail=PROMPT_TAIL if overlap else None)
        got = logits.clone()
        apply_penalties(got, out, draft, pen)
        for r, path in enumerate(draft_paths(draft)):
            assert torch.equal(got[r], sglang_plain_row(logits[r], out + path, pen, overlap))
        root_counts = {PROMPT_TAIL} if overlap else {5}
        assert {t for t in range(V) if got[0, t] != 2.0} == root_counts, overlap
        assert {t for t in range(V) if got[1, t] != 2.0} == root_counts | {5 if overlap else 6}
    # Combined additive penalties are added as one sum (SGLang's accumulation), which is not
    # always the same float as subtracting them in turn.
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 3
    f, p = torch.tensor(0.8), torch.tensor(0.3)
    assert not torch.equal(x - f - p, x + (torch.zeros(()) - f - p))
    combined = Penalties(frequency=0.8, presence=0.3)
    got = x.view(1, -1).clone()
    apply_penalties(got, [5], Draft.empty(), combined)
    assert torch.equal(got[0], sglang_plain_row(x, [5], combined, overlap=False))


def test_root_penalties_on_every_row_are_caught():
    """The control: SGLang's relaxed speculative penalties (the root's state on every row) differ
    from plain decoding as soon as a draft token repeats, so the comparison above can fail."""
    pen = Penalties(frequency=2.0)
    draft = Draft.chain([5, 5, 5])
    logits = torch.zeros(4, V)
    relaxed = logits.clone()
    apply_penalties(relaxed[:1], [], Draft.empty(), pen)
    relaxed[1:] = relaxed[0]
    exact = logits.clone()
    apply_penalties(exact, [], draft, pen)
    assert not torch.equal(relaxed, exact)
    assert [float(exact[r, 5]) for r in range(4)] == [0.0, -2.0, -4.0, -6.0]


def test_step_rules_greedy_verify_follows_the_rules():
    """A batch of three requests (grammar, penalties, logit bias, one without rules): greedy
    verification over the rule-applied logits accepts only what plain decoding would emit."""
    g = DfaGrammar(np.full((1, V), -1), final=set())
    g.table[0, [1, 2]] = 0  # only tokens 1 and 2, forever
    drafts = [Draft.chain([1, 3, 2]), Draft.chain([4, 4]), Draft.chain([6])]
    rules = [LogitRules(grammar=g), LogitRules(penalties=Penalties(frequency=5.0)),
             LogitRules(logit_bias=torch.nn.functional.one_hot(torch.tensor(6), V) * -50.0)]
    pruned, mask = grammar_prune(drafts[0], g, V)
    assert pruned.token_ids.tolist() == [1]  # 3 is forbidden: its subtree goes
    drafts[0] = pruned
    step = StepRules(rules, [[], [], []], [mask, None, None])
    logits = torch.zeros(2 + 3 + 2, V)
    logits[:, 3] = 5.0  # the target likes 3 (forbidden) ...
    logits[:, 1] = 4.0  # ... then 1
    logits[2:5, 4] = 8.0  # request 1: 4 (penalised 5 per occurrence)
    logits[5:, 6] = 9.0  # request 2: 6 (biased away)
    step.apply(logits, drafts)
    vr = verify_greedy(drafts, logits)
    out = [r.output_tokens for r in vr.requests()]
    assert out[0] == [1, 1]  # accepted 1, bonus 1 (3 is masked)
    assert out[1] == [4, 3]  # 4 accepted (8 > 5); after it 4 scores 8 - 5 = 3 < 5 (token 3)
    assert out[2] == [3]  # 6 rejected: 9 - 50 < 5
