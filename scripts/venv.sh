#!/usr/bin/env bash
# Make or reuse the project's virtual environment (.venv) and install pathmil with what it needs.
# Sourced by run_demo.sh and run_tests.sh. Reinstalls only when pyproject.toml changed since the last install.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
python="${PYTHON:-python3}"
extras="${PATHMIL_EXTRAS:-test}"

if [ ! -x "$venv/bin/python" ]; then
    echo "[pathmil] creating $venv"
    "$python" -m venv "$venv"
fi
stamp="$venv/.pathmil-installed"
want="$(sha256sum "$root/pyproject.toml" | cut -d' ' -f1) $extras"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "[pathmil] installing pathmil[$extras] into $venv (first time: a few minutes)"
    "$venv/bin/python" -m pip install -q --upgrade pip
    # torch first, pinned: on machines of this kind both wheels lie on local disk (a CUDA build that runs
    # on CPU); elsewhere pip downloads them. torchvision must match torch or its operators fail to load.
    "$venv/bin/python" -m pip install -q "torch==${PATHMIL_TORCH:-2.14.1}" "torchvision==${PATHMIL_TORCHVISION:-0.29.1}"
    "$venv/bin/python" -m pip install -q -e "$root[$extras]"
    echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
export VIRTUAL_ENV="$venv"
