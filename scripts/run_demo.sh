#!/usr/bin/env bash
# The README's main command: the whole workflow on the embedded demo cohort (results/demo/).
# Extra arguments go to snakemake (e.g. scripts/run_demo.sh -n for a dry run).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
source scripts/venv.sh
scripts/fetch_test_data.sh  # the demo extracts with the real MobileNetV2 weights in .testdata/
snakemake --cores all "$@"
