"""OWL LSTM drafter: shapes, weight sharing, tree/chain drafting, checkpoints, training, and the
shipped SmolLM2-135M checkpoint on a few real prompts."""

from __future__ import annotations

import heapq
import json
import shutil

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sgl_longspec.drafters.draft import Draft
from sgl_longspec.drafters.owl import build_drafter, load_drafter, shipped_checkpoint
from sgl_longspec.drafters.owl.model import CONFIG_NAME, WEIGHTS_NAME, OwlModel

V, H = 300, 32


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_target(seed=0, vocab=V, hidden=H):
    torch.manual_seed(seed)
    emb = torch.nn.Embedding(vocab, hidden)
    emb.requires_grad_(False)
    return emb  # tied: the LM head is the same module


def make_drafter(seed=0, n_predict=3, proj=24, vocab=V, hidden=H) -> OwlModel:
    emb = make_target(seed, vocab, hidden)
    torch.manual_seed(seed + 1)
    d = build_drafter(emb, emb, n_predict=n_predict, proj_dim=proj, target_model="toy")
    with torch.no_grad():  # sharpen the toy distributions a little
        for ln in d.out_norms:
            ln.weight.mul_(3.0)
    return d.eval()


# ----------------------------------------------------------------------------------- structure
def test_shapes_and_parameter_sharing():
    d = make_drafter()
    emb = d.embedding_weight
    assert emb is d.lm_head_weight
    # no own parameter or buffer holds (or copies) the [vocab, hidden] embedding / LM head
    for name, t in list(d.named_parameters()) + list(d.named_buffers()):
        assert tuple(t.shape) != (V, H), name
        assert t.data_ptr() != emb.data_ptr(), name
    assert all(v.shape != (V, H) for v in d.state_dict().values())
    assert d.num_parameters() == sum(p.numel() for p in d.parameters())
    assert d.nbytes() == 4 * d.num_parameters()
    hid = torch.randn(5, H)
    toks = torch.randint(0, V, (5, 4))
    y = d(hid, toks)
    assert y.shape == (5, 4, H)
    assert d.logits(y).shape == (5, 4, V)
    assert d.logits(y, torch.arange(10)).shape == (5, 4, 10)
    # a reference, not a copy: changing the target's weights changes the drafter's output
    before = d.logits(d(hid, toks))
    with torch.no_grad():
        emb.mul_(1.5)
    assert not torch.allclose(before, d.logits(d(hid, toks)))


def test_wrong_target_shape_rejected():
    emb = make_target()
    d = make_drafter()
    with pytest.raises(ValueError, match="shape"):
        OwlModel(d.config, torch.nn.Embedding(V + 1, H), emb)


# -------------------------------------------------------------------------------------- drafts
def _children(draft: Draft):
    kids = {}
    for i, p in enumerate(draft.parents):
        kids.setdefault(int(p), []).append(i)
    return kids


@pytest.mark.parametrize("top_k,max_nodes", [(1, 5), (3, 10), (4, 25), (8, 60)])
def test_tree_invariants(top_k, max_nodes):
    d = make_drafter()
    B = 4
    hid = torch.randn(B, H)
    roots = torch.randint(0, V, (B,))
    drafts = d.draft_tree(hid, roots, top_k=top_k, max_nodes=max_nodes)
    assert len(drafts) == B
    for dr in drafts:
        assert isinstance(dr, Draft) and dr.source == "owl"
        n = len(dr)
        assert 0 < n <= max_nodes
        Draft(dr.token_ids, dr.parents, dr.probs)  # re-validate (parents-first)
        assert dr.depths().max() <= d.n_predict
        for p, kids in _children(dr).items():
            assert len(kids) <= top_k
            toks = dr.token_ids[kids]
            assert len(set(toks.tolist())) == len(toks)  # siblings are distinct tokens
            parent_prob = 1.0 if p < 0 else dr.probs[p]
            assert np.all(dr.probs[kids] <= parent_prob + 1e-6)
        assert np.all(np.diff(dr.probs) <= 1e-7)  # best-first order
        assert np.all((dr.probs > 0) & (dr.probs <= 1))
        assert dr.score == pytest.approx(float(dr.probs.sum()), rel=1e-5)
    # batched == one request at a time
    for b in range(B):
        single = d.draft_tree(hid[b:b + 1], roots[b:b + 1], top_k=top_k, max_nodes=max_nodes)[0]
        np.testing.assert_array_equal(single.token_ids, drafts[b].token_ids)
        np.testing.assert_array_equal(single.parents, drafts[b].parents)
        np.testing.assert_allclose(single.probs, drafts[b].probs, rtol=1e-4)


def _brute_force_tree(d: OwlModel, hid, root, top_k, max_nodes, depth):
    """Every node of the full top-k tree to ``depth``, then the max_nodes most probable."""
    nodes = []  # (prob, depth, path tokens)
    with torch.no_grad():
        frontier = [((), 1.0)]
        for dep in range(1, depth + 1):
            nxt = []
            for path, pr in frontier:
                toks = torch.tensor([[root, *path]])
                y = d(hid[None], toks)[:, -1]
                p = torch.softmax(d.logits(y), -1)[0]
                cp, ct = p.topk(top_k)
                for q, t in zip(cp.tolist(), ct.tolist()):
                    nodes.append((pr * q, dep, path + (t,)))
                    nxt.append((path + (t,), pr * q))
            frontier = nxt
    best = heapq.nlargest(max_nodes, nodes, key=lambda x: (x[0], -x[1]))
    return {n[2]: n[0] for n in best}


def test_tree_is_best_first_top_nodes():
    d = make_drafter(seed=3)
    hid = torch.randn(H)
    root = 17
    top_k, max_nodes, depth = 3, 12, 3
    dr = d.draft_tree(hid[None], [root], top_k=top_k, max_nodes=max_nodes, max_depth=depth,
                      expand_per_level=top_k ** depth)[0]
    paths = {}
    for i in range(len(dr)):
        p, path = i, []
        while p >= 0:
            path.append(int(dr.token_ids[p]))
            p = int(dr.parents[p])
        paths[tuple(reversed(path))] = float(dr.probs[i])
    ref = _brute_force_tree(d, hid, root, top_k, max_nodes, depth)
    assert set(paths) == set(ref)
    for k, v in ref.items():
        assert paths[k] == pytest.approx(v, rel=1e-4)


def test_chain_is_greedy_argmax_path():
    d = make_drafter(seed=5, n_predict=4)
    B = 3
    hid = torch.randn(B, H)
    roots = torch.randint(0, V, (B,))
    chains = d.draft_chain(hid, roots)
    for b, ch in enumerate(chains):
        assert ch.is_chain() and len(ch) == 4 and ch.source == "owl"
        toks = [int(roots[b])]
        prob = 1.0
        with torch.no_grad():
            for k in range(4):
                y = d(hid[b:b + 1], torch.tensor([toks]))[:, -1]
                p = torch.softmax(d.logits(y), -1)[0]
                toks.append(int(p.argmax()))
                prob *= float(p.max())
                assert ch.probs[k] == pytest.approx(prob, rel=1e-4)
        assert ch.token_ids.tolist() == toks[1:]
        # the top_k=1 tree is the same chain
        tree = d.draft_tree(hid[b:b + 1], roots[b:b + 1], top_k=1, max_nodes=4)[0]
        assert tree.token_ids.tolist() == ch.token_ids.tolist() and tree.is_chain()
    # min_prob cuts the chain where the path probability drops below it
    cut = d.draft_chain(hid, roots, min_prob=float(chains[0].probs[1]) - 1e-7)[0]
    assert len(cut) == 2
    assert d.draft_chain(hid, roots, length=0)[0].token_ids.size == 0


# --------------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip(tmp_path):
    d = make_drafter(seed=7)
    d.save(tmp_path)
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert cfg["hidden_size"] == H and cfg["vocab_size"] == V and cfg["n_predict"] == 3
    assert cfg["proj_dim"] == 24 and cfg["target_model"] == "toy"
    assert cfg["target_fingerprint"]["vocab"] == V and cfg["hidden_state"] == "final_norm"
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / WEIGHTS_NAME))
    assert all(v.shape != (V, H) for v in keys.values())  # shared weights are not saved
    emb = d.embedding_weight
    d2 = load_drafter(tmp_path, emb, emb)
    hid, toks = torch.randn(4, H), torch.randint(0, V, (4, 3))
    torch.testing.assert_close(d.logits(d(hid, toks)), d2.logits(d2(hid, toks)))
    a = d.draft_tree(hid, toks[:, 0], top_k=4, max_nodes=20)
    b = d2.draft_tree(hid, toks[:, 0], top_k=4, max_nodes=20)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.token_ids, y.token_ids)


def test_corrupt_or_mismatched_checkpoint_refused(tmp_path):
    d = make_drafter(seed=9)
    good = tmp_path / "good"
    d.save(good)
    emb = d.embedding_weight

    def variant(name):
        p = tmp_path / name
        shutil.copytree(good, p)
        return p

    with pytest.raises(ValueError, match="not a directory"):
        load_drafter(tmp_path / "nothing", emb, emb)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        load_drafter(tmp_path / "empty", emb, emb)
    p = variant("badjson")
    (p / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_drafter(p, emb, emb)
    p = variant("missingfield")
    cfg = json.loads((p / CONFIG_NAME).read_text())
    del cfg["proj_dim"]
    (p / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="proj_dim"):
        load_drafter(p, emb, emb)
    p = variant("badvalue")
    cfg = json.loads((p / CONFIG_NAME).read_text())
    cfg["n_predict"] = 0
    (p / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="n_predict"):
        load_drafter(p, emb, emb)
    # wrong target: hidden size, vocab size, different weights
    other_h = make_target(vocab=V, hidden=H + 8).weight
    with pytest.raises(ValueError, match="hidden size"):
        load_drafter(good, other_h, other_h)
    other_v = make_target(vocab=V + 5).weight
    with pytest.raises(ValueError, match="vocab size"):
        load_drafter(good, other_v, other_v)
    other_w = make_target(seed=123).weight
    with pytest.raises(ValueError, match="fingerprint"):
        load_drafter(good, other_w, other_w)
    load_drafter(good, other_w, other_w, check_fingerprint=False)  # explicit override works
    # weights: missing file, truncated file, missing tensor, wrong shape
    p = variant("noweights")
    (p / WEIGHTS_NAME).unlink()
    with pytest.raises(ValueError, match="no drafter.safetensors"):
        load_drafter(p, emb, emb)
    p = variant("truncated")
    raw = (p / WEIGHTS_NAME).read_bytes()
    (p / WEIGHTS_NAME).write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="corrupt"):
        load_drafter(p, emb, emb)
    from safetensors.torch import load_file, save_file

    p = variant("missingtensor")
    st = load_file(str(p / WEIGHTS_NAME))
    del st["w_rec.weight"]
    save_file(st, str(p / WEIGHTS_NAME))
    with pytest.raises(ValueError, match="missing tensor.*w_rec.weight"):
        load_drafter(p, emb, emb)
    p = variant("wrongshape")
    st = load_file(str(p / WEIGHTS_NAME))
    st["w_out.weight"] = torch.zeros(3, 3)
    save_file(st, str(p / WEIGHTS_NAME))
    with pytest.raises(ValueError, match="wrong shape.*w_out.weight"):
        load_drafter(p, emb, emb)


# ------------------------------------------------------------------------------------ training
def test_tiny_training_run_decreases_loss(tmp_path):
    from sgl_longspec.training.owl_train import evaluate_examples, train_loop

    torch.manual_seed(0)
    d = make_drafter(seed=11, n_predict=3, proj=32).train()
    N, n = 512, 3
    hidden = torch.randn(N, H)
    inputs = torch.randint(0, V, (N, n))
    # a learnable rule: the next token is a fixed function of the current one
    labels = (inputs * 7 + 3) % V
    labels[:5, 2] = -100  # ignored labels are fine
    before = evaluate_examples(d, hidden, inputs, labels)
    losses = train_loop(d, hidden, inputs, labels, steps=120, batch_size=64, lr=1e-2,
                        train_vocab=200, neg_samples=50, out=tmp_path, save_every=60,
                        progress=False)
    assert len(losses) == 120
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])
    after = evaluate_examples(d, hidden, inputs, labels)
    assert after["per_step_acceptance"][0] > before["per_step_acceptance"][0] + 0.2
    assert after["tau"] > before["tau"]
    assert (tmp_path / "train_state.pt").exists() and (tmp_path / WEIGHTS_NAME).exists()
    # resume continues from the saved step (nothing left to do at the same step count)
    more = train_loop(d, hidden, inputs, labels, steps=130, batch_size=64, lr=1e-2,
                      train_vocab=200, neg_samples=50, out=tmp_path, resume=True, progress=False)
    assert len(more) == 10


def test_make_examples_alignment():
    from sgl_longspec.training.owl_data import make_examples

    g = torch.arange(10, 20, dtype=torch.int32)
    s = {"gen": g, "argmax": g + 100, "hidden": torch.arange(10, dtype=torch.float16)[:, None]
         .repeat(1, 4)}
    h, x, y = make_examples([s], n_predict=3, full_only=True)
    # example i: hidden[i] produced g[i]; inputs g[i..i+2]; labels argmax[i+1..i+3]
    assert len(x) == 10 - 3
    assert h[2, 0] == 2 and x[2].tolist() == [12, 13, 14] and y[2].tolist() == [113, 114, 115]
    h, x, y = make_examples([s], n_predict=3)
    assert len(x) == 9 and y[-1].tolist() == [119, -100, -100]


# ------------------------------------------------------------------- shipped checkpoint (real)
@pytest.mark.timeout(600)  # ~15 s on an idle CPU; generous for a loaded shared one
def test_shipped_checkpoint_accepts_on_real_prompts():
    path = shipped_checkpoint("smollm2-135m-instruct")
    if not (path / WEIGHTS_NAME).exists():
        pytest.fail(f"shipped checkpoint missing: {path}")
    from sgl_longspec.training.owl_data import chat_ids
    from sgl_longspec.training.owl_data import generate_batch
    from sgl_longspec.training.owl_train import evaluate_examples, load_target
    from sgl_longspec.training.owl_data import make_examples

    _, tok, model = load_target(None, "cpu", "float32")
    drafter = load_drafter(path, model.get_input_embeddings(), model.get_output_embeddings())
    assert drafter.num_parameters() < 10_000_000
    # the drafter references the target's tensors, it does not copy them
    assert drafter.embedding_weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    prompts = [  # not in the training split (written for this test)
        "What are three tips for keeping houseplants healthy in winter?",
        "Write a Python function that returns the n-th Fibonacci number iteratively.",
    ]
    samples = generate_batch(model, tok, [chat_ids(tok, p, 128) for p in prompts], 40, 0.0,
                             "cpu", seed=0)
    h, x, y = make_examples(samples, drafter.n_predict, full_only=True)
    res = evaluate_examples(drafter, h, x, y)
    assert res["n"] >= 30
    assert res["per_step_acceptance"][0] > 0.12, res  # held-out chat 0.19, code 0.35 (README)
    assert res["tau"] > 1.1, res
    # the real drafts are valid trees rooted at the bonus token
    tree = drafter.draft_tree(h[:2].float(), x[:2, 0], top_k=8, max_nodes=40)
    assert all(0 < len(t) <= 40 for t in tree)


# ------------------------------------------------------------- long-context training data (real)
@pytest.fixture(scope="module")
def chat_tokenizer():
    from transformers import AutoTokenizer

    from sgl_longspec.tools.models import ensure_embedded_model

    return AutoTokenizer.from_pretrained(str(ensure_embedded_model()))


# Texts whose cuts re-tokenize badly: runs of spaces and newlines (indentation), multi-byte
# characters, digits and punctuation that merge with their neighbours.
_FIT_TEXT = st.text(alphabet=st.sampled_from(list("ab xy\n\t    .,:()_=0123é€中🙂")), min_size=0, max_size=400)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pieces=st.lists(_FIT_TEXT, min_size=1, max_size=6), extra=st.integers(1, 400),
       question=st.sampled_from(["Summarize.", "Explain the last function.", "  x\n"]))
def test_fit_context_ids_has_exactly_the_requested_length(chat_tokenizer, pieces, extra, question):
    """Every requested length is met exactly (the old text-level fit missed by a token where a cut
    re-tokenized differently), the prompt ends with the same question and template tail whatever
    the length, and the context is the END of the pieces' tokens."""
    from sgl_longspec.training import owl_prompts

    tok = chat_tokenizer
    head, tail = owl_prompts.chat_template_around(tok, question)
    per_piece = [tok(p + "\n\n", add_special_tokens=False)["input_ids"] for p in pieces]
    total = sum(map(len, per_piece))
    budget = min(extra, total)
    n = len(head) + len(tail) + budget
    if total == 0:
        with pytest.raises(ValueError):
            owl_prompts.fit_context_ids(tok, pieces, question, n)
        return
    ids = owl_prompts.fit_context_ids(tok, pieces, question, n)
    assert len(ids) == n
    assert ids[:len(head)] == head and ids[len(ids) - len(tail):] == tail
    # the context: the last `budget` tokens of the first pieces that hold at least `budget`
    ctx: list[int] = []
    for p in per_piece:
        ctx += p
        if len(ctx) >= budget:
            break
    assert ids[len(head):len(ids) - len(tail)] == ctx[len(ctx) - budget:]
    with pytest.raises(ValueError):  # more context than the pieces hold
        owl_prompts.fit_context_ids(tok, pieces, question, len(head) + len(tail) + total + 1)


def test_fit_context_ids_renders_the_chat_template(chat_tokenizer):
    """The spliced ids decode to the chat template's own rendering of the turn "<context>\n\n
    <question>", with the context cut from the front at a token boundary."""
    from sgl_longspec.training import owl_prompts

    tok = chat_tokenizer
    pieces = ["first piece of text.", "second piece."]
    head, tail = owl_prompts.chat_template_around(tok, owl_prompts.CODE_Q)
    ctx = [t for p in pieces for t in tok(p + "\n\n", add_special_tokens=False)["input_ids"]]
    for keep in (len(ctx), len(ctx) - 3):
        ids = owl_prompts.fit_context_ids(tok, pieces, owl_prompts.CODE_Q, len(head) + len(tail) + keep)
        turn = tok.decode(ctx[len(ctx) - keep:]) + "\n\n" + owl_prompts.CODE_Q
        want = tok.apply_chat_template([{"role": "user", "content": turn}], tokenize=False,
                                       add_generation_prompt=True)
        assert tok.decode(ids) == want


def test_training_code_comes_from_the_pinned_package():
    """The long-code training split reads named files of the version-pinned package only: the same
    list on any machine (CI once failed because it read whatever site-packages held)."""
    import importlib.metadata as md

    from sgl_longspec.training import owl_prompts

    name, version = owl_prompts.CODE_SOURCE_PACKAGE
    assert md.version(name) == version
    files = owl_prompts.pinned_package_code_files(400, seed=1)
    assert len(files) == 400 and all(f"/{name}/" in p.as_posix() for p in files)
    assert files == owl_prompts.pinned_package_code_files(400, seed=1)


@pytest.mark.timeout(600)
def test_long_text_sequences_and_chunked_recording():
    """The long-context training split: exact lengths, disjoint from the evaluation's prompts, and
    the chunked (KV-cache) recording equals one full forward pass."""
    from sgl_longspec.training import owl_data, owl_prompts
    from sgl_longspec.training.owl_evaluate import long_prompt_ids
    from sgl_longspec.training.owl_train import load_target

    _, tok, model = load_target(None, "cpu", "float32")
    seqs = owl_prompts.long_text_sequences(tok, 4, 640, seed=0)
    assert [k for k, _ in seqs] == ["long-chat", "long-code", "long-chat", "long-code"]
    assert [len(ids) for _, ids in seqs] == [320, 320, 640, 640]
    evals = {tuple(long_prompt_ids(tok, 640, i)) for i in range(2)}
    assert not evals & {tuple(ids) for _, ids in seqs}
    ids = seqs[0][1]
    full = owl_data.record_text(model, [ids], "cpu", prefill_chunk=10**6)[0]
    chunked = owl_data.record_text(model, [ids], "cpu", prefill_chunk=96)[0]
    assert torch.equal(full["gen"], chunked["gen"])
    assert full["gen"].tolist() == ids[1:]
    assert len(chunked["hidden"]) == len(ids) - 1
    torch.testing.assert_close(chunked["hidden"].float(), full["hidden"].float(), atol=2e-2, rtol=1e-2)
    agree = (chunked["argmax"] == full["argmax"]).float().mean().item()
    assert agree > 0.98, agree


# ---------------------------------------------------------------------------- draft vocabulary
def brute_force_restricted_chain(d: OwlModel, hidden, root, ids: torch.Tensor, length: int):
    """Reference: the greedy chain when every step's argmax is taken over `ids` only."""
    state, tok, out = d.init_state(hidden[None]), torch.tensor([root]), []
    for _ in range(length):
        y, state = d.step(state, tok)
        logits = d.logits(y)[0]
        tok = ids[logits[ids].argmax()].reshape(1)
        out.append(int(tok))
    return out


def test_draft_vocab_restricts_drafts_and_round_trips(tmp_path):
    from sgl_longspec.training.owl_train import frequent_label_ids

    d = make_drafter(seed=11)
    labels = torch.tensor([[5, 1], [5, 2], [7, 3], [5, -1], [9, 0], [7, 0], [-1, -1]])
    ids = frequent_label_ids(labels, 2, V)
    assert ids.tolist() == [5, 7]  # the two most frequent first-step labels, sorted
    rng = torch.Generator().manual_seed(0)
    vocab = torch.sort(torch.randperm(V, generator=rng)[:40]).values
    d.set_draft_vocab(vocab)
    hid, roots = torch.randn(6, H), torch.randint(0, V, (6,))
    allowed = set(vocab.tolist())
    for tree in d.draft_tree(hid, roots, top_k=3, max_nodes=12):
        assert set(tree.token_ids.tolist()) <= allowed
        assert (np.diff(tree.probs) <= 1e-6).all()  # still best-first
    chains = d.draft_chain(hid, roots)
    for b, chain in enumerate(chains):
        assert chain.token_ids.tolist() == brute_force_restricted_chain(d, hid[b], int(roots[b]), vocab, 3)
    # saved next to the weights and restored by load_drafter
    d.save(tmp_path)
    d2 = load_drafter(tmp_path, d.embedding_weight, d.embedding_weight)
    assert d2.draft_vocab.tolist() == vocab.tolist()
    for x, y in zip(chains, d2.draft_chain(hid, roots)):
        assert x.token_ids.tolist() == y.token_ids.tolist()
    # a corrupt or out-of-range vocabulary file is refused with its name
    from safetensors.torch import save_file

    from sgl_longspec.drafters.owl.model import VOCAB_NAME

    (tmp_path / VOCAB_NAME).write_bytes(b"garbage")
    with pytest.raises(ValueError, match="draft_vocab.safetensors"):
        load_drafter(tmp_path, d.embedding_weight, d.embedding_weight)
    save_file({"ids": torch.tensor([1, V + 3])}, str(tmp_path / VOCAB_NAME))
    with pytest.raises(ValueError, match="token ids in"):
        load_drafter(tmp_path, d.embedding_weight, d.embedding_weight)
    # back to the full vocabulary: the file goes away with it
    d.set_draft_vocab(None)
    d.save(tmp_path)
    assert not (tmp_path / VOCAB_NAME).exists()
    assert load_drafter(tmp_path, d.embedding_weight, d.embedding_weight).draft_vocab is None


def test_shipped_checkpoint_has_draft_vocab():
    from sgl_longspec.drafters.owl.model import VOCAB_NAME

    from safetensors.torch import load_file

    ids = load_file(str(shipped_checkpoint() / VOCAB_NAME))["ids"]
    assert ids.numel() == 8192 and torch.unique(ids).numel() == 8192
