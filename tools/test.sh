#!/usr/bin/env bash
# Set up a fresh machine and run the whole test suite: bash tools/test.sh [pytest args]
# This is the command CI runs (.ci/run) and the one the README gives.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/bootstrap.sh
venv="${GALA_VENV:-.venv}"
"$venv/bin/python" -m ruff check .
"$venv/bin/python" -m ruff format --check .
exec "$venv/bin/python" -m pytest -q "$@"
