"""The device check (scripts/gpu_check.sh) at CPU sizes: its --dry-run runs every step a lent GPU
machine would run (environment report, the GPU backend's tests, the timing table), so that the
one device call it is made for does not fail on the script itself."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_writes_its_table(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OUT"] = str(tmp_path)
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run"], env=env,
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "gpu none" in (tmp_path / "env.txt").read_text()
    assert " passed" in (tmp_path / "pytest.log").read_text()
    [results] = tmp_path.glob("results*.json")
    rows = json.loads(results.read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    assert rows and all("hybrid_ms" in r for r in rows)
    assert list(tmp_path.glob("results*.md"))
