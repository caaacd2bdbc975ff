"""Plots for `benchmarks.run` results (matplotlib, Agg backend).

    python -m benchmarks.plots benchmarks/results/suite/results.json

- ``tau_vs_prompt_len.png`` / ``speedup_vs_prompt_len.png``: long-document workload per bucket, at
  the lowest concurrency measured (speedup = per-request decode rate / no speculation's).
- ``throughput_vs_concurrency.png`` / ``tpot_vs_concurrency.png``: one panel per workload.
- ``speedup_bars.png``: output tokens/s relative to no speculation, per workload and concurrency.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

KEY = re.compile(r"^(?P<wl>[a-z_]+)(\[(?P<bucket>\w+)\])?@c(?P<conc>\d+)$")
BUCKET_TOKENS = {"1K": 1024, "2K": 2048, "4K": 4096, "8K": 8192}


def _parse(results: dict):
    """Rows: (phase, config, workload, bucket, concurrency, aggregate)."""
    rows = []
    for pname, ph in results["phases"].items():
        for cfg, run in ph["runs"].items():
            for key, agg in run.get("results", {}).items():
                m = KEY.match(key)
                if m:
                    rows.append((pname, cfg, m["wl"], m["bucket"], int(m["conc"]), agg))
    return rows


def make_plots(results: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    rows = _parse(results)
    made = []
    configs = []
    for r in rows:
        if r[1] not in configs:
            configs.append(r[1])

    # --- long documents: tau and speedup vs prompt length --------------------------------------
    ld = [r for r in rows if r[2] == "longdoc" and r[3]]
    if ld:
        conc = min(r[4] for r in ld)
        ld = [r for r in ld if r[4] == conc]
        base = {(r[0], r[3]): r[5] for r in ld if r[1] == "vanilla"}
        for what, fname, ylabel in (
                ("tau", "tau_vs_prompt_len.png", "tau (tokens per verify step)"),
                ("speedup", "speedup_vs_prompt_len.png", "decode tok/s / no speculation")):
            fig, ax = plt.subplots(figsize=(6, 4))
            for cfg in configs:
                pts = sorted((BUCKET_TOKENS[r[3]], r) for r in ld if r[1] == cfg)
                if not pts:
                    continue
                xs, ys = [], []
                for x, r in pts:
                    if what == "tau":
                        y = r[5]["tau"]
                    else:
                        b = base.get((r[0], r[3]))
                        if not b or not b.get("mean_decode_tok_s") or not r[5].get("mean_decode_tok_s"):
                            continue
                        y = r[5]["mean_decode_tok_s"] / b["mean_decode_tok_s"]
                    xs.append(x)
                    ys.append(y)
                if xs:
                    ax.plot(xs, ys, marker="o", label=cfg)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("prompt length (tokens)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"long-document questions, concurrency {conc}")
            if what == "speedup":
                ax.axhline(1.0, color="grey", lw=0.8, ls="--")
            ax.grid(alpha=0.3)
            ax.legend()
            fig.tight_layout()
            fig.savefig(out_dir / fname, dpi=110)
            plt.close(fig)
            made.append(fname)

    # --- throughput / TPOT vs concurrency, one panel per (phase, workload) -----------------------
    panels = []
    for r in rows:
        if r[3] is None and (r[0], r[2]) not in panels:
            panels.append((r[0], r[2]))
    if panels:
        for metric, fname, ylabel in (("throughput", "throughput_vs_concurrency.png", "output tokens/s"),
                                      ("mean_tpot_ms", "tpot_vs_concurrency.png", "time per output token (ms)")):
            fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6), squeeze=False)
            for ax, (ph, wl) in zip(axes[0], panels):
                for cfg in configs:
                    pts = sorted((r[4], r[5].get(metric)) for r in rows
                                 if r[0] == ph and r[2] == wl and r[1] == cfg and r[3] is None)
                    pts = [p for p in pts if p[1] is not None]
                    if pts:
                        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=cfg)
                ax.set_title(f"{wl} ({results['phases'][ph]['model']})", fontsize=9)
                ax.set_xlabel("concurrent requests")
                ax.set_ylabel(ylabel)
                ax.set_xscale("log", base=2)
                ax.grid(alpha=0.3)
            axes[0][0].legend(fontsize=8)
            fig.tight_layout()
            fig.savefig(out_dir / fname, dpi=110)
            plt.close(fig)
            made.append(fname)

    # --- speedup bars ----------------------------------------------------------------------------
    bars = [r for r in rows if r[3] is None and r[1] != "vanilla" and r[5].get("speedup_vs_vanilla")]
    if bars:
        groups = []
        for r in bars:
            g = (r[0], r[2], r[4])
            if g not in groups:
                groups.append(g)
        spec_cfgs = [c for c in configs if c != "vanilla"]
        fig, axes = plt.subplots(1, 2, figsize=(max(6, 1.3 * len(groups) * 2), 4))
        width = 0.8 / max(1, len(spec_cfgs))
        for ax, metric, ylabel in ((axes[0], "speedup_vs_vanilla", "output tok/s / no speculation"),
                                   (axes[1], "tau", "tau")):
            for i, cfg in enumerate(spec_cfgs):
                ys = []
                for g in groups:
                    r = next((r for r in bars if (r[0], r[2], r[4]) == g and r[1] == cfg), None)
                    ys.append(r[5].get(metric) or 0 if r else 0)
                ax.bar([k + i * width for k in range(len(groups))], ys, width, label=cfg)
            ax.set_xticks([k + width * (len(spec_cfgs) - 1) / 2 for k in range(len(groups))])
            ax.set_xticklabels([f"{g[1]}\nc={g[2]}" for g in groups], fontsize=8)
            ax.set_ylabel(ylabel)
            if metric.startswith("speedup"):
                ax.axhline(1.0, color="grey", lw=0.8, ls="--")
            ax.grid(alpha=0.3, axis="y")
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "speedup_bars.png", dpi=110)
        plt.close(fig)
        made.append("speedup_bars.png")
    return made


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    path = Path(argv[0] if argv else "benchmarks/results/suite/results.json")
    print(make_plots(json.loads(path.read_text()), path.parent))
    return 0


if __name__ == "__main__":
    sys.exit(main())
