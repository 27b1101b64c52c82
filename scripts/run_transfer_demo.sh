#!/usr/bin/env bash
# Knowledge transfer on the demo (README: "Across cohorts"): the large source cohort is trained, evaluated
# and packaged (config/transfer/source.yaml, results/demo_source/), then the small target cohort of another
# lab look is scored by that package (external validation) and trained from scratch, fine-tuned and with
# MoE-PKT (config/transfer/target.yaml, results/demo_target/). Extra arguments go to both snakemake calls.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
source scripts/venv.sh
scripts/fetch_test_data.sh  # both cohorts extract with the real MobileNetV2 weights in .testdata/
snakemake --cores all --configfile config/transfer/source.yaml "$@"
snakemake --cores all --configfile config/transfer/target.yaml "$@"
