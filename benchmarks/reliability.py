"""Load-and-fault suite: many concurrent clients, disconnects, aborts, bad input and injected faults
against one LONGSPEC server; nothing may be lost, wrong or leaked.

    python -m benchmarks.reliability --out benchmarks/results/reliability            # 64 clients, 10 min
    python -m benchmarks.reliability --clients 8 --minutes 1 --out /tmp/rel           # a short run

1. A LONGSPEC server (the embedded model, float32) starts with fault injection on
   (``LONGSPEC_INJECT_FAULTS``, every point of ``sgl_longspec.step.faults``) and its stats snapshot
   (``LONGSPEC_STATS_FILE``). Warm-up: one burst of concurrent requests of every kind, then the
   idle baseline (below).
2. ``--clients`` threads send requests back to back for ``--minutes`` (loopback only). A request is
   one of a seeded pool of real prompts (ShareGPT chat, code edit, tool JSON; the same prompt
   recurs, as agent retries do) and of boundary requests (repetitive text ending 7-41 tokens
   before the context length, max_new_tokens reaching it: ``BOUNDARY_MARGINS``), sent in one of
   these ways:
   ``stream`` / ``full`` (streamed or not, to completion), ``schema`` (tool JSON under a JSON-schema
   constraint), ``disconnect`` (the client drops the stream after a few chunks), ``abort``
   (``POST /abort_request`` for its rid after a few chunks), ``bad`` (a token id outside the
   vocabulary, or a negative max_new_tokens: must get a 4xx).
3. Every few seconds a sampler records the server's RSS (its whole process group), the worker's
   per-request state (requests tracked by the index, the router and the OWL hidden-state store),
   suffix-index bytes (per-request and global tree), SGLang's KV tokens in use and queue lengths.
4. Afterwards the idle state is measured again the same way as the baseline: after
   ``/flush_cache`` and two small probe requests.
5. The LONGSPEC server is stopped, a plain server started, and every request that completed
   (was neither aborted nor dropped) is replayed on it: the greedy output must be identical.

Report (``--out``): report.json, report.md (the figures and pass/fail against the targets: 0 lost
or wrong requests, every 4xx as expected, per-request state and KV back to baseline, RSS within
``--rss-tolerance`` of baseline, every injected fault survived), memory.png (memory over time),
logs/.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import signal
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

from benchmarks import run as R
from benchmarks import workloads as W
from benchmarks.bench_constrained import TOOL_CALL_SCHEMA

# Every fault point, at rates that make each fire many times in a 10-minute run (and the OWL
# drafter's often enough to trip its circuit breaker).
FAULTS = "index:0.002,suffix_drafter:0.01,owl_drafter:0.05,owl_nan:0.02,grammar:0.02,verify:0.03"
# How a request is sent, with its weight.
ACTIONS = {"stream": 30, "full": 25, "schema": 10, "disconnect": 12, "abort": 12, "bad": 6}
PER_REQUEST_STATE = ("tracked_requests", "router_records", "hidden_states", "num_active_requests")
# Boundary requests (issue 34): repetitive text (long drafts, accepted) whose prompt ends this
# many tokens before the context length, with max_new_tokens reaching it exactly. 7 is the
# closest prompt SGLang admits (it refuses prompts within 6 tokens of the context, plain
# decoding alike: tests/test_context_boundary.py covers those refusals); 15-17 sit around the
# default verify window of 16; 41 is the report's shape (8,151 + 40 = 8,191 at 8,192).
BOUNDARY_MARGINS = (7, 15, 16, 17, 41)
BOUNDARY_TEXT = "alpha beta gamma delta, "


# --------------------------------------------------------------------------------------------
# The request pool


def boundary_requests(tok, context: int, margins=BOUNDARY_MARGINS) -> list[dict]:
    """Prompts that end `m` tokens before the context length, max_new_tokens m (together exactly
    the context): prefixes of one repetitive text, so the radix cache shares their prefill."""
    repeats = max(1, context // 4)
    ids = tok.encode(BOUNDARY_TEXT * repeats, add_special_tokens=False)
    while len(ids) < context:  # a repetition tokenizes shorter inside the text than alone
        repeats *= 2
        ids = tok.encode(BOUNDARY_TEXT * repeats, add_special_tokens=False)
    return [{"kind": "boundary", "input_ids": ids[: context - m], "max_new_tokens": m} for m in margins]


def model_context_length(model_folder) -> int:
    """The context length SGLang derives for the model folder (its config.json)."""
    cfg = json.loads((Path(model_folder) / "config.json").read_text())
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        if cfg.get(key):
            return int(cfg[key])
    raise ValueError(f"no context length in {model_folder}/config.json; pass --context-length")


def request_pool(tok, n_per_kind: int, seed: int, context: int | None = None) -> list[dict]:
    """Real prompts as token ids: chat (ShareGPT first turns), code edit, tool JSON; with
    `context`, also the boundary requests of that context length."""
    pool = []
    kinds = (("chat", W.chat_sessions(tok, n_per_kind, 1, 48, seed=seed)),
             ("code_edit", W.code_edit_sessions(tok, n_per_kind, 1, 128, seed=seed, min_lines=8, max_lines=16)),
             ("tool_json", W.tool_json_sessions(tok, n_per_kind, 1, 96, seed=seed)))
    for kind, sessions in kinds:
        for s in sessions:
            pool.append({"kind": kind, "input_ids": W.chat_prompt_ids(tok, s.first_messages()),
                         "max_new_tokens": s.turns[0].max_new_tokens})
    if context is not None:
        pool += boundary_requests(tok, context)
    return pool


def body_for(req: dict, action: str, rid: str) -> dict:
    sp = {"temperature": 0.0, "max_new_tokens": req["max_new_tokens"]}
    if action == "schema":
        sp["json_schema"] = json.dumps(TOOL_CALL_SCHEMA)
    return {"input_ids": req["input_ids"], "sampling_params": sp, "rid": rid,
            "stream": action in ("stream", "disconnect", "abort", "schema")}


# --------------------------------------------------------------------------------------------
# One client request


def _stream(session, url: str, body: dict, stop_after: int | None, on_stop=None) -> dict:
    """Read a streamed /generate; after `stop_after` chunks call on_stop (abort) or drop it."""
    last, chunks = None, 0
    with session.post(url + "/generate", json=body, stream=True, timeout=1800) as r:
        if r.status_code != 200:
            return {"status": r.status_code, "error": r.text[:300]}
        for last in R.sse_chunks(r):
            chunks += 1
            if stop_after is not None and chunks == stop_after:
                if on_stop is None:
                    return {"status": 200, "dropped": True, "chunks": chunks}
                on_stop()
    if last is None:
        return {"status": 200, "error": "empty stream"}
    return {"status": 200, "text": last.get("text", ""), "meta_info": last.get("meta_info", {}),
            "chunks": chunks}


def send(session, url: str, req: dict, action: str, rid: str, rng: random.Random, vocab: int) -> dict:
    t0 = time.time()
    rec = {"rid": rid, "action": action, "kind": req["kind"], "pool_index": req["index"], "t0": t0}
    try:
        if action == "bad":
            body = body_for(req, "full", rid)
            if rng.random() < 0.5:
                body["input_ids"] = body["input_ids"][:-1] + [vocab + 5]
            else:
                body["sampling_params"]["max_new_tokens"] = -1
            r = session.post(url + "/generate", json=body, timeout=600)
            rec.update(status=r.status_code, outcome="rejected" if 400 <= r.status_code < 500 else "wrong-status",
                       message=r.text[:200])
            return rec
        body = body_for(req, action, rid)
        if action == "full":
            r = session.post(url + "/generate", json=body, timeout=1800)
            out = ({"status": 200, **{k: v for k, v in r.json().items() if k in ("text", "meta_info")}}
                   if r.status_code == 200 else {"status": r.status_code, "error": r.text[:300]})
        elif action == "disconnect":
            out = _stream(session, url, body, rng.randint(1, 12))
        elif action == "abort":
            def abort():
                session.post(url + "/abort_request", json={"rid": rid}, timeout=60)
            out = _stream(session, url, body, rng.randint(1, 12), on_stop=abort)
        else:  # stream, schema
            out = _stream(session, url, body, None)
    except Exception as e:  # noqa: BLE001 - a transport failure is a lost request
        out = {"status": None, "error": repr(e)[:300]}
    rec["status"] = out.get("status")
    rec["latency"] = time.time() - t0
    if out.get("dropped"):
        rec["outcome"] = "dropped"
    elif "error" in out:
        rec.update(outcome="lost", error=out["error"])
    else:
        mi = out.get("meta_info") or {}
        finish = (mi.get("finish_reason") or {}).get("type")
        rec.update(text=out["text"], finish=finish, completion_tokens=int(mi.get("completion_tokens", 0)),
                   spec_verify_ct=int(mi.get("spec_verify_ct", 0) or 0))
        rec["outcome"] = "aborted" if finish == "abort" else "completed"
        if action == "abort" and finish != "abort":
            rec["abort_late"] = True  # the abort arrived after the request had finished
    return rec


# --------------------------------------------------------------------------------------------
# Observation


def _get_json(url: str, timeout: float = 30):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def group_rss_mb(pgid: int) -> float:
    """Resident memory of every process in the server's process group (launcher, scheduler,
    detokenizer, tokenizer), in MiB."""
    total = 0
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[2]) != pgid:  # field 5 (pgrp), counted after the command name
                continue
            with open(f"/proc/{d}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return total / 1024


def _find(obj, key):
    """First value of `key` anywhere in a nested JSON object."""
    if isinstance(obj, dict):
        if key in obj:
            return obj[key]
        obj = list(obj.values())
    if isinstance(obj, list):
        for v in obj:
            found = _find(v, key)
            if found is not None:
                return found
    return None


def sample(srv, stats_file: Path, t_start: float) -> dict:
    row = {"t": time.time() - t_start, "rss_mb": group_rss_mb(srv.proc.pid)}
    try:
        st = json.loads(stats_file.read_text())
        row.update({k: st.get(k) for k in PER_REQUEST_STATE + ("index_memory_bytes", "index_global_bytes",
                                                              "num_cached_responses")})
        row["index_request_bytes"] = (st.get("index_memory_bytes") or 0) - (st.get("index_global_bytes") or 0)
    except (OSError, ValueError):
        pass
    try:
        loads = _get_json(srv.base_url + "/v1/loads?include=all")
        for k in ("num_used_tokens", "num_running_reqs", "num_waiting_reqs"):
            row[k] = _find(loads, k)
    except Exception:  # noqa: BLE001 - a busy server may answer late; the row keeps the rest
        pass
    return row


def idle_snapshot(srv, stats_file: Path, t_start: float, probe_ids: list[int]) -> dict:
    """The idle state, measured the same way before and after the load: flush the radix cache,
    then two small requests (the worker's stats snapshot is written at decode steps, so it shows
    one probe in flight either way)."""
    R.flush_cache(srv.base_url)
    for _ in range(2):
        R._post(srv.base_url + "/generate", {"input_ids": probe_ids,
                                             "sampling_params": {"temperature": 0, "max_new_tokens": 4}})
    time.sleep(2.0)
    R.flush_cache(srv.base_url)
    return sample(srv, stats_file, t_start)


# --------------------------------------------------------------------------------------------
# The run


def load_phase(srv, pool: list[dict], clients: int, seconds: float, seed: int, vocab: int, bar) -> list[dict]:
    import requests

    deadline = time.time() + seconds
    records: list[dict] = []
    lock = threading.Lock()
    names, weights = list(ACTIONS), list(ACTIONS.values())

    def client(cid: int):
        rng = random.Random(f"{seed}-{cid}")
        session = requests.Session()
        n = 0
        while time.time() < deadline:
            action = rng.choices(names, weights)[0]
            if action == "schema":
                candidates = [p for p in pool if p["kind"] == "tool_json"]
            else:
                candidates = pool
            req = rng.choice(candidates)
            rec = send(session, srv.base_url, req, action, f"rel-{cid}-{n}", rng, vocab)
            n += 1
            with lock:
                records.append(rec)
                bar.set_postfix_str(f"{len(records)} requests", refresh=False)

    with ThreadPoolExecutor(max_workers=clients) as ex:
        list(ex.map(client, range(clients)))
    return records


def replay_plain(model, pool: list[dict], records: list[dict], out: Path, timeout: float,
                 server_args=()) -> dict:
    """Every completed request's greedy output on a plain server (16 at a time)."""
    done = [r for r in records if r["outcome"] == "completed"]
    keys = sorted({(r["pool_index"], r["action"] == "schema") for r in done})
    ref: dict = {}
    with R.Server(model, list(server_args), out / "logs" / "server-plain.log", R.free_port(), timeout) as srv:
        def one(key):
            idx, schema = key
            body = body_for(pool[idx], "schema" if schema else "full", f"ref-{idx}-{int(schema)}")
            body["stream"] = False
            ref[key] = R._post(srv.base_url + "/generate", body)["text"]

        with ThreadPoolExecutor(max_workers=16) as ex:
            list(ex.map(one, keys))
    wrong = [r["rid"] for r in done if r["text"] != ref[(r["pool_index"], r["action"] == "schema")]]
    return {"distinct_requests": len(keys), "compared": len(done), "wrong": wrong}


def verdict(report: dict, rss_tol: float) -> dict:
    b, a = report["baseline"], report["after"]
    outcomes = report["outcomes"]
    checks = {
        "no request lost": outcomes.get("lost", 0) == 0,
        "every bad request got a 4xx": outcomes.get("wrong-status", 0) == 0,
        "completed outputs identical to plain": not report["replay"]["wrong"],
        # Both snapshots hold one small probe in flight. A leak only ever adds state; the probe
        # itself can hold less after than before, when an injected fault turned it plain (it then
        # leaves the suffix index): "back" = nothing above the baseline.
        "per-request state back to baseline": all((a.get(k) or 0) <= (b.get(k) or 0) for k in PER_REQUEST_STATE),
        # The probe's tree is a few tokens longer or shorter depending on which decode step wrote
        # the snapshot: within 1 KiB above baseline.
        "per-request index bytes back to baseline (within 1 KiB)":
            (a.get("index_request_bytes") or 0) - (b.get("index_request_bytes") or 0) <= 1024,
        "KV tokens in use back to baseline": a.get("num_used_tokens") == b.get("num_used_tokens"),
        f"RSS within {rss_tol:.0%} of baseline": a["rss_mb"] <= b["rss_mb"] * (1 + rss_tol),
        "every fault point fired and the server survived": bool(report["faults_injected"]) and all(
            v > 0 for v in report["faults_injected"].values()) and report["server_alive_after"],
        "global tree within its bound": (a.get("num_cached_responses") or 0) <= report["global_cache_requests"],
    }
    return checks


def plot(samples: list[dict], marks: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t"] / 60 for s in samples]
    fig, axes = plt.subplots(3, 1, figsize=(8, 7.5), sharex=True)
    axes[0].plot(t, [s["rss_mb"] for s in samples], color="#a33")
    axes[0].set_ylabel("server RSS (MiB)")
    axes[1].plot(t, [(s.get("index_request_bytes") or 0) / 2**20 for s in samples], label="per-request trees")
    axes[1].plot(t, [(s.get("index_global_bytes") or 0) / 2**20 for s in samples], label="global tree")
    axes[1].plot(t, [(s.get("num_used_tokens") or 0) / 1000 for s in samples], label="KV tokens in use (K)")
    axes[1].set_ylabel("MiB / K tokens")
    axes[1].legend(fontsize=8)
    for k in PER_REQUEST_STATE + ("num_waiting_reqs",):
        axes[2].plot(t, [s.get(k) or 0 for s in samples], label=k)
    axes[2].set_ylabel("count")
    axes[2].set_xlabel("minutes")
    axes[2].legend(fontsize=7, ncol=3)
    for ax in axes:
        for name, x in marks.items():
            ax.axvline(x / 60, color="k", lw=0.6, ls="--")
    axes[0].set_title("LONGSPEC under load and faults (dashed: load start / end / idle check)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(report: dict) -> str:
    b, a = report["baseline"], report["after"]
    lines = [f"# Load-and-fault run\n", f"Command: `{report['command']}`\n",
             f"Date: {report['date']}; machine: {report['machine']}; {report['clients']} clients for "
             f"{report['minutes']} min; faults `{report['faults']}`.\n", "## Targets\n",
             "| check | result |", "|---|---|"]
    lines += [f"| {k} | {'PASS' if v else '**FAIL**'} |" for k, v in report["checks"].items()]
    lines += ["", "## Requests\n", "| outcome | count |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in sorted(report["outcomes"].items())]
    lines += ["", f"By action: {json.dumps(report['by_action'])}. By kind (boundary: prompts ending "
              f"{', '.join(map(str, BOUNDARY_MARGINS))} tokens before the {report.get('context_length')}-token "
              f"context): {json.dumps(report.get('by_kind', {}))}. Aborts that arrived after the request "
              f"had finished (counted as completed and compared): {report['abort_late']}. Completed "
              f"requests compared with a plain server: {report['replay']['compared']} "
              f"({report['replay']['distinct_requests']} distinct), wrong: {len(report['replay']['wrong'])}. "
              f"Output tokens: {report['output_tokens']} ({report['output_tokens'] / (60 * report['minutes']):.1f}"
              f" tok/s over the load), tau {report['tau']:.2f}.", "",
             "## Idle state, before and after\n", "| measure | baseline | after | after, before the idle check |",
             "|---|---|---|---|"]
    end = report["end_of_load"]
    for k in ("rss_mb",) + PER_REQUEST_STATE + ("index_request_bytes", "index_global_bytes",
                                                 "num_cached_responses", "num_used_tokens"):
        def f(v):
            return f"{v:.0f}" if isinstance(v, float) else str(v)
        lines.append(f"| {k} | {f(b.get(k))} | {f(a.get(k))} | {f(end.get(k))} |")
    lines += ["", f"Faults injected (by point): {json.dumps(report['faults_injected'])}; fallbacks: "
              f"{json.dumps(report['fallbacks'])}; circuit-breaker trips: {json.dumps(report['breaker_trips'])}.",
              "", "![memory over time](memory.png)", ""]
    return "\n".join(lines)


def _restore(env: dict) -> None:
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def main(argv=None) -> int:
    from tqdm import tqdm

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/reliability"))
    ap.add_argument("--model-path", default=None)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--prompts-per-kind", type=int, default=16)
    ap.add_argument("--faults", default=FAULTS, help="LONGSPEC_INJECT_FAULTS for the server ('' = none)")
    ap.add_argument("--rss-tolerance", type=float, default=0.05)
    ap.add_argument("--sample-every", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--context-length", type=int, default=None,
                    help="both servers' --context-length (default: the model's); the boundary "
                         "requests end at it")
    ap.add_argument("--startup-timeout", type=float, default=900)
    ap.add_argument("--recheck", action="store_true",
                    help="only re-evaluate the checks of the finished run in --out (report.json) and "
                         "rewrite report.md and memory.png, e.g. after a check was corrected")
    args = ap.parse_args(argv)
    if args.recheck:
        report = json.loads((args.out / "report.json").read_text())
        report["checks"] = verdict(report, args.rss_tolerance)
        (args.out / "report.json").write_text(json.dumps(report, indent=1, default=str))
        return write_report(report, args.out)
    try:  # the plot is drawn at the very end: fail before the run, not after it
        import matplotlib  # noqa: F401
    except ImportError:
        ap.error("the memory plot needs matplotlib: pip install -e '.[bench]'")

    def _interrupt(signum, frame):  # SIGTERM/SIGHUP unwind like Ctrl-C: servers are always stopped
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    out: Path = args.out
    (out / "logs").mkdir(parents=True, exist_ok=True)
    stats_file = out / "logs" / "longspec_stats.json"
    stats_file.unlink(missing_ok=True)
    env = {"LONGSPEC_STATS_FILE": str(stats_file), "LONGSPEC_INJECT_FAULTS": args.faults,
           "LONGSPEC_FAULT_SEED": str(args.seed)}
    old_env = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # start_server passes the environment on to the server
    global_cache_requests = 4096
    report: dict = {"command": "python -m benchmarks.reliability " + shlex.join(argv if argv is not None else sys.argv[1:]),
                    "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": R.machine_desc(),
                    "clients": args.clients, "minutes": args.minutes, "faults": args.faults,
                    "global_cache_requests": global_cache_requests}
    context_args = ["--context-length", str(args.context_length)] if args.context_length else []
    samples: list[dict] = []
    records: list[dict] = []
    marks: dict = {}
    try:
        srv_cm = R.Server(args.model_path, ["--speculative-algorithm", "LONGSPEC", *context_args],
                          out / "logs" / "server-longspec.log", R.free_port(), args.startup_timeout)
        with srv_cm as srv:
            _restore(old_env)  # the plain server later runs without them
            tok = W.load_tokenizer(srv.model_folder)
            vocab = len(tok)
            context = args.context_length or model_context_length(srv.model_folder)
            report["context_length"] = context
            pool = request_pool(tok, args.prompts_per_kind, args.seed, context)
            for i, p in enumerate(pool):
                p["index"] = i
            probe = W.chat_prompt_ids(tok, [{"role": "user", "content": "Say hello."}])
            t_start = time.time()
            # Warm-up: one burst of every kind (so the baseline already holds the steady working set).
            import requests

            with ThreadPoolExecutor(max_workers=16) as ex:
                list(ex.map(lambda p: requests.post(srv.base_url + "/generate", json={
                    **body_for(p, "full", f"warm-{p['index']}"), "rid": f"warm-{p['index']}"}, timeout=1800),
                    pool[:: max(1, len(pool) // 16)]))
            report["baseline"] = idle_snapshot(srv, stats_file, t_start, probe)
            samples.append({**report["baseline"], "phase": "baseline"})
            stop = threading.Event()

            def sampler():
                while not stop.wait(args.sample_every):
                    samples.append(sample(srv, stats_file, t_start))

            th = threading.Thread(target=sampler, daemon=True)
            th.start()
            marks["load start"] = time.time() - t_start
            seconds = args.minutes * 60
            with tqdm(total=int(seconds), desc=f"load ({args.clients} clients)", unit="s", dynamic_ncols=True) as bar:
                ticker_stop = threading.Event()

                def ticker():
                    t0 = time.time()
                    while not ticker_stop.wait(1.0):
                        bar.n = min(int(time.time() - t0), int(seconds))
                        if bar.n >= int(seconds):
                            bar.set_description("load over, requests in flight finishing")
                        bar.refresh()

                tt = threading.Thread(target=ticker, daemon=True)
                tt.start()
                records = load_phase(srv, pool, args.clients, seconds, args.seed, vocab, bar)
                ticker_stop.set()
            marks["load end"] = time.time() - t_start
            report["end_of_load"] = sample(srv, stats_file, t_start)
            time.sleep(3 * args.sample_every)  # a few idle samples in the plot
            report["after"] = idle_snapshot(srv, stats_file, t_start, probe)
            marks["idle check"] = time.time() - t_start
            stop.set()
            th.join()
            samples.append({**report["after"], "phase": "after"})
            report["server_alive_after"] = srv.proc.poll() is None and bool(
                R._post(srv.base_url + "/generate", {"input_ids": probe, "sampling_params": {"max_new_tokens": 2}}))
            st = json.loads(stats_file.read_text())
            report["faults_injected"] = st.get("injected_faults", {})
            report["fallbacks"] = st.get("fallbacks", {})
            report["breaker_trips"] = st.get("breaker_trips", {})
        outcomes: dict = {}
        by_action: dict = {}
        for r in records:
            outcomes[r["outcome"]] = outcomes.get(r["outcome"], 0) + 1
            by_action.setdefault(r["action"], {}).setdefault(r["outcome"], 0)
            by_action[r["action"]][r["outcome"]] += 1
        report.update(outcomes=outcomes, by_action=by_action, abort_late=sum(bool(r.get("abort_late")) for r in records))
        by_kind: dict = {}
        for r in records:
            by_kind.setdefault(r["kind"], {}).setdefault(r["outcome"], 0)
            by_kind[r["kind"]][r["outcome"]] += 1
        report["by_kind"] = by_kind
        done = [r for r in records if r["outcome"] == "completed"]
        report["output_tokens"] = sum(r["completion_tokens"] for r in done)
        ver = sum(r["spec_verify_ct"] or r["completion_tokens"] for r in done)
        report["tau"] = report["output_tokens"] / ver if ver else 1.0
        print(f"[reliability] {len(records)} requests: {outcomes}; replaying {len(done)} on a plain server", flush=True)
        report["replay"] = replay_plain(args.model_path, pool, records, out, args.startup_timeout,
                                        context_args)
        report["checks"] = verdict(report, args.rss_tolerance)
    finally:
        _restore(old_env)
        report["samples"] = samples
        report["marks"] = marks
        (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "requests.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k != "text"}) + "\n"
                                                for r in records))
    return write_report(report, out)


def write_report(report: dict, out: Path) -> int:
    """report.md and memory.png from a finished report; the exit status (0: every check passed)."""
    (out / "report.md").write_text(markdown(report))
    plot(report["samples"], report["marks"], out / "memory.png")
    print((out / "report.md").read_text())
    return 0 if all(report["checks"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
