"""`sgl-longspec` command line: serve, demo, convert-model, train-drafter.

`serve` runs SGLang's own HTTP server (OpenAI-compatible) with this machine's defaults filled in;
every `sglang.launch_server` flag can be passed through unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

from sgl_longspec.config import LongSpecConfig
from sgl_longspec.tools.models import EMBEDDED_MODELS, ModelError, cache_dir, resolve_model_path

# Defaults for a CPU-only machine of this project's kind (2 cores, 24 GiB). Sized so the KV pool
# of the embedded models fits comfortably: SGLang's default sizing reserved ~15 GB and the
# scheduler was OOM-killed.
CPU_DEFAULTS = {
    "--device": "cpu",
    # SGLang's torch_native plus speculative verify (stock torch_native cannot verify drafts, so
    # NGRAM needs it too) and a prefix-aware extend: sgl_longspec.attention.registration.
    "--attention-backend": "longspec_cpu",
    "--dtype": "float32",
    "--max-total-tokens": "32768",
    "--max-running-requests": "16",
    "--chunked-prefill-size": "4096",
}


def _has_flag(args: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def build_launch_args(model_path: str, host: str, port: int, extra: list[str], cpu: bool) -> list[str]:
    args = ["--model-path", model_path, "--host", host, "--port", str(port)]
    if cpu:
        for flag, value in CPU_DEFAULTS.items():
            if not _has_flag(extra, flag):
                args += [flag, value]
    return args + extra


def wait_healthy(base_url: str, proc: subprocess.Popen | None, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before becoming healthy")
        try:
            with urllib.request.urlopen(base_url + "/health", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(1.0)
    raise TimeoutError(f"server at {base_url} not healthy after {timeout:.0f}s")


def apply_longspec_args(extra: list[str]) -> list[str]:
    """Check the --longspec-* flags before paying for a server start (a bad value is an error
    here, at once); they then pass through to SGLang's own parser, which knows them through the
    plugin's hook (sgl_longspec.config.register_cli_hooks)."""
    parser = argparse.ArgumentParser(add_help=False)
    LongSpecConfig.add_cli_args(parser)
    ns, rest = parser.parse_known_args(extra)
    bad = [a for a in rest if a.startswith("--longspec-")]
    if bad:
        raise ValueError(f"unknown option {bad[0]} (see `sgl-longspec serve --help`)")
    cfg = LongSpecConfig.from_cli(ns, LongSpecConfig.from_env())
    algo = _flag_value(rest, "--speculative-algorithm")
    window = _flag_value(rest, "--speculative-num-draft-tokens")
    if algo is not None and algo.upper() == "LONGSPEC" and window is not None:
        cfg.validate(int(window))
    else:
        cfg.validate()
    return extra


def _int_flag(args: list[str], names: tuple[str, ...], default: int = 1) -> int:
    for name in names:
        v = _flag_value(args, name)
        if v is not None:
            return int(v)
    return default


def _flag_value(args: list[str], flag: str) -> str | None:
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def start_server(model_path: str | None, host: str, port: int, extra: list[str],
                 log_file=None) -> tuple[subprocess.Popen, str]:
    """Resolve the model, prepare the environment and start SGLang's launcher as a child process."""
    from sgl_longspec import cpu

    extra = apply_longspec_args(extra)
    path = str(resolve_model_path(model_path))
    on_cpu = cpu.prepare_environment()
    ranks = (_int_flag(extra, ("--tp", "--tp-size", "--tensor-parallel-size"))
             * _int_flag(extra, ("--dp", "--dp-size", "--data-parallel-size"))
             * _int_flag(extra, ("--pp", "--pp-size", "--pipeline-parallel-size")))
    env = dict(os.environ)
    if on_cpu and ranks > 1:
        # For this server's processes only: a later single-rank server from the same caller
        # (a test session, a benchmark) must not inherit a two-rank core split.
        env.setdefault("SGLANG_CPU_OMP_THREADS_BIND", cpu.threads_bind(ranks))
    cmd = [sys.executable, "-m", "sglang.launch_server",
           *build_launch_args(path, host, port, extra, on_cpu)]
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT if log_file else None,
                            start_new_session=True, env=env)
    return proc, path


def stop_server(proc: subprocess.Popen, timeout: float = 30) -> None:
    """Stop the server the way SGLang's launcher expects: SIGTERM to the launcher alone, which
    shuts its scheduler and detokenizer down itself (signalling the whole process group at once
    makes the launcher report its children as crashed); whatever is left after `timeout` seconds
    is killed."""
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # leftovers of the group (none after a clean stop)
    except (ProcessLookupError, PermissionError):
        pass
    if proc.poll() is None:
        proc.wait()


def _exit_on_sigterm() -> None:
    """SIGTERM/SIGHUP unwind like Ctrl-C, so the server (its own process group) is stopped too."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGHUP, handler)


def _common_parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--model-path", default=None,
                   help="Hugging Face model folder, a .gguf file, or an embedded model name "
                        f"({', '.join(EMBEDDED_MODELS)}); default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--startup-timeout", type=float, default=600)
    return p


def _run_foreground(proc: subprocess.Popen, base_url: str, model: str, timeout: float) -> int:
    try:
        wait_healthy(base_url, proc, timeout)
        print(f"\nsgl-longspec: serving {model}\n  OpenAI-compatible API: {base_url}/v1 "
              f"(chat/completions, completions)  native: {base_url}/generate\n  Ctrl-C to stop.",
              flush=True)
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    except (RuntimeError, TimeoutError) as e:
        print(f"sgl-longspec: {e}", file=sys.stderr)
        return 1
    finally:
        stop_server(proc)


def cmd_serve(argv: list[str]) -> int:
    _exit_on_sigterm()
    parser = _common_parser("sgl-longspec serve", "Run SGLang's server with sgl-longspec.")
    args, extra = parser.parse_known_args(argv)
    try:
        proc, path = start_server(args.model_path, args.host, args.port, extra)
    except (ModelError, ValueError) as e:
        print(f"sgl-longspec: error: {e}", file=sys.stderr)
        return 2
    return _run_foreground(proc, f"http://{args.host}:{args.port}", path, args.startup_timeout)


DEMO_FILE = """def moving_average(values, window):
    \"\"\"Average of each run of `window` consecutive values.\"\"\"
    if window <= 0:
        raise ValueError("window must be positive")
    out = []
    total = 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        if i >= window - 1:
            out.append(total / window)
    return out
"""
DEMO_RENAME = ("moving_average", "rolling_mean")
DEMO_AGENT_PROMPT = ("Here is a Python file:\n```python\n" + DEMO_FILE + "```\nRename the function "
                     f"{DEMO_RENAME[0]} to {DEMO_RENAME[1]} and return the whole file, unchanged otherwise.")
# The demo's model: a code model that makes the agent turn's edit correctly at greedy decoding
# (measured: Qwen2.5-Coder-0.5B returns the renamed file verbatim; SmolLM2-135M, the serving
# default, writes another function instead, so its figures would not come from copying the file).
DEMO_MODEL = "qwen2.5-coder-0.5b-instruct"
DEMO_CHAT_PROMPT = "Write a Python function that checks whether a string is a palindrome, then explain it briefly."
_CODE_BLOCK = re.compile(r"```[A-Za-z0-9_+-]*\n(.*?)(?:```|\Z)", re.S)


def check_agent_edit(reply: str) -> tuple[bool, str]:
    """Whether the agent turn's reply is the requested edit: its (first) code block is DEMO_FILE
    with the function renamed and every other line unchanged (trailing spaces aside)."""
    old, new = DEMO_RENAME
    m = _CODE_BLOCK.search(reply)
    got = [ln.rstrip() for ln in (m.group(1) if m else reply).strip("\n").splitlines()]
    want = [ln.rstrip() for ln in DEMO_FILE.replace(old, new).strip("\n").splitlines()]
    if got == want:
        return True, f"correct edit: {new} defined, the other {len(want) - 1} lines unchanged"
    if not any(ln.startswith(f"def {new}(") for ln in got):
        return False, f"not the edit: no `def {new}(` in the reply"
    for i, (g, w) in enumerate(zip(got, want)):
        if g != w:
            return False, f"not the edit: line {i + 1} is {g!r}, expected {w!r}"
    return False, f"not the edit: {len(got)} lines, expected {len(want)}"


def generate_once(base_url: str, input_ids: list[int], max_tokens: int, speculate: bool) -> dict:
    """One greedy /generate; `speculate=False` turns speculation off for this request only."""
    params = {"temperature": 0, "max_new_tokens": max_tokens}
    if not speculate:
        params["custom_params"] = {"longspec": "off"}
    body = {"input_ids": input_ids, "sampling_params": params}
    req = urllib.request.Request(base_url + "/generate", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=900) as r:
        out = json.loads(r.read())
    out["wall_s"] = time.perf_counter() - t0
    return out


def _turn_figures(out: dict) -> dict:
    mi = out["meta_info"]
    n = int(mi.get("completion_tokens", 0))
    steps = int(mi.get("spec_verify_ct") or n or 1)
    return {"tokens": n, "tok_s": n / max(out["wall_s"], 1e-9), "accept_len": n / max(steps, 1),
            "accepted": int(mi.get("spec_num_correct_drafts") or 0), "steps": steps}


def demo_turn(base_url: str, tokenizer, title: str, prompt: str, max_tokens: int,
              check=None) -> dict:
    """The same greedy turn with and without speculation on one server; prints both, and the
    verdict of `check(reply) -> (ok, why)` on the reply the figures come from."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                        add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)  # newer transformers: BatchEncoding
    plain = generate_once(base_url, ids, max_tokens, speculate=False)
    spec = generate_once(base_url, ids, max_tokens, speculate=True)
    p, s = _turn_figures(plain), _turn_figures(spec)
    reply = spec["text"].strip().splitlines()
    shown = "\n".join(reply[:16]) + ("\n..." if len(reply) > 16 else "")
    print(f"\n[{title}] user> {prompt}\nassistant> {shown}\n", flush=True)
    ok = None
    if check is not None:
        ok, why = check(spec["text"])
        print(f"  reply check: {'OK' if ok else 'FAILED'}, {why}", flush=True)
    print(f"  {'':22s} {'tok/s':>7s} {'accept len':>11s} {'accepted drafts':>16s} {'steps':>6s}")
    for name, f in (("LONGSPEC", s), ("plain (same server)", p)):
        print(f"  {name:22s} {f['tok_s']:7.1f} {f['accept_len']:11.2f} {f['accepted']:16d} "
              f"{f['steps']:6d}")
    same = "identical" if spec["output_ids"] == plain["output_ids"] else "DIFFERENT"
    print(f"  -> {s['tok_s'] / max(p['tok_s'], 1e-9):.2f}x plain decoding; outputs {same}", flush=True)
    return {"speedup": s["tok_s"] / max(p["tok_s"], 1e-9), "identical": same == "identical",
            "reply_ok": ok}


def _quiet_model_loading() -> None:
    """The demo's screen shows one line per step: no conversion progress bars or library chatter
    (the server's own output goes to its log file)."""
    import logging

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.getLogger("sgl_longspec").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass


def _log_tail(path, n: int = 30) -> str:
    try:
        return "".join(open(path, errors="replace").readlines()[-n:])
    except OSError:
        return ""


def cmd_demo(argv: list[str]) -> int:
    _exit_on_sigterm()
    parser = _common_parser("sgl-longspec demo",
                            "Start the server, show one agent turn and one chat turn with and "
                            "without speculation, then keep serving.")
    parser.set_defaults(model_path=DEMO_MODEL)
    for action in parser._actions:
        if action.dest == "model_path":
            action.help = f"as for serve; default: {DEMO_MODEL} (a code model that makes the agent turn's edit)"
    parser.add_argument("--prompt", default=DEMO_CHAT_PROMPT, help="the chat turn")
    parser.add_argument("--max-tokens", type=int, default=128,
                        help="per turn (the agent turn's edit takes 101 tokens on the demo model)")
    parser.add_argument("--log-file", default=None,
                        help="the server's output (default: a file in the model cache, printed)")
    parser.add_argument("--exit", action="store_true", help="stop the server after the demo")
    args, extra = parser.parse_known_args(argv)
    base_url = f"http://{args.host}:{args.port}"
    _quiet_model_loading()
    t0 = time.time()
    print(f"[1/3] model {args.model_path} (the first use converts it once: about 2 minutes)", flush=True)
    try:
        path = str(resolve_model_path(args.model_path))
        log_path = args.log_file or str(cache_dir().parent / "logs" / f"demo-server-{args.port}.log")
        os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
        print(f"      ready in {time.time() - t0:.0f}s: {path}", flush=True)
        log = open(log_path, "w")
        proc, path = start_server(path, args.host, args.port, extra, log_file=log)
    except (ModelError, ValueError) as e:
        print(f"sgl-longspec: error: {e}", file=sys.stderr)
        return 2
    try:
        t0 = time.time()
        print(f"[2/3] SGLang server starting; its log: {log_path}", flush=True)
        wait_healthy(base_url, proc, args.startup_timeout)
        print(f"      up in {time.time() - t0:.0f}s", flush=True)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
        generate_once(base_url, [1, 2, 3, 4], 4, speculate=False)  # warm-up
        print("[3/3] two greedy turns, each with LONGSPEC and with speculation off, same server",
              flush=True)
        demo_turn(base_url, tok, "agent turn: edit a file and return it", DEMO_AGENT_PROMPT,
                  args.max_tokens, check=check_agent_edit)
        demo_turn(base_url, tok, "chat turn", args.prompt, args.max_tokens)
        print("\nWhat the numbers mean: accept len is tokens committed per decode step (1.00 = "
              "plain decoding). Agent replies repeat what the request has seen, so LONGSPEC "
              "drafts those spans and verifies several tokens per step; on chat the router "
              "drafts little and stays close to plain decoding. Both columns come from the same "
              "server and prompt; greedy outputs must be identical.", flush=True)
        if args.exit:
            return 0
        print(f"\nsgl-longspec: still serving at {base_url}/v1 (Ctrl-C to stop)", flush=True)
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    except (RuntimeError, TimeoutError, urllib.error.URLError) as e:
        print(f"sgl-longspec: {e}\n--- last lines of {log_path}:\n{_log_tail(log_path)}", file=sys.stderr)
        return 1
    finally:
        stop_server(proc)
        log.close()


def cmd_convert_model(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="sgl-longspec convert-model",
                                description="Convert an embedded model or .gguf file once and print its folder.")
    p.add_argument("model", nargs="?", default=None)
    args = p.parse_args(argv)
    try:
        print(resolve_model_path(args.model))
    except ModelError as e:
        print(f"sgl-longspec: error: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_train_drafter(argv: list[str]) -> int:
    from sgl_longspec.training.owl_train import main as train_main

    return train_main(argv) or 0


COMMANDS = {
    "serve": cmd_serve,
    "demo": cmd_demo,
    "convert-model": cmd_convert_model,
    "train-drafter": cmd_train_drafter,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: sgl-longspec {serve,demo,convert-model,train-drafter} [options]\n"
              "  serve          SGLang's OpenAI-compatible server with sgl-longspec\n"
              "  demo           start the server, answer a chat completion, keep serving\n"
              "  convert-model  convert an embedded model / .gguf into a cached HF folder\n"
              "  train-drafter  train the OWL LSTM drafter for a target model",
              file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
