#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with what scripts/gpu_check.sh installs on the GPU machine, which reaches no
# package index: manylinux wheels for CPython 3.12 of every pathmil dependency that machine's image lacks
# (its package list: the device tool's KINDS.md), one pinned version each, at versions that run together
# here; the sdists of causal-conv1d and mamba-ssm (built there for sm_90); and CPython 3.12's headers in
# case the image has no Python.h. Run it where pip reaches PyPI, inside the project's environment (the
# sdists' metadata needs torch):  scripts/gpu_check_wheels.sh [DEST]   (default: .whl of this checkout)
#
# Left out on purpose: pulp (16 MB, with its CBC binaries; snakemake falls back to its greedy scheduler,
# which the check asks for) and imagecodecs (26 MB; the check writes its slides as zlib TIFFs instead).
# scikit-learn goes to DEST/fallback: installed there only when the machine's version is outside the
# range scikit-survival needs (DEST/fallback/SPECS).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$(mkdir -p "${1:-$root/.whl}" && cd "${1:-$root/.whl}" && pwd)"
python="${PYTHON:-python3}"

wheels=(
    openslide-python==1.4.7 openslide-bin==4.0.1.2 jsonschema==4.26.0 jsonschema-specifications==2025.9.1
    referencing==0.37.0 rpds-py==2026.9.1 mambapy==1.2.0
    scikit-survival==0.28.0 ecos==2.0.14 osqp==1.1.3 numexpr==2.14.2
    snakemake==9.27.1 snakemake-executor-plugin-slurm==2.8.0 snakemake-executor-plugin-slurm-jobstep==0.6.1
    snakemake-interface-common==1.23.0 snakemake-interface-executor-plugins==9.4.0
    snakemake-interface-logger-plugins==2.1.0 snakemake-interface-report-plugins==1.3.0
    snakemake-interface-scheduler-plugins==2.0.2 snakemake-interface-storage-plugins==4.4.1
    argparse-dataclass==2.0.0 conda-inject==1.3.2 configargparse==1.9.0 docutils==0.22.4 dpath==2.2.0
    gitdb==4.0.12 gitpython==3.2.1 humanfriendly==10.0 immutables==0.21 nbformat==5.11.1
    fastjsonschema==2.22.3 jupyter-core==5.9.1 traitlets==5.16.1 platformdirs==4.14.8 smart-open==7.7.1
    smmap==5.0.3 throttler==1.2.3 yte==1.9.4 sqlmodel==0.0.37 sqlalchemy==2.0.58 greenlet==3.5.6
    tenacity==9.2.1 tzdata==2026.6
    optuna==5.0.0 alembic==1.20.1 mako==1.4.3 colorlog==6.12.0
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
    typing-extensions==4.16.0
)
platforms=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
    --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
    --platform manylinux1_x86_64)
download() { "$python" -m pip download -q --no-deps --only-binary=:all: "${platforms[@]}" "$@"; }

download -d "$dest" "${wheels[@]}"
# connection-pool (snakemake) is an sdist only: a pure-Python wheel built here
"$python" -m pip wheel -q --no-deps --no-binary :all: -w "$dest" connection-pool==0.0.3
mkdir -p "$dest/fallback"
download -d "$dest/fallback" scikit-learn==1.9.1
echo "scikit-learn>=1.9,<1.10" >"$dest/fallback/SPECS"
# the kernels' sources; their setup.py needs torch and, unless told to skip it, CUDA to report metadata
MAMBA_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE "$python" -m pip download -q --no-deps \
    --no-binary :all: --no-build-isolation -d "$dest" mamba-ssm==2.3.2.post1 causal-conv1d==1.7.0
include=""
for py312 in python3.12 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12; do
    include=$("$py312" -c 'import sysconfig; print(sysconfig.get_paths()["include"])' 2>/dev/null) && break
done
if [ -n "$include" ] && [ -f "$include/Python.h" ]; then
    tar czf "$dest/python3.12-include.tar.gz" -C "$(dirname "$include")" "$(basename "$include")"
else
    echo "no python3.12 with headers here: the GPU machine must have its own Python.h to build the kernels"
fi
du -sh "$dest"
echo "carry it: the device call's carry list names .whl (and .testdata); benchmarks/README.md"
