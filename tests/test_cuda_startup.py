"""What a LONGSPEC server on CUDA starts with, from SGLang's own argument resolution (issue 28).

SGLang's resolution pipeline (ServerArgs.resolve_once: the attention-backend default, the CUDA
graph config, then the speculative algorithm's hook) runs here on a machine without a GPU for
`--device cuda`, in a child process (resolution publishes process-wide state). Checked:
- a bare launch gets `longspec_flashinfer`, whatever default SGLang resolved before LONGSPEC's hook
  (before the fix, that default, `triton` here and `fa3` on an H100, stopped the server at
  start-up with "this backend cannot verify ragged draft trees");
- an explicit `flashinfer` is kept (the dense-mask baseline), an explicit `fa3` refused by name;
- decode CUDA graphs are off for LONGSPEC (SGLang would capture fixed-width TARGET_VERIFY graphs and
  replay them for LONGSPEC's ragged verify steps and one-token plain steps) and untouched for a
  plain server; prefill graphs are the same as the plain server's.
What only a GPU shows: that the server then runs (issue 28's device check).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_RESOLVE = r"""
import json, sys
from sgl_longspec.adapter import plugin
plugin.register()
from sglang.srt.server_args import ServerArgs
from sgl_longspec.tools.models import resolve_model_path

model = str(resolve_model_path(None))
out = {}
for name, kw in json.loads(sys.argv[1]).items():
    args = ServerArgs(model_path=model, device="cuda", **kw)
    try:
        args.resolve_once()
    except ValueError as e:
        out[name] = {"error": str(e)}
        continue
    d = args.resolved_dict()
    graphs = d["cuda_graph_config"]
    out[name] = {"attention_backend": d["attention_backend"],
                 "decode_graphs": graphs["decode"]["backend"],
                 "prefill_graphs": graphs["prefill"]["backend"],
                 "overlap_off": d["disable_overlap_schedule"]}
print(json.dumps(out))
"""

CASES = {
    "plain": {},
    "longspec": {"speculative_algorithm": "LONGSPEC"},
    "longspec_flashinfer_asked": {"speculative_algorithm": "LONGSPEC", "attention_backend": "flashinfer"},
    "longspec_fa3_asked": {"speculative_algorithm": "LONGSPEC", "attention_backend": "fa3"},
}


@pytest.fixture(scope="module")
def resolved():
    env = {k: v for k, v in os.environ.items() if not k.startswith("LONGSPEC_")}
    r = subprocess.run([sys.executable, "-c", _RESOLVE, json.dumps(CASES)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_a_bare_launch_on_cuda_gets_the_longspec_backend(resolved):
    assert resolved["plain"]["attention_backend"] not in (None, "longspec_flashinfer")
    assert resolved["longspec"]["attention_backend"] == "longspec_flashinfer"
    assert resolved["longspec"]["overlap_off"] is True


def test_decode_graphs_are_off_for_longspec_only(resolved):
    assert resolved["plain"]["decode_graphs"] != "disabled"
    assert resolved["longspec"]["decode_graphs"] == "disabled"
    assert resolved["longspec_flashinfer_asked"]["decode_graphs"] == "disabled"
    assert resolved["longspec"]["prefill_graphs"] == resolved["plain"]["prefill_graphs"]


def test_an_explicit_backend_is_kept_or_refused_by_name(resolved):
    assert resolved["longspec_flashinfer_asked"]["attention_backend"] == "flashinfer"
    err = resolved["longspec_fa3_asked"]["error"]
    assert "--attention-backend fa3" in err and "longspec_flashinfer" in err
