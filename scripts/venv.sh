#!/usr/bin/env bash
# Make or reuse the project's virtual environment (.venv) and install pathmil with what it needs.
# Sourced by run_demo.sh and run_tests.sh. Reinstalls only when pyproject.toml changed since the last install.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
python="${PYTHON:-python3}"
extras="${PATHMIL_EXTRAS:-test}"
# torch's CUDA build takes 5.5 GB in the venv, and pip unpacks it beside that: a first install on a disk
# with less than this much free would fail half-way with pip's "No space left on device"
min_free_gb="${PATHMIL_MIN_FREE_GB:-8}"

stamp="$venv/.pathmil-installed"
want="$(sha256sum "$root/pyproject.toml" | cut -d' ' -f1) $extras"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    if [ ! -x "$venv/bin/python" ]; then
        free_gb=$("$python" -c 'import shutil, sys; print(shutil.disk_usage(sys.argv[1]).free // 2**30)' "$root")
        if ! [[ "$min_free_gb" =~ ^[0-9]+$ && "$free_gb" =~ ^[0-9]+$ ]]; then
            echo "[pathmil] error: PATHMIL_MIN_FREE_GB must be a whole number of GB, not '$min_free_gb'" >&2
            exit 1
        fi
        if [ "$free_gb" -lt "$min_free_gb" ]; then
            echo "[pathmil] error: $free_gb GB free on the disk of $root; a first install of" \
                "pathmil[$extras] (torch included) needs about $min_free_gb GB. Free some space, or set" \
                "PATHMIL_MIN_FREE_GB lower if torch's wheels are already on this disk." >&2
            exit 1
        fi
        echo "[pathmil] creating $venv"
        "$python" -m venv "$venv"
    fi
    echo "[pathmil] installing pathmil[$extras] into $venv (first time: a few minutes)"
    "$venv/bin/python" -m pip install -q --upgrade pip
    # torch first, pinned: on machines of this kind both wheels lie on local disk (a CUDA build that runs
    # on CPU); elsewhere pip downloads them (without keeping a second copy in pip's cache). torchvision
    # must match torch or its operators fail to load.
    "$venv/bin/python" -m pip install -q --no-cache-dir \
        "torch==${PATHMIL_TORCH:-2.14.1}" "torchvision==${PATHMIL_TORCHVISION:-0.29.1}"
    "$venv/bin/python" -m pip install -q -e "$root[$extras]"
    echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
export VIRTUAL_ENV="$venv"
