#!/usr/bin/env bash
# Install pathmil from its checkout into the active conda environment (editable, dependencies from conda).
# Snakemake runs this after it builds envs/pathmil.yaml (--sdm conda), from a copy in .snakemake/conda/, with
# PATHMIL_SOURCE set by the workflow to the checkout; by hand the checkout is this file's folder's parent.
set -euo pipefail
source="${PATHMIL_SOURCE:-$(cd "$(dirname "$0")/.." && pwd)}"
if [ ! -f "$source/pyproject.toml" ]; then
    echo "pathmil post-deploy: no pyproject.toml in $source; set PATHMIL_SOURCE to the pathmil checkout" >&2
    exit 1
fi
python -m pip install --no-deps --no-build-isolation --editable "$source"
