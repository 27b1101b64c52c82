#!/usr/bin/env bash
# The README's test command: environment, real test data, lint, then the whole test suite.
# Extra arguments go to pytest (e.g. scripts/run_tests.sh -k tile).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
source scripts/venv.sh
scripts/fetch_test_data.sh
echo "[pathmil] ruff check"
ruff check .
echo "[pathmil] pytest"
python -m pytest "$@"
