"""What a LONGSPEC server shows of itself: the JSON stats snapshot (LONGSPEC_STATS_FILE), each
request's figures in its response's meta_info, the CPU attention backend's timings and cascade
counters, and an optional torch profile of the first forwards (LONGSPEC_TORCH_PROFILE_DIR).
Prometheus counters live in sgl_longspec.adapter.metrics."""

from __future__ import annotations

import json
import os
from pathlib import Path

from sgl_longspec.adapter.request_params import opted_out
from sgl_longspec.attention.cpu_hybrid import ATTENTION_MS, CASCADE_COUNTS, VERIFY_PATH_COUNTS


def attention_ms() -> dict:
    """Attention time inside the CPU backend (empty unless it is the one in use)."""
    return {f"attention_{mode}_ms": ms for mode, ms in ATTENTION_MS.items()}


def cascade_counts() -> dict:
    """The CPU backend's cascade counters (shared-prefix groups planned; zero unless in use)."""
    return {f"cascade_{name}": n for name, n in CASCADE_COUNTS.items()}


def verify_path_counts() -> dict:
    """Verify requests the CPU backend attended in one call or by the split path (zero unless in
    use)."""
    return {f"verify_attention_{path}": n for path, n in VERIFY_PATH_COUNTS.items()}


_PROFILE_DIR = os.environ.get("LONGSPEC_TORCH_PROFILE_DIR")
_profiled: dict[str, int] = {}


def maybe_torch_profile(kind: str, steps: int = 20):
    """With LONGSPEC_TORCH_PROFILE_DIR set, the torch profiler runs over the first `steps` forwards
    of each kind (after 5 warm-up ones) and writes its operator table there (profiling only)."""
    import contextlib

    n = _profiled.get(kind, 0)
    _profiled[kind] = n + 1
    if not _PROFILE_DIR or not 5 <= n < 5 + steps:
        return contextlib.nullcontext()
    return _ProfileOnce(kind, n == 5 + steps - 1)


class _ProfileOnce:
    _acc: dict = {}

    def __init__(self, kind: str, last: bool):
        self.kind, self.last = kind, last

    def __enter__(self):
        from torch.profiler import ProfilerActivity, profile

        self.prof = profile(activities=[ProfilerActivity.CPU])
        self.prof.__enter__()

    def __exit__(self, *exc):
        self.prof.__exit__(*exc)
        rows = _ProfileOnce._acc.setdefault(self.kind, {})
        for e in self.prof.key_averages():
            r = rows.setdefault(e.key, [0, 0.0])
            r[0] += e.count
            r[1] += e.self_cpu_time_total / 1e3
        if self.last:
            top = sorted(rows.items(), key=lambda kv: -kv[1][1])[:40]
            Path(_PROFILE_DIR).mkdir(parents=True, exist_ok=True)
            with open(Path(_PROFILE_DIR) / f"{self.kind}.txt", "w") as f:
                f.write(f"{'op':60s} {'calls':>8s} {'self ms':>10s}\n")
                for k, (c, ms) in top:
                    f.write(f"{k[:60]:60s} {c:8d} {ms:10.1f}\n")
        return False


def record_request_steps(reqs, drafts, accepted) -> None:
    """Each request's LONGSPEC figures so far, in its response's meta_info["longspec"] (through
    SGLang's customized_info, which a non-streaming response carries whole): verify and plain
    steps, draft tokens verified and accepted per drafter, and verified drafts per shape (chain /
    tree). Opt out per request with
    `custom_params: {"longspec_stats": "off"}`."""
    for b, req in enumerate(reqs):
        if opted_out(req, "longspec_stats"):
            continue
        info = req.customized_info if isinstance(req.customized_info, dict) else {}
        cur = info.get("longspec")
        s = cur[0] if cur else {"verify_steps": 0, "plain_steps": 0, "drafted": {}, "accepted": {},
                                "shapes": {}}
        if drafts is None:
            s["plain_steps"] += 1
        else:
            s["verify_steps"] += 1
            d = drafts[b]
            if len(d):
                s["drafted"][d.source] = s["drafted"].get(d.source, 0) + len(d)
                s["accepted"][d.source] = s["accepted"].get(d.source, 0) + int(accepted[b])
                s["shapes"][d.shape] = s["shapes"].get(d.shape, 0) + 1
        info["longspec"] = [s]
        req.customized_info = info




def write_stats_file(path: str, stats: dict) -> None:
    """Replace the snapshot at `path` atomically (a reader never sees half a file)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(stats, f)
    os.replace(tmp, path)
