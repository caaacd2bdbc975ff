"""End-to-end serving benchmark: the same workloads against several server configurations.

    python -m benchmarks.run --quick                      # < 15 min on the 2-core CPU machine
    python -m benchmarks.run                              # full suite (about an hour on this CPU)
    python -m benchmarks.run --preset issue4              # code-edit (Qwen2.5-Coder-0.5B) + chat
    python -m benchmarks.run --base-url http://127.0.0.1:30000 --configs current --quick
    python -m benchmarks.run --quick --bench-serving      # also sglang.benchmark.serving per config
    python -m benchmarks.run --export-agentic-trace trace.json   # agent sessions for bench_serving

For every configuration (``--configs``) the server is started once (``sgl_longspec.tools.cli.start_server``,
its own process group, always stopped), warmed up, and every workload (``benchmarks.workloads``) is
replayed at every concurrency level. Prompts are sent as token ids to ``/generate`` (streamed, greedy)
so TTFT, time per output token and SGLang's per-request ``meta_info`` (``completion_tokens``,
``spec_verify_ct``) are measured per request. tau = completion_tokens / spec_verify_ct (LONGSPEC
steps without a draft count as verify steps with accept length 1; no speculation: tau = 1).

Fairness: every configuration replays the same sessions in the same order; each concurrency level
uses its own seeded sessions (so no configuration drafts from outputs it already produced for the
same prompt at a lower concurrency) and the radix cache is flushed between workloads. In float32
greedy decoding every configuration must produce the same text: the runner counts turns whose
output differs from the no-speculation reference ("mismatch").

Output folder (``--out``): results.json (every request and aggregate), results.md (tables),
PNG plots (``benchmarks.plots``), README.md (command, date, machine, headline ratios), logs/.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from benchmarks import workloads as W

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = "smollm2-135m-instruct"
CODER_MODEL = "qwen2.5-coder-0.5b-instruct"

CONFIGS: dict[str, list[str]] = {
    "vanilla": [],
    # Plain decoding without SGLang's overlap scheduler: the scheduling mode every speculative
    # algorithm runs in (LONGSPEC and NGRAM register supports_overlap=False), so that the cost
    # of giving up the overlap can be told apart from the cost of speculation.
    "vanilla-sync": ["--disable-overlap-schedule"],
    "ngram": ["--speculative-algorithm", "NGRAM", "--speculative-num-draft-tokens", "8"],
    "suffix": ["--speculative-algorithm", "LONGSPEC", "--longspec-drafter-path", "none"],
    "owl": ["--speculative-algorithm", "LONGSPEC", "--longspec-suffix-drafts", "false"],
    "hybrid": ["--speculative-algorithm", "LONGSPEC"],
    # LONGSPEC with its defaults (hybrid when a drafter is shipped for the model, else suffix-only)
    "longspec": ["--speculative-algorithm", "LONGSPEC"],
    # LONGSPEC drafting as usual but verifying nothing (every draft refused by the router): what
    # speculation costs on traffic it cannot help; must be within a few percent of vanilla.
    "longspec-refuse": ["--speculative-algorithm", "LONGSPEC", "--longspec-min-score", "1000"],
    # LONGSPEC calibrating its drafters from verified drafts only (refused drafts not scored
    # against the output): the comparison for --longspec-learn-from-refused.
    "longspec-verified-only": ["--speculative-algorithm", "LONGSPEC", "--longspec-learn-from-refused", "false"],
    # LONGSPEC with twice the default batch draft budget (64 draft tokens per verify step).
    "longspec-budget-128": ["--speculative-algorithm", "LONGSPEC", "--longspec-batch-draft-budget", "128"],
    # The draft's shape chosen per request and step (chain or tree), against the fixed chains above.
    "longspec-auto": ["--speculative-algorithm", "LONGSPEC", "--longspec-draft-shape", "auto"],
}
NEEDS_DRAFTER = {"owl", "hybrid"}
MODEL_CONTEXT = {DEFAULT_MODEL: 8192, CODER_MODEL: 32768}


# --------------------------------------------------------------------------------------------
# Plans


@dataclass
class WorkloadSpec:
    name: str
    kwargs: dict  # passed to the workload builder (sizes); "n_sessions" may be "C" = concurrency
    min_sessions: int = 1
    # concurrency levels this workload runs at (None: all of the phase's). Long single-turn prompts
    # are prefill-bound on a CPU, so the full suite measures them at c1 only.
    concurrency: Optional[list[int]] = None


@dataclass
class Phase:
    name: str
    model: Optional[str]  # embedded model name or path; None = default
    configs: list[str]
    concurrency: list[int]
    workloads: list[WorkloadSpec]
    server_args: list[str] = field(default_factory=list)


def suite_plan(quick: bool, model: Optional[str]) -> list[Phase]:
    if quick:
        wl = [
            WorkloadSpec("longdoc", {"buckets": ["1K", "2K", "4K"], "per_bucket": 1, "max_new_tokens": 32}),
            WorkloadSpec("code_edit", {"turns": 2, "max_new_tokens": 64}, min_sessions=1),
            WorkloadSpec("tool_json", {"turns": 2, "max_new_tokens": 64}, min_sessions=1),
            WorkloadSpec("chat", {"turns": 2, "max_new_tokens": 32}, min_sessions=1),
        ]
        return [Phase("suite", model, ["vanilla", "ngram", "suffix", "hybrid"], [1, 4], wl)]
    # Sized to finish in about an hour on the 2-core CPU machine (5 configs x ~12 min); every
    # workload, bucket (up to the default model's 8K context) and concurrency level of the issue.
    wl = [
        WorkloadSpec("longdoc", {"buckets": ["1K", "2K", "4K", "8K"], "per_bucket": 2, "max_new_tokens": 64},
                     concurrency=[1]),
        WorkloadSpec("code_edit", {"turns": 2, "max_new_tokens": 160, "min_lines": 8, "max_lines": 16},
                     min_sessions=2),
        WorkloadSpec("tool_json", {"turns": 2, "max_new_tokens": 128}, min_sessions=2),
        WorkloadSpec("chat", {"turns": 2, "max_new_tokens": 64}, min_sessions=4),
    ]
    return [Phase("suite", model, ["vanilla", "hybrid", "ngram", "suffix", "owl"], [1, 4, 16], wl)]


def issue4_plan(quick: bool) -> list[Phase]:
    """Issue 4: code-edit agent on the coder model + ShareGPT chat on the default model, at 1 and 8
    concurrent requests. Config order puts LONGSPEC second so a cut-short run still has its ratio."""
    if quick:
        code = {"turns": 1, "max_new_tokens": 128, "min_lines": 8, "max_lines": 14}
        chat = {"turns": 2, "max_new_tokens": 32}
    else:
        code = {"turns": 2, "max_new_tokens": 320, "min_lines": 15, "max_lines": 30}
        chat = {"turns": 2, "max_new_tokens": 128}
    return [
        # SGLang's CPU memory check refuses the 0.5B fp32 model at the default static fraction
        # when the shared machine has only a few GB free; the KV pool is sized by tokens anyway.
        Phase("code_edit", CODER_MODEL, ["vanilla", "longspec", "ngram"], [1, 8],
              [WorkloadSpec("code_edit", code, min_sessions=1 if quick else 2)],
              server_args=["--mem-fraction-static", "0.95", "--max-total-tokens", "16384"]),
        Phase("chat", DEFAULT_MODEL, ["vanilla", "longspec", "ngram"], [1, 8],
              [WorkloadSpec("chat", chat, min_sessions=2 if quick else 3)]),
    ]


# --------------------------------------------------------------------------------------------
# HTTP


def _post(url: str, body: dict, timeout: float = 1800) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def flush_cache(base_url: str) -> None:
    for _ in range(20):
        try:
            req = urllib.request.Request(base_url + "/flush_cache", data=b"", method="POST")
            with urllib.request.urlopen(req, timeout=60) as r:
                if r.status == 200:
                    return
        except Exception:  # noqa: BLE001 - 400 while requests are still pending: retry
            pass
        time.sleep(1.0)


def sse_chunks(response):
    """The JSON chunks of a streamed SGLang response (server-sent events, up to [DONE])."""
    for line in response.iter_lines():
        if not line or not line.startswith(b"data:"):
            continue
        payload = line[5:].strip()
        if payload == b"[DONE]":
            return
        yield json.loads(payload)


def generate_stream(base_url: str, input_ids: list[int], max_new_tokens: int) -> dict:
    """One streamed greedy /generate; returns text, meta_info, ttft and client-side latency."""
    import requests

    body = {"input_ids": input_ids, "stream": True,
            "sampling_params": {"temperature": 0.0, "max_new_tokens": max_new_tokens}}
    t0 = time.perf_counter()
    ttft, last = None, None
    with requests.post(base_url + "/generate", json=body, stream=True, timeout=3600) as r:
        r.raise_for_status()
        for last in sse_chunks(r):
            if ttft is None and last.get("meta_info", {}).get("completion_tokens", 0) > 0:
                ttft = time.perf_counter() - t0
    latency = time.perf_counter() - t0
    if last is None:
        raise RuntimeError("empty stream")
    return {"text": last.get("text", ""), "meta_info": last.get("meta_info", {}),
            "ttft": ttft if ttft is not None else latency, "latency": latency}


# --------------------------------------------------------------------------------------------
# Replay


def run_sessions(base_url: str, tok, sessions: list[W.Session], concurrency: int,
                 context_len: int, progress=None) -> tuple[list[dict], float]:
    """Replay sessions, `concurrency` at a time (turns of a session in order). Returns per-turn
    records and the wall time."""
    records: list[dict] = []
    lock = threading.Lock()

    def one(session: W.Session):
        msgs = [{"role": "system", "content": session.system}] if session.system else []
        for k, turn in enumerate(session.turns):
            msgs.append({"role": "user", "content": turn.user})
            ids = W.chat_prompt_ids(tok, msgs)
            max_new = turn.max_new_tokens
            if len(ids) + max_new > context_len:  # keep within the model's context: drop the oldest turns
                while len(msgs) > 2 and len(ids) + max_new > context_len:
                    drop = 1 if msgs[0]["role"] == "system" else 0
                    del msgs[drop:drop + 2]
                    ids = W.chat_prompt_ids(tok, msgs)
            rec = {"sid": session.sid, "workload": session.workload, "label": session.label,
                   "turn": k, "prompt_tokens": len(ids), "max_new_tokens": max_new}
            try:
                out = generate_stream(base_url, ids, max_new)
                mi = out["meta_info"]
                n = int(mi.get("completion_tokens", 0))
                ver = int(mi.get("spec_verify_ct", 0) or 0)
                rec.update({
                    "completion_tokens": n, "spec_verify_ct": ver,
                    "tau": n / ver if ver else 1.0,
                    "cached_tokens": int(mi.get("cached_tokens", 0) or 0),
                    "e2e_latency": float(mi.get("e2e_latency", out["latency"]) or out["latency"]),
                    "latency": out["latency"], "ttft": out["ttft"],
                    "tpot": (out["latency"] - out["ttft"]) / (n - 1) if n > 1 else None,
                    "finish": (mi.get("finish_reason") or {}).get("type"),
                    "text_sha": hashlib.sha1(out["text"].encode()).hexdigest()[:12],
                    "text_head": out["text"][:160],
                })
                if session.workload in ("code_edit", "tool_json"):
                    rec["text"] = out["text"]
                    # How much of the reply repeats its context verbatim (line level).
                    ctx = {ln.strip() for m in msgs for ln in m["content"].splitlines() if ln.strip()}
                    lines = [ln.strip() for ln in out["text"].splitlines() if ln.strip()]
                    rec["copied_line_frac"] = sum(ln in ctx for ln in lines) / len(lines) if lines else 0.0
                msgs.append({"role": "assistant", "content": out["text"]})
            except Exception as e:  # noqa: BLE001 - recorded, the session stops
                rec["error"] = repr(e)[:500]
            with lock:
                records.append(rec)
                if progress is not None:
                    progress.update(1)
            if "error" in rec:
                return

    t0 = time.perf_counter()
    ex = ThreadPoolExecutor(max_workers=concurrency)
    try:
        list(ex.map(one, sessions))
    finally:  # on Ctrl-C / SIGTERM do not wait for in-flight requests: the server is stopped next
        ex.shutdown(wait=False, cancel_futures=True)
    return records, time.perf_counter() - t0


# the fields of a drafter's refused drafts scored against the output (Counters.refused_scored)
REFUSED_SCORED_FIELDS = ("drafts", "tokens", "expected", "accepted")


def server_counts(stats_file: Path) -> dict[str, dict[str, float]]:
    """The LONGSPEC server's running counts so far, from its stats file: verified drafts per shape
    (chain / tree), drafts the router did not verify, per reason, and those scored against the
    output per drafter ("<source>:<field>", REFUSED_SCORED_FIELDS) (empty for other servers, or
    before the first step). A cell's counts are the difference across it."""
    try:
        stats = json.loads(Path(stats_file).read_text())
    except (OSError, ValueError):
        stats = {}
    return {"drafts_by_shape": {shape: int(v.get("drafts", 0))
                                for shape, v in (stats.get("by_shape") or {}).items()},
            "refusals": {reason: int(n) for reason, n in (stats.get("refusals") or {}).items()},
            "refused_scored": {f"{src}:{name}": x
                               for src, row in (stats.get("refused_scored") or {}).items()
                               for name, x in zip(REFUSED_SCORED_FIELDS, row)}}


def aggregate(records: list[dict], wall: float) -> dict:
    ok = [r for r in records if "error" not in r]
    n_out = sum(r["completion_tokens"] for r in ok)
    n_ver = sum(r["spec_verify_ct"] or r["completion_tokens"] for r in ok)
    tpots = [r["tpot"] for r in ok if r.get("tpot")]
    dec = [(r["completion_tokens"] - 1) / (r["latency"] - r["ttft"]) for r in ok
           if r["completion_tokens"] > 1 and r["latency"] > r["ttft"]]
    return {
        "requests": len(records), "errors": len(records) - len(ok),
        "prompt_tokens": sum(r["prompt_tokens"] for r in ok),
        "cached_tokens": sum(r.get("cached_tokens", 0) for r in ok),
        "output_tokens": n_out, "wall_s": wall,
        "throughput": n_out / wall if wall > 0 else 0.0,  # output tokens/s over the phase
        "tau": n_out / n_ver if n_ver else 1.0,
        "mean_tpot_ms": 1000 * sum(tpots) / len(tpots) if tpots else None,
        "mean_ttft_s": sum(r["ttft"] for r in ok) / len(ok) if ok else None,
        "mean_decode_tok_s": sum(dec) / len(dec) if dec else None,  # per request, after the first token
        "mean_latency_s": sum(r["latency"] for r in ok) / len(ok) if ok else None,
    }


def build_sessions(tok, spec: WorkloadSpec, concurrency: int, seed: int, context_len: int):
    kw = dict(spec.kwargs)
    builder = W.WORKLOADS[spec.name]
    if spec.name == "longdoc":
        kw["buckets"] = [b for b in kw["buckets"] if W.BUCKETS[b] <= context_len]
        return builder(tok, context_len=context_len, seed=seed, **kw)
    n = max(spec.min_sessions, concurrency)
    return builder(tok, n_sessions=n, seed=seed, **kw)


# --------------------------------------------------------------------------------------------
# Servers


def drafter_available(model: Optional[str]) -> bool:
    try:
        from sgl_longspec.drafters.owl import SHIPPED_CHECKPOINTS, shipped_checkpoint
    except Exception:  # noqa: BLE001
        return False
    name = model or DEFAULT_MODEL
    if name not in SHIPPED_CHECKPOINTS:
        return False
    return (shipped_checkpoint(name) / "config.json").is_file()


class Server:
    def __init__(self, model, args, log_path: Path, port: int, timeout: float):
        self.model, self.args, self.log_path, self.port, self.timeout = model, args, log_path, port, timeout
        self.proc = None
        self.base_url = f"http://127.0.0.1:{port}"

    def __enter__(self):
        from sgl_longspec.tools.cli import start_server, wait_healthy

        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")
        t0 = time.time()
        self.proc, self.model_folder = start_server(self.model, "127.0.0.1", self.port, list(self.args),
                                                    log_file=self._log)
        try:
            wait_healthy(self.base_url, self.proc, self.timeout)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        self.startup_s = time.time() - t0
        return self

    def __exit__(self, *exc):
        from sgl_longspec.tools.cli import stop_server

        if self.proc is not None:
            stop_server(self.proc)
            try:  # the launcher may exit before its children: clear our own process group
                os.killpg(self.proc.pid, 9)
            except (ProcessLookupError, PermissionError):
                pass
        self._log.close()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def warmup(base_url: str, tok) -> None:
    ids = W.chat_prompt_ids(tok, [{"role": "user", "content": "Say hello."}])
    _post(base_url + "/generate", {"input_ids": ids, "sampling_params": {"temperature": 0, "max_new_tokens": 8}})
    flush_cache(base_url)


# --------------------------------------------------------------------------------------------
# sglang.benchmark.serving


def bench_serving(base_url: str, model_folder: str, out_dir: Path, tag: str, concurrency: int,
                  num_prompts: int, output_len: int, seed: int) -> dict:
    """Drive `python -m sglang.benchmark.serving` (the module behind `sglang.bench_serving`) with
    ShareGPT prompts against a running server; returns its summary JSON line."""
    # A complete (valid) json of the first records of the truncated ShareGPT file, outside the
    # results folder (it is ~10 MB).
    data = Path(os.environ.get("LONGSPEC_CACHE", Path.home() / ".cache" / "sgl_longspec")) / "bench" / "sharegpt_first_2000.json"
    data.parent.mkdir(parents=True, exist_ok=True)
    if not data.exists():
        W.write_sharegpt_json(data, 2000)
    result_file = out_dir / f"bench_serving_{tag}_c{concurrency}.jsonl"
    cmd = [sys.executable, "-m", "sglang.benchmark.serving", "--backend", "sglang",
           "--base-url", base_url, "--dataset-name", "sharegpt", "--dataset-path", str(data),
           "--tokenizer", model_folder, "--num-prompts", str(num_prompts),
           "--sharegpt-output-len", str(output_len), "--sharegpt-context-len", "4096",
           "--max-concurrency", str(concurrency), "--seed", str(seed),
           "--output-file", str(result_file), "--disable-tqdm"]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    (out_dir / "logs").mkdir(exist_ok=True)
    (out_dir / "logs" / f"bench_serving_{tag}_c{concurrency}.log").write_text(proc.stdout + proc.stderr)
    summary = {"command": shlex.join(cmd), "returncode": proc.returncode, "wall_s": time.time() - t0}
    if proc.returncode == 0 and result_file.exists():
        lines = [ln for ln in result_file.read_text().splitlines() if ln.strip()]
        if lines:
            full = json.loads(lines[-1])
            keep = ("completed", "total_output_tokens", "output_throughput", "request_throughput",
                    "mean_ttft_ms", "median_ttft_ms", "mean_tpot_ms", "median_tpot_ms", "mean_itl_ms",
                    "mean_e2e_latency_ms", "accept_length", "duration", "max_concurrency")
            summary.update({k: full.get(k) for k in keep})
    return summary


# --------------------------------------------------------------------------------------------
# Main


AGENT_WORKLOADS = ("code_edit", "tool_json")


def export_agentic_trace(phases: list[Phase], path: Path, seed: int) -> int:
    """The agent sessions (code edit, tool JSON) of the preset, exactly as ``run_phase`` builds them
    at concurrency 1, written for ``sglang.bench_serving --dataset-name agentic-trace``."""
    from sgl_longspec.tools.models import resolve_model_path

    sessions, model = [], None
    for ph in phases:
        specs = [w for w in ph.workloads if w.name in AGENT_WORKLOADS]
        if not specs:
            continue
        if model not in (None, ph.model):
            break  # one tokenizer per trace
        model = ph.model
        tok = W.load_tokenizer(str(resolve_model_path(ph.model)))
        context_len = MODEL_CONTEXT.get(ph.model or DEFAULT_MODEL, 8192)
        for spec in specs:
            sessions += build_sessions(tok, spec, 1, seed + 1, context_len)
    if not sessions:
        print("[benchmarks.run] the selected preset has no code_edit or tool_json workload", file=sys.stderr)
        return 2
    trace = W.agentic_trace(tok, sessions, {"model": model or DEFAULT_MODEL, "seed": seed,
                                            "max_new_tokens": max(t.max_new_tokens for s in sessions
                                                                  for t in s.turns)})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(trace, indent=1))
    turns = sum(len(c) for c in trace["conversations"])
    print(f"[benchmarks.run] wrote {len(sessions)} conversations ({turns} turns) to {path}")
    return 0


def _summed(counts) -> dict:
    """Counters (dicts of numbers) added up key by key."""
    out: dict = {}
    for c in counts:
        for k, n in c.items():
            out[k] = out.get(k, 0) + n
    return out


def run_config(phase: Phase, args, out_dir: Path, results: dict, run: dict, tag: str, plan: dict,
               tok, context_len: int, model_folder: str, total_turns: int, rnd: int) -> dict:
    """One configuration's server, every cell of the phase on it: {cell: (requests, wall s,
    server_counts over the cell)}. Requests are appended to run["requests"]; a failure is recorded
    in the run and the notes, and ends this configuration only."""
    from tqdm import tqdm

    cells = {}
    stats_file = out_dir / "logs" / f"{tag}-longspec-stats.json"
    try:
        if args.base_url:
            ctx = _External(args.base_url)
        else:
            # LONGSPEC's own counters (verified drafts per shape...), which the server writes
            # to this file; the environment reaches the scheduler processes it spawns.
            os.environ["LONGSPEC_STATS_FILE"] = str(stats_file)
            ctx = Server(phase.model, run["server_args"], out_dir / "logs" / f"{tag}.log",
                         args.port or free_port(), args.startup_timeout)
        with ctx as srv:
            run["startup_s"] = getattr(srv, "startup_s", None)
            warmup(srv.base_url, tok)
            bar = tqdm(total=total_turns, desc=tag, unit="turn", dynamic_ncols=True)
            for conc in phase.concurrency:
                for spec in phase.workloads:
                    if (spec.name, conc) not in plan:
                        continue
                    before = server_counts(stats_file)
                    recs, wall = run_sessions(srv.base_url, tok, plan[(spec.name, conc)], conc,
                                              context_len, bar)
                    counts = {name: {k: n - before[name].get(k, 0) for k, n in now.items()}
                              for name, now in server_counts(stats_file).items()}
                    flush_cache(srv.base_url)
                    key = f"{spec.name}@c{conc}"
                    for r in recs:
                        r.update(concurrency=conc, cell=key, round=rnd)
                    run["requests"].extend(recs)
                    cells[key] = (recs, wall, counts)
            bar.close()
            if args.bench_serving:
                run["bench_serving"] = {}
                for conc in phase.concurrency:
                    run["bench_serving"][f"c{conc}"] = bench_serving(
                        srv.base_url, model_folder, out_dir, tag, conc,
                        args.bench_serving_prompts or max(4, 2 * conc), args.bench_serving_output_len,
                        args.seed)
    except Exception as e:  # noqa: BLE001 - one failing configuration must not lose the others
        run["error"] = repr(e)[:2000]
        results["notes"].append(f"{tag} failed: {e!r}"[:500])
        print(f"[benchmarks.run] {tag} FAILED: {e!r}", file=sys.stderr)
    finally:
        os.environ.pop("LONGSPEC_STATS_FILE", None)
    return cells


def run_phase(phase: Phase, args, out_dir: Path, results: dict) -> None:
    from sgl_longspec.tools.models import resolve_model_path

    model_folder = str(resolve_model_path(phase.model))
    tok = W.load_tokenizer(model_folder)
    context_len = MODEL_CONTEXT.get(phase.model or DEFAULT_MODEL, 8192)
    has_drafter = drafter_available(phase.model)
    configs = []
    for c in phase.configs:
        if c in NEEDS_DRAFTER and not has_drafter and args.base_url is None:
            results["notes"].append(f"{phase.name}: config {c!r} skipped: no OWL drafter checkpoint "
                                    f"shipped for {phase.model or DEFAULT_MODEL}")
            continue
        configs.append(c)
    # Sessions are built once per (workload, concurrency) and replayed identically for every config.
    plan = {}
    for conc in phase.concurrency:
        for spec in phase.workloads:
            if spec.concurrency is not None and conc not in spec.concurrency:
                continue
            plan[(spec.name, conc)] = build_sessions(tok, spec, conc, args.seed + conc, context_len)
    total_turns = sum(len(s.turns) for ss in plan.values() for s in ss)
    results["phases"][phase.name] = {
        "model": phase.model or DEFAULT_MODEL, "model_folder": model_folder, "context_len": context_len,
        "configs": configs, "concurrency": phase.concurrency, "drafter_shipped": has_drafter,
        "workloads": {f"{k[0]}@c{k[1]}": {"sessions": len(v), "turns": sum(len(s.turns) for s in v),
                                          "spec": next(w.kwargs for w in phase.workloads if w.name == k[0])}
                      for k, v in plan.items()},
        "runs": {},
    }
    runs = results["phases"][phase.name]["runs"]
    for rnd in range(args.rounds):
        for cfg in configs:
            server_args = CONFIGS[cfg] + phase.server_args + args.server_args
            run = runs.setdefault(cfg, {"server_args": server_args, "results": {}, "requests": [],
                                        "rounds": [], "wall_s": 0.0})
            tag = f"{phase.name}-{cfg}" + (f"-r{rnd + 1}" if args.rounds > 1 else "")
            t_cfg = time.time()
            cells = run_config(phase, args, out_dir, results, run, tag, plan, tok, context_len,
                               model_folder, total_turns, rnd)
            run["rounds"].append({key: {**aggregate(recs, wall), **counts}
                                  for key, (recs, wall, counts) in cells.items()})
            for key in cells:
                pooled = [r for r in run["requests"] if r["cell"] == key]
                this_cell = [rd[key] for rd in run["rounds"] if key in rd]
                run["results"][key] = aggregate(pooled, sum(c["wall_s"] for c in this_cell))
                for name in ("drafts_by_shape", "refusals", "refused_scored"):
                    run["results"][key][name] = _summed(c.get(name, {}) for c in this_cell)
                if key.startswith("longdoc@"):
                    for b in sorted({r["label"] for r in pooled}, key=lambda x: W.BUCKETS[x]):
                        sub = [r for r in pooled if r["label"] == b]
                        run["results"][f"longdoc[{b}]@{key.split('@')[1]}"] = aggregate(
                            sub, sum(r["latency"] for r in sub if "error" not in r))
            run["wall_s"] += time.time() - t_cfg
            _save(results, out_dir)
    _compare(results["phases"][phase.name])


class _External:
    """A server that is already running (--base-url): nothing is started or stopped."""

    def __init__(self, base_url):
        self.base_url = base_url.rstrip("/")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def _compare(ph: dict) -> None:
    """Ratios to no speculation and to NGRAM; output agreement with no speculation."""
    runs = ph["runs"]
    ref = runs.get("vanilla")
    ref_text = {}
    if ref:
        ref_text = {(r["sid"], r["turn"], r["concurrency"], r.get("round", 0)): r.get("text_sha")
                    for r in ref["requests"]}
    for cfg, run in runs.items():
        for key, agg in run["results"].items():
            for base in ("vanilla", "ngram"):
                b = runs.get(base, {}).get("results", {}).get(key)
                if not b or cfg == base:
                    continue
                agg[f"speedup_vs_{base}"] = agg["throughput"] / b["throughput"] if b["throughput"] else None
                if agg.get("mean_tpot_ms") and b.get("mean_tpot_ms"):
                    agg[f"tpot_ratio_vs_{base}"] = b["mean_tpot_ms"] / agg["mean_tpot_ms"]  # >1 = faster
                agg[f"tau_ratio_vs_{base}"] = agg["tau"] / b["tau"] if b["tau"] else None
                # With --rounds: the ratio in each round (both servers of a round ran one after
                # the other), whose spread is the comparison's noise.
                per_round = [r[key]["throughput"] / v[key]["throughput"]
                             for r, v in zip(run.get("rounds", []), runs[base].get("rounds", []))
                             if key in r and key in v and v[key]["throughput"]]
                if len(per_round) > 1:
                    agg[f"speedup_vs_{base}_rounds"] = per_round
        if ref and cfg != "vanilla":
            same = diff = 0
            for r in run["requests"]:
                k = (r["sid"], r["turn"], r["concurrency"], r.get("round", 0))
                if k in ref_text and r.get("text_sha"):
                    if r["text_sha"] == ref_text[k]:
                        same += 1
                    else:
                        diff += 1
            run["output_match_vs_vanilla"] = {"same": same, "different": diff}


def _save(results: dict, out_dir: Path) -> None:
    tmp = out_dir / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(out_dir / "results.json")


def _fmt(v, nd=2):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def _spread(ratios: Optional[list]) -> str:
    """' (min-max over N rounds)' of a cell's per-round ratios, '' for a single round."""
    if not ratios:
        return ""
    return f" ({min(ratios):.2f}-{max(ratios):.2f}, {len(ratios)} rounds)"


def markdown(results: dict) -> str:
    lines = [f"# {results['title']}", "", f"Command: `{results['command']}`  ",
             f"Date: {results['date']}  ", f"Machine: {results['machine']}", ""]
    for pname, ph in results["phases"].items():
        lines += [f"## {pname}: model {ph['model']}", ""]
        keys = []
        for run in ph["runs"].values():
            for k in run["results"]:
                if k not in keys:
                    keys.append(k)
        lines += ["| workload@concurrency | config | req | out tok | tau | out tok/s | TPOT ms | TTFT s | "
                  "x vanilla (tok/s) | x vanilla (TPOT) | tau / NGRAM | x NGRAM (tok/s) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for k in keys:
            for cfg, run in ph["runs"].items():
                a = run["results"].get(k)
                if not a:
                    continue
                lines.append(
                    f"| {k} | {cfg} | {a['requests']}{'' if not a['errors'] else ' (' + str(a['errors']) + ' err)'} | "
                    f"{a['output_tokens']} | {_fmt(a['tau'])} | {_fmt(a['throughput'])} | "
                    f"{_fmt(a['mean_tpot_ms'], 0)} | {_fmt(a['mean_ttft_s'])} | "
                    f"{_fmt(a.get('speedup_vs_vanilla'))}{_spread(a.get('speedup_vs_vanilla_rounds'))} | "
                    f"{_fmt(a.get('tpot_ratio_vs_vanilla'))} | "
                    f"{_fmt(a.get('tau_ratio_vs_ngram'))} | {_fmt(a.get('speedup_vs_ngram'))} |")
        lines.append("")
        extra = []
        for cfg, run in ph["runs"].items():
            m = run.get("output_match_vs_vanilla")
            s = f"- {cfg}: server args `{' '.join(run['server_args']) or '(none)'}`"
            if run.get("startup_s"):
                s += f", startup {run['startup_s']:.0f} s"
            s += f", wall {run.get('wall_s', 0):.0f} s"
            if m:
                s += f", greedy output identical to vanilla on {m['same']}/{m['same'] + m['different']} turns"
            if run.get("error"):
                s += f", ERROR {run['error'][:200]}"
            extra.append(s)
            for tag, bs in (run.get("bench_serving") or {}).items():
                extra.append(f"  - sglang.benchmark.serving {tag}: rc {bs.get('returncode')}, "
                             f"{_fmt(bs.get('output_throughput'))} out tok/s, TPOT {_fmt(bs.get('mean_tpot_ms'), 0)} ms, "
                             f"accept length {_fmt(bs.get('accept_length'))}")
        lines += extra + [""]
    if results["notes"]:
        lines += ["Notes:", ""] + [f"- {n}" for n in results["notes"]] + [""]
    return "\n".join(lines)


def headline(results: dict) -> list[str]:
    out = []
    for pname, ph in results["phases"].items():
        for cfg, run in ph["runs"].items():
            if cfg in ("vanilla",):
                continue
            for k, a in run["results"].items():
                if "[" in k:
                    continue
                parts = [f"tau {_fmt(a['tau'])}"]
                if a.get("speedup_vs_vanilla") is not None:
                    parts.append(f"{_fmt(a['speedup_vs_vanilla'])}x vanilla tok/s"
                                 f"{_spread(a.get('speedup_vs_vanilla_rounds'))}")
                if a.get("tpot_ratio_vs_vanilla") is not None:
                    parts.append(f"{_fmt(a['tpot_ratio_vs_vanilla'])}x vanilla TPOT")
                if a.get("tau_ratio_vs_ngram") is not None:
                    parts.append(f"tau {_fmt(a['tau_ratio_vs_ngram'])}x NGRAM's")
                out.append(f"{pname} / {k} / {cfg}: " + ", ".join(parts))
    return out


def write_readme(results: dict, out_dir: Path, extra_notes: str = "") -> None:
    lines = [f"# {results['title']}", "",
             "Exact command (from the repository root):", "", "```bash", results["command"], "```", "",
             f"- Date: {results['date']}", f"- Machine: {results['machine']}",
             f"- Wall time: {results.get('wall_s', 0) / 60:.1f} min", "",
             "Files: `results.json` (every request and aggregate), `results.md` (tables), `*.png` (plots), "
             "`logs/` (server logs).", "",
             "## Headline ratios", ""] + [f"- {h}" for h in headline(results)] + [""]
    if extra_notes:
        lines += [extra_notes, ""]
    if results["notes"]:
        lines += ["## Notes", ""] + [f"- {n}" for n in results["notes"]] + [""]
    existing = out_dir / "NOTES.md"
    if existing.exists():
        lines += [existing.read_text()]
    (out_dir / "README.md").write_text("\n".join(lines))


def machine_desc() -> str:
    try:
        load = os.getloadavg()
        load_s = f", load average at start {load[0]:.1f}"
    except OSError:
        load_s = ""
    cpu = platform.processor() or platform.machine()
    try:
        for ln in open("/proc/cpuinfo"):
            if ln.startswith("model name"):
                cpu = ln.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{os.cpu_count()}-core CPU ({cpu}), no GPU, shared with other engineers' jobs{load_s}; "
            f"Python {platform.python_version()}")


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small settings, < 15 min on the CPU machine")
    p.add_argument("--preset", choices=["suite", "issue4"], default="suite")
    p.add_argument("--model-path", default=None, help="model for the suite preset (default: SmolLM2-135M)")
    p.add_argument("--configs", nargs="+", default=None,
                   help=f"subset of {sorted(CONFIGS)} (with --base-url: one label for the running server)")
    p.add_argument("--workloads", nargs="+", default=None, choices=sorted(W.WORKLOADS))
    p.add_argument("--concurrency", nargs="+", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=None, help="override every workload's")
    p.add_argument("--sessions", type=int, default=None, help="override the minimum sessions per workload")
    p.add_argument("--turns", type=int, default=None, help="override the turns per session")
    p.add_argument("--buckets", nargs="+", default=None, choices=sorted(W.BUCKETS), help="longdoc buckets")
    p.add_argument("--phases", nargs="+", default=None, help="run only these phases of the preset")
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results/<suite|e2e>)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the configurations this many times in turn (vanilla, longspec, vanilla, "
                        "longspec, ...), a fresh server each: the tables pool the rounds and give "
                        "each cell's ratio to vanilla per round (min-max), the comparison's noise")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--startup-timeout", type=float, default=900)
    p.add_argument("--base-url", default=None, help="benchmark an already running server (start nothing)")
    p.add_argument("--server-args", default="", help="extra flags for every server (one string)")
    p.add_argument("--bench-serving", action="store_true",
                   help="also run `python -m sglang.benchmark.serving` (ShareGPT) against each server")
    p.add_argument("--bench-serving-prompts", type=int, default=None)
    p.add_argument("--bench-serving-output-len", type=int, default=32)
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--export-agentic-trace", metavar="FILE", default=None,
                   help="write the preset's code-edit and tool-JSON sessions as an agentic-trace JSON "
                        "(sglang.bench_serving --dataset-name agentic-trace) and exit")
    args = p.parse_args(argv)
    args.server_args = shlex.split(args.server_args)

    def _interrupt(signum, frame):  # SIGTERM/SIGHUP unwind like Ctrl-C: servers are always stopped
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)

    if args.preset == "issue4":
        phases = issue4_plan(args.quick)
        out_dir = Path(args.out or REPO / "benchmarks" / "results" / "e2e")
        title = "Issue 4: end-to-end code-edit and chat benchmark (vanilla vs NGRAM vs LONGSPEC)"
    else:
        phases = suite_plan(args.quick, args.model_path)
        out_dir = Path(args.out or REPO / "benchmarks" / "results" / "suite")
        title = f"Benchmark suite ({'quick' if args.quick else 'full'} mode)"
    for ph in phases:
        if args.configs:
            ph.configs = [c for c in args.configs] if args.base_url else [c for c in args.configs if c in CONFIGS]
        if args.base_url and not args.configs:
            ph.configs = ["current"]
        if args.workloads:
            ph.workloads = [w for w in ph.workloads if w.name in args.workloads]
        if args.concurrency:
            ph.concurrency = args.concurrency
            for w in ph.workloads:
                w.concurrency = None
        for w in ph.workloads:
            if args.max_new_tokens:
                w.kwargs["max_new_tokens"] = args.max_new_tokens
            if args.sessions:
                w.min_sessions = args.sessions
            if args.turns and "turns" in w.kwargs:
                w.kwargs["turns"] = args.turns
            if args.buckets and w.name == "longdoc":
                w.kwargs["buckets"] = args.buckets
    if args.phases:
        phases = [ph for ph in phases if ph.name in args.phases]
    if args.export_agentic_trace:
        return export_agentic_trace(phases, Path(args.export_agentic_trace), args.seed)
    if args.base_url:
        for c in ("current",):
            CONFIGS.setdefault(c, [])
        for ph in phases:
            for c in ph.configs:
                CONFIGS.setdefault(c, [])
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {
        "title": title,
        "command": "python -m benchmarks.run " + shlex.join(sys.argv[1:] if argv is None else argv),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_desc(),
        "git_commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                     text=True).stdout.strip(),
        "phases": {}, "notes": [],
    }
    t0 = time.time()
    try:
        for ph in phases:
            run_phase(ph, args, out_dir, results)
    finally:
        results["wall_s"] = time.time() - t0
        _save(results, out_dir)
        (out_dir / "results.md").write_text(markdown(results))
        if not args.no_plots:
            try:
                from benchmarks.plots import make_plots

                results["plots"] = make_plots(results, out_dir)
                _save(results, out_dir)
            except Exception as e:  # noqa: BLE001 - plots are optional (matplotlib)
                print(f"[benchmarks.run] plots skipped: {e!r}", file=sys.stderr)
        write_readme(results, out_dir)
    print((out_dir / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
