#!/usr/bin/env bash
# Set up a fresh machine and run the linters and the whole test suite: bash tools/test.sh [pytest args]
# Or only the unit tier (no test that starts a process; no Slurm cluster): bash tools/test.sh --unit
# This is the command CI runs (.ci/run) and the one the README gives. It also starts a private
# two-node Slurm cluster for tests/test_slurm.py (tools/slurm_cluster.sh) and stops it at the end;
# when the cluster cannot start, those tests skip and say why.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/bootstrap.sh
venv="${GALA_VENV:-.venv}"
"$venv/bin/python" -m ruff check .
"$venv/bin/python" -m ruff format --check .
if [ "${1:-}" = "--unit" ]; then
    shift
    exec "$venv/bin/python" -m pytest -q -m "not slow" --durations=10 "$@"
fi
if bash tools/slurm_cluster.sh start; then
    trap 'bash tools/slurm_cluster.sh stop' EXIT
fi
# Two workers (pytest-xdist): one waits on the Slurm cluster or a server while the other trains;
# the Slurm tests stay on one worker (one cluster). GALA_TEST_WORKERS=0 runs them in this process.
"$venv/bin/python" -m pytest -q -n "${GALA_TEST_WORKERS:-2}" --dist loadgroup \
    --durations=15 "$@"  # the slowest tests, for the suite's time budget
