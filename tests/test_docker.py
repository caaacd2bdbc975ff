"""The Dockerfiles install the way the README says and serve LONGSPEC (they cannot be built on
the development machine: no registry)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def readme_install_command() -> str:
    text = (ROOT / "README.md").read_text()
    block = text.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    first = next(ln for ln in block.splitlines() if ln.strip() and not ln.startswith("#"))
    return first.split("&&")[0].strip()  # "bash scripts/setup.sh"


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfile_installs_as_the_readme_says(name):
    text = (ROOT / "docker" / name).read_text()
    runs = " ".join(re.findall(r"^RUN (.+(?:\\\n.+)*)", text, flags=re.M))
    assert readme_install_command() == "bash scripts/setup.sh"
    assert "bash scripts/setup.sh" in runs, runs
    assert re.search(r"^COPY \. \.", text, flags=re.M)
    cmd = text.split("\nCMD ", 1)[1]
    assert "sgl-longspec serve" in cmd and "--speculative-algorithm LONGSPEC" in cmd
    assert '--host "$LONGSPEC_HOST"' in cmd  # the bind address comes from the environment


def test_cuda_image_is_the_supported_sglang_release():
    from sgl_longspec.adapter.sglang_compat import SUPPORTED_RANGE

    base = re.search(r"^FROM lmsysorg/sglang:v([0-9.]+)", (ROOT / "docker" / "Dockerfile.cuda")
                     .read_text(), flags=re.M).group(1)
    low = SUPPORTED_RANGE.split(",")[0].lstrip(">=")
    assert base == low, (base, SUPPORTED_RANGE)
    assert f"SGLANG_VERSION={base}" in (ROOT / "scripts" / "setup.sh").read_text()


def test_serve_binds_localhost_by_default():
    from sgl_longspec.tools.cli import _common_parser

    args, _ = _common_parser("serve", "").parse_known_args([])
    assert args.host == "127.0.0.1"
