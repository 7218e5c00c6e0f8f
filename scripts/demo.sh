#!/usr/bin/env bash
# Run the taskiq-beat demo on a fresh machine (needs Python 3.10+ with venv and pip).
#
# Creates .venv in the repository root if it is missing, installs the package with its test
# extras into it (again only when pyproject.toml changed), then runs scripts/demo.py with
# any arguments given here, e.g. `bash scripts/demo.sh --seconds 3`.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

source scripts/_venv.sh

exec .venv/bin/python scripts/demo.py "$@"
