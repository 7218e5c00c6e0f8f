#!/usr/bin/env bash
# Run the whole test suite on a fresh machine (needs Python 3.10+ with venv and pip).
#
# Creates .venv in the repository root if it is missing, installs the package with its test
# extras into it (again only when pyproject.toml changed), then runs, in order:
#   ruff check .   ruff format --check .   mypy   python -m pytest "$@"
# Every step runs even if an earlier one failed; the exit status is non-zero if any failed.
#
# PostgreSQL tests use 127.0.0.1:5432, user postgres (TASKIQ_BEAT_PG_HOST/PORT/USER override).
# They are skipped when no server answers, except under CI=true, where they must run.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

source scripts/_venv.sh

failed=()

step() {
    local name="$1"
    shift
    echo "==> $name" >&2
    local status=0
    "$@" || status=$?
    if [[ $status -ne 0 ]]; then
        echo "==> $name FAILED (exit status $status)" >&2
        failed+=("$name")
    fi
}

step "ruff check" .venv/bin/python -m ruff check .
step "ruff format --check" .venv/bin/python -m ruff format --check .
step "mypy" .venv/bin/python -m mypy
# pytest exits with 5 when it collected no tests: that is a failure too.
step "pytest" .venv/bin/python -m pytest "$@"

if [[ ${#failed[@]} -ne 0 ]]; then
    echo "FAILED: ${failed[*]}" >&2
    exit 1
fi
echo "all checks passed" >&2
