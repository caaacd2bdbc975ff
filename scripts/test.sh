#!/usr/bin/env bash
# Set everything up (idempotent) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The embedded default model is converted once (cached); doing it here keeps test timings honest.
.venv/bin/sgl-longspec convert-model >/dev/null
exec .venv/bin/python -m pytest -q "$@"
