"""Shared pytest fixtures: real SGLang servers for end-to-end tests.

Starting a server costs ~40 s on this CPU machine (and SGLang's idle scheduler keeps one core
busy), so servers are started lazily, cached by configuration for the whole session, and always
stopped at the end (also on Ctrl-C / failures).

Fixtures
--------
``launch_server(extra_args=(), *, model_path=None, env=None, startup_timeout=None) -> ServerHandle``
    Factory (function scope, backed by the session-wide ``server_pool``). ``extra_args`` are passed
    to ``sgl-longspec serve`` / ``sglang.launch_server`` unchanged, on top of the CPU defaults of
    ``sgl_longspec.tools.cli.CPU_DEFAULTS`` (``--dtype float32`` etc.). The same (model_path, args, env)
    returns the already running server. ``env`` adds environment variables for that server only.
    Example (another algorithm)::

        LONGSPEC_ARGS = ("--speculative-algorithm", "LONGSPEC", "--speculative-num-draft-tokens", "8")

        @pytest.mark.server
        def test_longspec_greedy(launch_server):
            srv = launch_server(LONGSPEC_ARGS)
            out = srv.generate(input_ids=[1, 2, 3], sampling_params={"temperature": 0, "max_new_tokens": 8})

``server``
    The default configuration (plain decoding, float32, embedded SmolLM2-135M-Instruct).
``ngram_server``
    ``NGRAM_ARGS``: SGLang's NGRAM speculative decoding with 8 draft tokens.
``server_pool``
    The session-wide ``ServerPool`` (``.paused()`` freezes live servers, e.g. while a Hugging Face
    reference runs in the test process; ``.stop_all()``).

ServerHandle: ``base_url``, ``proc`` (the launcher's Popen; its process group holds the whole
server), ``log_path`` (stdout+stderr of the server), ``args``, ``port``, ``model_path``, and helpers
``generate(**payload)`` (POST /generate), ``openai_client()`` (``openai.OpenAI`` on ``/v1``),
``log_tail(n)``, ``alive()``.

At most ``LONGSPEC_TEST_MAX_SERVERS`` (default 1) servers run at once: asking for another
configuration stops the least recently used one (it is restarted if asked for again). Order tests
so that each configuration's tests run together. All servers are stopped right after the last
collected test that uses ``server_pool`` (directly or through ``launch_server``, ``server``,
``ngram_server`` or a fixture built on them). When a test that used a server fails, the tail
of that server's log is attached to the failure report ("server log" section). A server that fails
to start fails the test with its log tail in the message.

Environment knobs: LONGSPEC_TEST_MAX_SERVERS, LONGSPEC_TEST_STARTUP_TIMEOUT (seconds,
default 900: the machine is shared), LONGSPEC_TEST_LOG_LINES (default 150).
Server tests carry the ``server`` marker (``-m "not server"`` skips them); they are skipped when
sglang is not installed.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import pytest

NGRAM_ARGS: tuple[str, ...] = (
    "--speculative-algorithm", "NGRAM",
    "--speculative-num-draft-tokens", "8",
)

HOST = "127.0.0.1"
MAX_SERVERS = int(os.environ.get("LONGSPEC_TEST_MAX_SERVERS", "1"))
STARTUP_TIMEOUT = float(os.environ.get("LONGSPEC_TEST_STARTUP_TIMEOUT", "900"))
LOG_LINES = int(os.environ.get("LONGSPEC_TEST_LOG_LINES", "150"))
REQUEST_TIMEOUT = 900  # seconds per HTTP request; generous because the machine is shared


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def sglang_available() -> bool:
    return importlib.util.find_spec("sglang") is not None


@dataclass
class ServerHandle:
    base_url: str
    proc: subprocess.Popen
    log_path: Path
    args: tuple[str, ...] = ()
    port: int = 0
    model_path: str = ""
    startup_s: float = 0.0
    key: tuple = field(default=(), repr=False)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = LOG_LINES) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError as e:
            return f"<cannot read {self.log_path}: {e}>"
        return "\n".join(lines[-n:])

    def generate(self, timeout: float = REQUEST_TIMEOUT, **payload) -> dict:
        """POST /generate with the given JSON fields; raises on HTTP errors."""
        import requests

        r = requests.post(self.base_url + "/generate", json=payload, timeout=timeout)
        if r.status_code != 200:
            raise AssertionError(f"/generate answered {r.status_code}: {r.text[:2000]}")
        return r.json()

    def openai_client(self, timeout: float = REQUEST_TIMEOUT):
        import openai

        return openai.OpenAI(base_url=self.base_url + "/v1", api_key="EMPTY", timeout=timeout,
                             max_retries=0)


def _stop(handle: ServerHandle) -> None:
    from sgl_longspec.tools.cli import stop_server

    stop_server(handle.proc)
    # The launcher may exit before its scheduler/detokenizer children: clear the whole group
    # (our own session, started with start_new_session=True).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(handle.proc.pid, signal.SIGKILL)


def _env_override(env: Optional[dict]):
    @contextlib.contextmanager
    def cm():
        saved = {k: os.environ.get(k) for k in (env or {})}
        os.environ.update({k: str(v) for k, v in (env or {}).items()})
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    return cm()


class ServerPool:
    """Servers keyed by (model_path, args, env); at most `max_live` running at once (LRU)."""

    def __init__(self, log_dir: Path, max_live: int = MAX_SERVERS):
        self.log_dir = Path(log_dir)
        self.max_live = max(1, max_live)
        self.live: "OrderedDict[tuple, ServerHandle]" = OrderedDict()
        self.started: list[ServerHandle] = []  # every server started this session
        self._failed: dict[tuple, str] = {}

    def get(self, extra_args: Iterable[str] = (), *, model_path: Optional[str] = None,
            env: Optional[dict] = None, startup_timeout: Optional[float] = None,
            bare: bool = False) -> ServerHandle:
        """bare=True: `python -m sglang.launch_server` itself, with exactly `extra_args` (no CPU
        defaults, no sgl-longspec wrapper); otherwise `sgl-longspec serve`."""
        args = tuple(str(a) for a in extra_args)
        key = (model_path, args, tuple(sorted((env or {}).items())), bare)
        if key in self._failed:  # do not pay another start for a configuration that failed
            pytest.fail(self._failed[key], pytrace=False)
        handle = self.live.get(key)
        if handle is not None:
            if handle.alive():
                self.live.move_to_end(key)
                return handle
            del self.live[key]
            tail = handle.log_tail()
            raise AssertionError(
                f"server {' '.join(args) or '(default)'} died (exit {handle.proc.returncode}); "
                f"log {handle.log_path}:\n{tail}")
        while len(self.live) >= self.max_live:
            _, old = self.live.popitem(last=False)
            _stop(old)
        return self._start(key, model_path, args, env, startup_timeout or STARTUP_TIMEOUT, bare)

    def _start(self, key, model_path, args, env, timeout, bare=False) -> ServerHandle:
        from sgl_longspec.tools.cli import start_server, wait_healthy
        from sgl_longspec.tools.models import ModelError

        port = free_port()
        log_path = self.log_dir / f"server-{len(self.started)}-{port}.log"
        t0 = time.time()
        with open(log_path, "wb") as log, _env_override(env):
            try:
                if bare:
                    proc, path = _start_bare(model_path, port, list(args), log)
                else:
                    proc, path = start_server(model_path, HOST, port, list(args), log_file=log)
            except ModelError as e:
                self._failed[key] = f"cannot start server {args}: {e}"
                pytest.fail(self._failed[key], pytrace=False)
        handle = ServerHandle(f"http://{HOST}:{port}", proc, log_path, args, port, str(path),
                              key=key)
        self.started.append(handle)
        try:
            wait_healthy(handle.base_url, proc, timeout)
        except BaseException as e:
            _stop(handle)
            self._failed[key] = (f"server {' '.join(args) or '(default)'} failed to start: {e}\n"
                                 f"--- log {log_path} (last {LOG_LINES} lines) ---\n"
                                 f"{handle.log_tail()}")
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            pytest.fail(self._failed[key], pytrace=False)
        handle.startup_s = time.time() - t0
        self.live[key] = handle
        return handle

    @contextlib.contextmanager
    def paused(self):
        """Freeze every live server (SIGSTOP its process group) for CPU-heavy work in the test
        process, then resume it. Send no requests meanwhile."""
        frozen = []
        try:
            for h in self.live.values():
                if h.alive():
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(h.proc.pid, signal.SIGSTOP)
                        frozen.append(h)
            yield
        finally:
            for h in frozen:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(h.proc.pid, signal.SIGCONT)

    def stop_all(self) -> None:
        while self.live:
            _, h = self.live.popitem(last=False)
            _stop(h)
        for h in self.started:  # belt and braces: nothing of ours survives the session
            if h.alive():
                _stop(h)


def _start_bare(model_path, port, args, log):
    import sys

    from sgl_longspec.tools.models import resolve_model_path

    path = str(resolve_model_path(model_path))
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", path, "--host", HOST,
           "--port", str(port), *args]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True), path


def _sigterm_to_keyboardinterrupt(signum, frame):
    # `timeout`, CI cancellation, kill: let pytest unwind so that the fixtures stop the servers.
    raise KeyboardInterrupt(f"signal {signum}")


_POOL: list[ServerPool] = []  # the session's pool, for the hooks below
_LAST_SERVER_TEST: list[str] = []


@pytest.fixture(scope="session")
def server_pool(tmp_path_factory):
    pool = ServerPool(tmp_path_factory.mktemp("servers"))
    _POOL.append(pool)
    atexit.register(pool.stop_all)
    previous = signal.getsignal(signal.SIGTERM)
    if previous in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, _sigterm_to_keyboardinterrupt)
    try:
        yield pool
    finally:
        pool.stop_all()
        if previous in (signal.SIG_DFL, None):
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


@pytest.fixture
def launch_server(server_pool, request):
    if not sglang_available():
        pytest.skip("sglang is not installed")
    used: list[ServerHandle] = request.node.stash.setdefault(_USED_SERVERS, [])

    def launch(extra_args: Iterable[str] = (), **kwargs) -> ServerHandle:
        handle = server_pool.get(extra_args, **kwargs)
        if handle not in used:
            used.append(handle)
        return handle

    return launch


@pytest.fixture
def server(launch_server) -> ServerHandle:
    return launch_server(())


@pytest.fixture
def ngram_server(launch_server) -> ServerHandle:
    return launch_server(NGRAM_ARGS)


_USED_SERVERS = pytest.StashKey[list]()


def pytest_collection_modifyitems(session, config, items):
    # Remember the last test that can start a server: once it is done, stop every server, so that
    # the rest of the session does not share the 2 cores with an idle (busy-polling) scheduler.
    last = [it.nodeid for it in items if "server_pool" in getattr(it, "fixturenames", ())]
    _LAST_SERVER_TEST[:] = last[-1:]


def pytest_runtest_logfinish(nodeid, location):
    if _LAST_SERVER_TEST and nodeid == _LAST_SERVER_TEST[0] and _POOL:
        _POOL[0].stop_all()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        for h in item.stash.get(_USED_SERVERS, []):
            state = "running" if h.alive() else f"exited {h.proc.returncode}"
            rep.sections.append((
                f"server log: {' '.join(h.args) or '(default)'} [{state}] {h.log_path}",
                h.log_tail(),
            ))


# ------------------------------------------------------------------------------- hypothesis
# Property tests draw the same examples on every run and machine (derandomized, no example
# database carried between runs): a failure reproduces anywhere, and CI cannot fail on a draw the
# developer never saw. HYPOTHESIS_PROFILE=explore draws afresh each run, for hunting new cases.
try:
    from hypothesis import settings as _hypothesis_settings

    _hypothesis_settings.register_profile("hermetic", derandomize=True, database=None)
    _hypothesis_settings.register_profile("explore", derandomize=False)
    _hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "hermetic"))
except ImportError:  # pragma: no cover - the test extra installs it
    pass


# ------------------------------------------------------------------------------- environment line
# Named in one line at the end of every run, so that a failure names the environment it ran in
# (requirements/cpu.lock pins them; a line that differs from the lock says the install drifted).
VERSIONED_PACKAGES = ("sglang", "torch", "transformers", "xgrammar", "hypothesis")


def environment_line() -> str:
    import importlib.metadata as md
    import platform

    def version(name: str) -> str:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "absent"

    return "environment: python " + platform.python_version() + " " + " ".join(
        f"{name} {version(name)}" for name in VERSIONED_PACKAGES)


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(environment_line())
