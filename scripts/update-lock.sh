#!/usr/bin/env bash
# Refresh requirements/*.lock: install afresh WITHOUT the locks into a scratch environment (the
# newest versions the package index serves that satisfy the pins in setup.sh and pyproject.toml),
# then write the locks from it. Run the tests afterwards and commit the locks with what they fix.
set -euo pipefail
cd "$(dirname "$0")/.."
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
LONGSPEC_VENV="$SCRATCH/venv" LONGSPEC_UNLOCKED=1 bash scripts/setup.sh
"$SCRATCH/venv/bin/python" scripts/lock.py
git --no-pager diff --stat -- requirements/ || true
