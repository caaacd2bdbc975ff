"""OWL drafter: an LSTM speculator conditioned only on the target's last hidden state.

What it reads
-------------
``hidden``: the target model's **final hidden state after the final norm** at one position, i.e.
exactly the vector the target multiplies by its LM head to get the logits at that position (for
Llama: the output of ``model.norm``). In Hugging Face transformers this is the input of
``model.lm_head`` (``outputs.last_hidden_state``); in SGLang it is what
``CaptureHiddenMode.LAST``/``FULL`` stores in ``LogitsProcessorOutput.hidden_states``, because
``LlamaModel.forward`` applies ``self.norm`` before handing the states to the logits processor
(this holds only while no EAGLE3 aux-layer capture is enabled: with ``capture_aux_hidden_states``
the processor stores the concatenated aux layers instead, which this drafter must not be fed).

Conditioning (the Arctic LSTM-speculator convention)
----------------------------------------------------
Let ``h_t`` be the target's hidden state at position ``t``. The target's logits at ``t`` produce
token ``x_{t+1}``; in a verify loop that token is already known when the draft is built (it is the
bonus token of the verify step, or the first token sampled after prefill). The drafter takes
``(h_t, x_{t+1})`` and predicts ``x_{t+2}``, then feeds its own guess back in to predict ``x_{t+3}``
and so on for ``n_predict`` steps:

    step 1: state_1 = LSTM(init(h_t),  emb(x_{t+1}))  -> logits for x_{t+2}
    step k: state_k = LSTM(state_{k-1}, emb(x_{t+k})) -> logits for x_{t+k+1}

So a draft built after a verify step whose bonus token is ``b`` (sampled from the target's logits at
the last accepted position ``t``, whose hidden state is ``h_t``) is rooted at ``b``: in the
``sgl_longspec.drafters.draft.Draft`` convention ``b`` is the root (the last committed token, not part of the
draft) and the drafter's step-1 guesses are the children of the root (``parents == -1``).

Shared weights
--------------
The token embedding and the LM head are the TARGET's own tensors, passed in at construction or load
time and held by reference (never registered as parameters or buffers, never saved in a checkpoint,
never moved by ``.to()``). For a tied-embedding model (SmolLM2) both are the same tensor. The
drafter's own parameters (``num_parameters()``) are the LSTM projections and norms only.

Architecture (per step k, proj dim P, target hidden H):
    s      = W_in(LN_h(h_t))                       (k = 1, H -> 4P)
             W_rec(h_{k-1})                        (k > 1, P -> 4P, tied across steps)
    z      = W_emb(LN_e(E[x]))                     (H -> 4P, shared across steps; E = target embedding)
    a      = w * s + sqrt(1 - w^2) * z,  w = 0.5 ** (0.5 / n_predict)
    f,i,o,g = split(a);  c = c * sig(f) + gelu(LN_g[k](g)) * sig(i);  h_k = gelu(LN_c[k](c)) * sig(o)
    y_k    = LN_out[k](W_out(h_k))                 (P -> H)
    logits = y_k @ lm_head^T                       (target LM head, shared)
Steps past ``n_predict`` reuse the last step's norms, so a tree can be deeper than ``n_predict`` if
asked (accuracy past the trained depth is not measured).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sgl_longspec.drafters.draft import Draft

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "drafter.safetensors"
VOCAB_NAME = "draft_vocab.safetensors"  # optional: the token ids drafts are drawn from
FORMAT = "owl-lstm"
FORMAT_VERSION = 1
HIDDEN_STATE_KIND = "final_norm"  # the input of the target's LM head


@dataclass
class OwlConfig:
    hidden_size: int
    vocab_size: int
    n_predict: int = 4
    proj_dim: int = 512
    target_model: str = ""
    target_fingerprint: dict = field(default_factory=dict)
    hidden_state: str = HIDDEN_STATE_KIND
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    training: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "OwlConfig":
        if not isinstance(d, dict):
            raise ValueError("drafter config.json must hold a JSON object")
        if d.get("format", FORMAT) != FORMAT:
            raise ValueError(f"drafter config.json has format {d.get('format')!r}, expected {FORMAT!r}")
        if int(d.get("format_version", FORMAT_VERSION)) > FORMAT_VERSION:
            raise ValueError(
                f"drafter checkpoint format_version {d['format_version']} is newer than this code "
                f"({FORMAT_VERSION})")
        missing = [k for k in ("hidden_size", "vocab_size", "n_predict", "proj_dim") if k not in d]
        if missing:
            raise ValueError(f"drafter config.json lacks required field(s): {', '.join(missing)}")
        known = {f for f in cls.__dataclass_fields__}
        kw = {k: v for k, v in d.items() if k in known}
        for k in ("hidden_size", "vocab_size", "n_predict", "proj_dim"):
            v = kw[k]
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"drafter config.json field {k!r} must be a positive integer, got {v!r}")
        return cls(**kw)


def _weight_of(x: Any) -> torch.Tensor:
    w = x.weight if isinstance(x, nn.Module) else x
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise ValueError("target embedding / LM head must be a 2-D [vocab, hidden] tensor or a module "
                         "with such a .weight")
    return w


class OwlState:
    """Recurrent state of a batch of drafter rows: the projected state input ``s`` [N, 4P], the
    cell ``c`` [N, P] and the number of steps taken."""

    __slots__ = ("s", "c", "k")

    def __init__(self, s: torch.Tensor, c: torch.Tensor, k: int):
        self.s, self.c, self.k = s, c, k

    def index(self, rows: torch.Tensor) -> "OwlState":
        return OwlState(self.s[rows], self.c[rows], self.k)


class OwlModel(nn.Module):
    def __init__(self, config: OwlConfig, target_embedding: Any, target_lm_head: Any):
        super().__init__()
        self.config = config
        H, P, n = config.hidden_size, config.proj_dim, config.n_predict
        # References to the target's tensors/modules, kept out of the module registry on purpose.
        self.__dict__["_target"] = {"embedding": target_embedding, "lm_head": target_lm_head}
        self._check_target_shapes()
        self.h_norm = nn.LayerNorm(H)
        self.emb_norm = nn.LayerNorm(H)
        self.w_in = nn.Linear(H, 4 * P)
        self.w_rec = nn.Linear(P, 4 * P, bias=False)
        self.w_emb = nn.Linear(H, 4 * P, bias=False)
        self.gate_norms = nn.ModuleList(nn.LayerNorm(P) for _ in range(n))
        self.cell_norms = nn.ModuleList(nn.LayerNorm(P) for _ in range(n))
        self.w_out = nn.Linear(P, H, bias=False)
        self.out_norms = nn.ModuleList(nn.LayerNorm(H) for _ in range(n))
        # Draft vocabulary (None = the full vocabulary): drafting reads only these rows of the LM
        # head. On a CPU the full [V, H] LM-head read per drafted level costs about as much as the
        # small target's whole decode step, so drafting over the frequent tokens only is what
        # makes OWL drafts cheap enough to verify (FR-Spec / EAGLE-3's reduced draft vocabulary).
        self.__dict__["_draft_vocab"] = None  # (ids [Vd] int64, LM-head rows [Vd, H])
        self.state_weight = 0.5 ** (0.5 / n)
        self.emb_weight = math.sqrt(1.0 - self.state_weight ** 2)
        self.reset_parameters()

    # ----------------------------------------------------------------------------------- setup
    def reset_parameters(self) -> None:
        P = self.config.proj_dim
        for lin in (self.w_in, self.w_rec, self.w_emb, self.w_out):
            nn.init.normal_(lin.weight, std=1.0 / math.sqrt(lin.in_features))
        nn.init.zeros_(self.w_in.bias)
        with torch.no_grad():  # forget-gate bias +1: keep the target's information early on
            self.w_in.bias[:P].fill_(1.0)

    def _check_target_shapes(self) -> None:
        V, H = self.config.vocab_size, self.config.hidden_size
        for name in ("embedding", "lm_head"):
            w = _weight_of(self._target[name])
            if tuple(w.shape) != (V, H):
                raise ValueError(
                    f"target {name} has shape {tuple(w.shape)} but the drafter expects "
                    f"[vocab={V}, hidden={H}]")

    @property
    def embedding_weight(self) -> torch.Tensor:
        return _weight_of(self._target["embedding"])

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return _weight_of(self._target["lm_head"])

    @property
    def n_predict(self) -> int:
        return self.config.n_predict

    def num_parameters(self) -> int:
        """The drafter's own parameters (the shared embedding / LM head are not counted)."""
        return sum(p.numel() for p in self.parameters())

    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())

    @property
    def device(self) -> torch.device:
        return self.w_in.weight.device

    # ------------------------------------------------------------------------------ recurrence
    def init_state(self, hidden: torch.Tensor) -> OwlState:
        """State before step 1 from the target hidden states [N, H] (final-norm output)."""
        p = self.w_in.weight
        s = self.w_in(self.h_norm(hidden.to(device=p.device, dtype=p.dtype)))
        c = torch.zeros(s.shape[0], self.config.proj_dim, device=p.device, dtype=p.dtype)
        return OwlState(s, c, 0)

    def step(self, state: OwlState, tokens: torch.Tensor) -> tuple[torch.Tensor, OwlState]:
        """Consume ``tokens`` [N]; return the output hidden y [N, H] (for the next-token logits)
        and the new state."""
        p = self.w_in.weight
        E = self.embedding_weight
        e = F.embedding(tokens.to(E.device).long(), E).to(device=p.device, dtype=p.dtype)
        z = self.w_emb(self.emb_norm(e))
        a = self.state_weight * state.s + self.emb_weight * z
        f, i, o, g = a.chunk(4, dim=-1)
        k = min(state.k, self.config.n_predict - 1)
        c = state.c * torch.sigmoid(f) + F.gelu(self.gate_norms[k](g)) * torch.sigmoid(i)
        h = F.gelu(self.cell_norms[k](c)) * torch.sigmoid(o)
        y = self.out_norms[k](self.w_out(h))
        return y, OwlState(self.w_rec(h), c, state.k + 1)

    def forward(self, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher-forced: hidden [N, H] at position t, tokens [N, K] = x_{t+1} .. x_{t+K}.
        Returns y [N, K, H]; ``self.logits(y[:, k-1])`` predicts x_{t+k+1}."""
        state = self.init_state(hidden)
        ys = []
        for k in range(tokens.shape[1]):
            y, state = self.step(state, tokens[:, k])
            ys.append(y)
        return torch.stack(ys, dim=1)

    def logits(self, y: torch.Tensor, vocab_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits over the full vocabulary (or over ``vocab_ids``) with the target's LM head."""
        W = self.lm_head_weight
        if vocab_ids is not None:
            W = W[vocab_ids.to(W.device)]
        return (y.to(device=W.device, dtype=W.dtype) @ W.t()).float()

    def set_draft_vocab(self, ids: torch.Tensor | None) -> None:
        """Draw drafts from these token ids only (None: the full vocabulary). Keeps a copy of
        their LM-head rows ([Vd, H]), so call it again after moving the drafter or the target."""
        if ids is None:
            self.__dict__["_draft_vocab"] = None
            return
        ids = torch.as_tensor(ids).long().reshape(-1)
        V = self.config.vocab_size
        if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= V:
            raise ValueError(f"draft vocabulary must be non-empty token ids in [0, {V})")
        if torch.unique(ids).numel() != ids.numel():
            raise ValueError("draft vocabulary has repeated token ids")
        W = self.lm_head_weight
        self.__dict__["_draft_vocab"] = (ids.to(W.device), W[ids.to(W.device)].contiguous())

    @property
    def draft_vocab(self) -> torch.Tensor | None:
        dv = self.__dict__["_draft_vocab"]
        return None if dv is None else dv[0]

    def _draft_probs(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Softmax over the draft vocabulary, and the ids its columns stand for (None: column =
        token id)."""
        dv = self.__dict__["_draft_vocab"]
        if dv is None:
            return torch.softmax(self.logits(y), dim=-1), None
        ids, W = dv
        return torch.softmax((y.to(device=W.device, dtype=W.dtype) @ W.t()).float(), dim=-1), ids

    def draft_argmax(self, y: torch.Tensor) -> torch.Tensor:
        """The token a greedy draft takes from output ``y`` (argmax over the draft vocabulary)."""
        p, ids = self._draft_probs(y)
        best = p.argmax(dim=-1)
        return best if ids is None else ids[best]

    # -------------------------------------------------------------------------------- drafting
    def _prep(self, hidden, root_tokens) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = torch.as_tensor(hidden)
        if hidden.dim() == 1:
            hidden = hidden[None]
        roots = torch.as_tensor(root_tokens, dtype=torch.long).reshape(-1)
        if hidden.shape[0] != roots.shape[0] or hidden.shape[-1] != self.config.hidden_size:
            raise ValueError(f"hidden {tuple(hidden.shape)} and root tokens {tuple(roots.shape)} "
                             f"disagree (expected [B, {self.config.hidden_size}] and [B])")
        return hidden, roots.to(self.device)

    @torch.no_grad()
    def draft_chain(self, hidden, root_tokens, length: int | None = None,
                    min_prob: float = 0.0) -> list[Draft]:
        """Greedy chains, one per request. hidden [B, H] is the target's final-norm hidden state at
        the position whose logits produced ``root_tokens`` [B] (the bonus tokens, roots of the
        drafts). Each chain follows the drafter's argmax for ``length`` (default n_predict) steps;
        probs[i] is the product of the drafter's softmax probabilities along the path; a chain
        stops before the first node whose path probability falls below ``min_prob``."""
        hidden, roots = self._prep(hidden, root_tokens)
        length = self.config.n_predict if length is None else int(length)
        B = roots.shape[0]
        if length <= 0 or B == 0:
            return [Draft.empty() for _ in range(B)]
        state = self.init_state(hidden)
        tok = roots
        toks, probs = [], []
        cum = torch.ones(B, device=self.device)
        for _ in range(length):
            y, state = self.step(state, tok)
            p, ids = self._draft_probs(y)
            best_p, tok = p.max(dim=-1)
            tok = (tok if ids is None else ids[tok]).to(self.device)
            cum = cum * best_p.to(self.device)
            toks.append(tok)
            probs.append(cum)
        T = torch.stack(toks, 1).cpu().numpy()
        Pm = torch.stack(probs, 1).float().cpu().numpy()
        out = []
        for b in range(B):
            n = length
            below = np.nonzero(Pm[b] < min_prob)[0]
            if len(below):
                n = int(below[0])
            out.append(Draft.chain(T[b, :n], Pm[b, :n], source="owl"))
        return out

    @torch.no_grad()
    def draft_tree(self, hidden, root_tokens, top_k: int = 10, max_nodes: int = 60,
                   max_depth: int | None = None, min_prob: float = 0.0,
                   expand_per_level: int | None = None) -> list[Draft]:
        """Best-first token trees, one per request (batched over requests).

        The tree is the ``max_nodes`` most probable nodes among the candidates generated as
        follows: the root (the bonus token) is expanded into its ``top_k`` most probable children;
        at each depth the ``expand_per_level`` (default ``top_k``) most probable nodes of that depth
        are expanded into their ``top_k`` children, up to ``max_depth`` (default n_predict). A
        node's probability is the product of the drafter's softmax probabilities along its path,
        so it never exceeds its parent's and the selected set is closed under ancestors. Nodes are
        stored best-first (probability descending, ties: shallower first), which is parents-first
        as the Draft convention requires. Nodes below ``min_prob`` are dropped; expansion skips
        nodes that can no longer make the budget. ``score`` = sum of probs = the drafter's expected
        accepted length."""
        hidden, roots = self._prep(hidden, root_tokens)
        B = roots.shape[0]
        max_depth = self.config.n_predict if max_depth is None else int(max_depth)
        width = top_k if expand_per_level is None else int(expand_per_level)
        if B == 0:
            return []
        if max_nodes <= 0 or max_depth <= 0 or top_k <= 0:
            return [Draft.empty() for _ in range(B)]
        top_k = min(int(top_k), self.config.vocab_size)
        # Per request: lists of node fields. state_row indexes `states` (the state that children of
        # the node are produced from = the state after consuming the node's parent token).
        tok_l = [[] for _ in range(B)]
        par_l = [[] for _ in range(B)]
        prob_l = [[] for _ in range(B)]
        dep_l = [[] for _ in range(B)]

        # expansion batch: (request, node index or -1 for the root, prob, depth)
        exp_req = list(range(B))
        exp_node = [-1] * B
        exp_prob = [1.0] * B
        state = self.init_state(hidden)
        exp_tok = roots
        depth = 0
        while exp_req and depth < max_depth:
            y, state = self.step(state, exp_tok)
            p, ids = self._draft_probs(y)
            cp, ct = p.topk(min(top_k, p.shape[-1]), dim=-1)
            if ids is not None:
                ct = ids[ct]
            cp = (cp * torch.tensor(exp_prob, device=cp.device, dtype=cp.dtype)[:, None]).cpu().numpy()
            ct = ct.cpu().numpy()
            depth += 1
            new_ids: list[list[tuple[int, int]]] = [[] for _ in range(B)]
            for r, (b, parent) in enumerate(zip(exp_req, exp_node)):
                for j in range(cp.shape[1]):
                    pr = float(cp[r, j])
                    if pr < min_prob:
                        break
                    # row r of `state` is the state this new node's children are produced from
                    new_ids[b].append((len(tok_l[b]), r))
                    tok_l[b].append(int(ct[r, j]))
                    par_l[b].append(parent)
                    prob_l[b].append(pr)
                    dep_l[b].append(depth)
            if depth >= max_depth:
                break
            # choose what to expand next
            nxt_req, nxt_node, nxt_prob, nxt_row, nxt_tok = [], [], [], [], []
            for b in range(B):
                if not new_ids[b]:
                    continue
                probs_b = np.asarray(prob_l[b])
                thr = -1.0
                if len(probs_b) >= max_nodes:
                    thr = float(np.partition(probs_b, len(probs_b) - max_nodes)[len(probs_b) - max_nodes])
                cand = sorted(new_ids[b], key=lambda t: -prob_l[b][t[0]])[:width]
                for nid, row in cand:
                    if prob_l[b][nid] < thr:
                        continue
                    nxt_req.append(b)
                    nxt_node.append(nid)
                    nxt_prob.append(prob_l[b][nid])
                    nxt_row.append(row)
                    nxt_tok.append(tok_l[b][nid])
            if not nxt_req:
                break
            rows = torch.tensor(nxt_row, device=self.device, dtype=torch.long)
            state = state.index(rows)
            exp_req, exp_node, exp_prob = nxt_req, nxt_node, nxt_prob
            exp_tok = torch.tensor(nxt_tok, device=self.device, dtype=torch.long)

        out = []
        for b in range(B):
            n = len(tok_l[b])
            if n == 0:
                out.append(Draft.empty())
                out[-1].source = "owl"
                continue
            order = sorted(range(n), key=lambda i: (-prob_l[b][i], dep_l[b][i], i))[:max_nodes]
            remap = {old: new for new, old in enumerate(order)}
            toks = np.array([tok_l[b][i] for i in order], dtype=np.int64)
            pars = np.array([-1 if par_l[b][i] < 0 else remap[par_l[b][i]] for i in order],
                            dtype=np.int32)
            prs = np.array([prob_l[b][i] for i in order], dtype=np.float32)
            out.append(Draft(toks, pars, prs, float(prs.sum()), 0, "owl"))
        return out

    # ---------------------------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write ``config.json`` and ``drafter.safetensors`` (own parameters only, fp32)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}
        tmp = path / (WEIGHTS_NAME + ".tmp")
        save_file(state, str(tmp), metadata={"format": FORMAT})
        os.replace(tmp, path / WEIGHTS_NAME)
        if self.draft_vocab is not None:
            save_file({"ids": self.draft_vocab.cpu().to(torch.int64).contiguous()},
                      str(path / VOCAB_NAME), metadata={"format": FORMAT})
        else:
            (path / VOCAB_NAME).unlink(missing_ok=True)
        (path / CONFIG_NAME).write_text(self.config.to_json() + "\n")
