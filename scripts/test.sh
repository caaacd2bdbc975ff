#!/usr/bin/env bash
# Set everything up (idempotent) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The embedded models are converted once (cached); doing it here keeps test timings honest.
.venv/bin/sgl-longspec convert-model >/dev/null
.venv/bin/sgl-longspec convert-model qwen2.5-coder-0.5b-instruct >/dev/null  # the demo's model
exec .venv/bin/python -m pytest -q "$@"
