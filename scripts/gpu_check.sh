#!/usr/bin/env bash
# The GPU check (issue 17): pathmil's GPU paths proved in one call of the device tool, in under 8 minutes.
#
#   scripts/gpu_check.sh                    on the GPU machine, from the repository root
#   scripts/gpu_check.sh --dry-run          the same steps' plumbing on the CPU, tiny sizes, no installs
#   scripts/gpu_check.sh --only data,train  a subset of the steps (a rerun after a fix): train, mamba and
#                                           workflow need data; tests and mamba need build (kernels that
#                                           built in an earlier call on the same machine are reused)
#   scripts/gpu_check.sh --build-after-extract
#                                           extract runs right after info and the build starts after it,
#                                           so extraction is timed on a quiet machine (the nvcc build on
#                                           every core slowed one reader 1.2-1.4x); with --only, as the
#                                           whole run does not fit 8 minutes this way
#
# Exit status 1 when a step failed, broke or ran out of time; every step runs regardless.
# Steps, in this order, each under its own hard time limit (`timeout`) inside a budget for the whole run
# (GPU_CHECK_BUDGET_S, 470 s): info, data, train, extract, workflow, build, tests, mamba; what each does
# and checks is in benchmarks/gpu_check.py. Before them: the wheels in .whl/ are installed into
# $GPU_CHECK_WORK/site (pip --target, no index), and mamba-ssm and causal-conv1d are built from their
# sdists in .whl/ for sm_90 alone, in the background (nice 10, all cores) while the steps before build
# run (with --build-after-extract: from the end of extract);
# the build step waits for them until GPU_CHECK_BUILD_CAP_S (360 s after the start) and then goes on
# without them, saying so. (On the H200, 2026-11-30: beside the first steps mamba-ssm built inside
# 330 s and causal-conv1d did not; on a quiet machine they took 129 s and 342 s.) Each step knows its
# limit (GPU_CHECK_STEP_LIMIT_S): the data step's extraction and the mamba step's training end before
# it, so those steps still record what they did. Results: $OUT/gpu_check.json and $OUT/gpu_check.md,
# rewritten after every step (a step stopped by its limit keeps what it measured); the whole log:
# $OUT/gpu_check.log; build logs: $OUT/build_mamba.log, $OUT/build_conv1d.log. One line per step:
# status, seconds, verdict.
#
# The device tool copies the repository's tracked files; carry .whl (scripts/gpu_check_wheels.sh fills
# it) and .testdata (scripts/fetch_test_data.sh). benchmarks/README.md has the exact call.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

dry=0
only=""
build_after_extract=0
while [ $# -gt 0 ]; do
    case "$1" in
    --dry-run) dry=1 ;;
    --only) only="${2:?--only needs a list of steps}" && shift ;;
    --build-after-extract) build_after_extract=1 ;;
    -h | --help) sed -n '2,/^set -uo/p' "$0" | sed '$d' && exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (see --help)" && exit 2 ;;
    esac
    shift
done

PY="$(command -v "${PYTHON:-python3}")"
OUT="${OUT:-$root/benchmarks/out/gpu_check}"
WORK="${GPU_CHECK_WORK:-/tmp/gpu_check}"
# a dry run does the steps' work on this machine's CPU cores, not the device's 16: its limits and budget
# are GPU_CHECK_DRY_SCALE (3) times the device's, so that a busy 2-core machine does not time a step out
scale=1
[ "$dry" = 1 ] && scale="${GPU_CHECK_DRY_SCALE:-3}"
BUDGET="${GPU_CHECK_BUDGET_S:-$((470 * scale))}"
BUILD_CAP="${GPU_CHECK_BUILD_CAP_S:-360}"
SITE="$WORK/site"
KERNELS="$WORK/kernels"
start=$SECONDS
# a fresh scratch folder, but kernels that built and imported in an earlier call on this machine stay
mkdir -p "$WORK"
find "$WORK" -mindepth 1 -maxdepth 1 ! -name kernels -exec rm -rf {} +
[ -f "$KERNELS/imports.ok" ] || rm -rf "$KERNELS"
mkdir -p "$WORK/bin" "$WORK/logs" "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
tee_pid=$!
common=(--work "$WORK" --out "$OUT")
[ "$dry" = 1 ] && common+=(--dry-run)
echo "[gpu-check] $(date -u '+%F %T UTC') in $root, python $PY, out $OUT, dry run: $dry, budget $BUDGET s"

wanted() { [ -z "$only" ] || [[ ",$only," == *",$1,"* ]]; }
elapsed() { echo $((SECONDS - start)); }
finish() { "$PY" benchmarks/gpu_check.py finish "${common[@]}" "$@"; }

# step NAME LIMIT COMMAND...: run it under min(LIMIT, what the budget leaves after RESERVE seconds kept
# for the steps after it), then record how it ended
step() {
    local name=$1 cap=$2 left limit t0 rc
    shift 2
    wanted "$name" || return 0
    cap=$((cap * scale))
    left=$((BUDGET - $(elapsed) - 5 - ${RESERVE:-0} * scale))
    limit=$((cap < left ? cap : left))
    if [ "$limit" -lt 15 ]; then
        finish --step "$name" --status skipped --verdict "not started: $left s of the $BUDGET s budget left"
        return 0
    fi
    echo "[gpu-check] $name: starting at $(elapsed) s, limit $limit s"
    t0=$SECONDS
    GPU_CHECK_STEP_LIMIT_S=$limit timeout --kill-after=10 "$limit" "$@"
    rc=$?
    finish --step "$name" --rc "$rc" --seconds $((SECONDS - t0)) --limit "$limit"
}

# ------------------------------------------------------------------------------ environment and wheels
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TORCH_HOME="$WORK/torch_home" HF_HOME="$WORK/hf_home"
# the repository's pathmil first, then the carried wheels, then the machine's own packages
export PYTHONPATH="$root:$SITE${PYTHONPATH:+:$PYTHONPATH}"
# rules and tests call `pathmil`; a --target install has no console scripts
printf '#!/bin/sh\nexec "%s" -m pathmil "$@"\n' "$PY" >"$WORK/bin/pathmil"
printf '#!/bin/sh\nexec "%s" -m snakemake "$@"\n' "$PY" >"$WORK/bin/snakemake"
chmod +x "$WORK/bin/pathmil" "$WORK/bin/snakemake"
export PATH="$WORK/bin:$(dirname "$PY"):$PATH"
if [ "$dry" = 0 ] && compgen -G ".whl/*.whl" >/dev/null; then
    t0=$SECONDS
    pip_target=("$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE")
    if "${pip_target[@]}" .whl/*.whl; then
        echo "[gpu-check] wheels: $(ls .whl/*.whl | wc -l) installed into $SITE in $((SECONDS - t0)) s"
    else  # one bad wheel stops pip for all: install them one by one, naming those that fail
        echo "[gpu-check] wheels: pip install of all failed; one by one:"
        for whl in .whl/*.whl; do
            "${pip_target[@]}" "$whl" >/dev/null 2>&1 || echo "[gpu-check] wheels: FAILED $whl"
        done
    fi
    # a carried version only where the machine's own is outside the range a carried package needs
    for whl in $("$PY" benchmarks/gpu_check.py fallbacks --path .whl/fallback "${common[@]}"); do
        echo "[gpu-check] wheels: the machine's version does not fit, installing $whl"
        "${pip_target[@]}" "$whl"
    done
elif [ "$dry" = 0 ]; then
    echo "[gpu-check] wheels: none in .whl/ (carry .whl; scripts/gpu_check_wheels.sh fills it)"
fi

# --------------------------------------------------------------------- mamba-ssm and causal-conv1d build
build_kernels() {
    local cap=$1 conv mamba nvcc pyinc name dir
    conv=$(ls .whl/causal_conv1d-*.tar.gz 2>/dev/null | head -1)
    mamba=$(ls .whl/mamba_ssm-*.tar.gz 2>/dev/null | head -1)
    if [ -z "$conv" ] || [ -z "$mamba" ]; then
        echo "no sdists of causal-conv1d and mamba-ssm in .whl/" >"$WORK/build.skip"
        return
    fi
    # the CUDA toolkit: the first of these with both nvcc and the runtime's headers
    nvcc=$(command -v nvcc || true)
    local found=""
    for dir in ${CUDA_HOME:-} "$(dirname "$(dirname "$(readlink -f "${nvcc:-/none}")")")" /usr/local/cuda /usr/local/cuda-*; do
        if [ -x "$dir/bin/nvcc" ] && [ -f "$dir/include/cuda_runtime.h" ]; then
            found=$dir
            break
        fi
    done
    CUDA_HOME=$found
    if [ -z "$CUDA_HOME" ]; then
        echo "no CUDA toolkit (nvcc with include/cuda_runtime.h) on the machine" >"$WORK/build.skip"
        return
    fi
    export CUDA_HOME
    export PATH="$CUDA_HOME/bin:$PATH"
    nvcc="$CUDA_HOME/bin/nvcc"
    if ! "$PY" -c 'import os, sys, sysconfig; sys.exit(not os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'; then
        pyinc=$(ls .whl/python"$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"-include.tar.gz 2>/dev/null)
        if [ -z "$pyinc" ]; then
            echo "no Python.h on the machine and no python headers carried in .whl/" >"$WORK/build.skip"
            return
        fi
        mkdir -p "$WORK/pyinc" && tar xzf "$pyinc" -C "$WORK/pyinc"
        export CPATH="$(ls -d "$WORK"/pyinc/*/)${CPATH:+:$CPATH}"
        echo "Python.h from $pyinc (CPATH=$CPATH)"
    fi
    mkdir -p "$WORK/build"
    tar xzf "$conv" -C "$WORK/build" && tar xzf "$mamba" -C "$WORK/build"
    for dir in "$WORK"/build/*/; do
        "$PY" benchmarks/gpu_check.py patch-setup --path "$dir/setup.py" || {
            echo "could not restrict $dir/setup.py to sm_90" >"$WORK/build.skip"
            return
        }
    done
    export TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="$(nproc)"
    export CAUSAL_CONV1D_FORCE_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE
    echo "nvcc $nvcc ($("$nvcc" --version | tail -1)), ninja $(command -v ninja || echo missing), MAX_JOBS $MAX_JOBS"
    for name in conv1d mamba; do
        dir=$(ls -d "$WORK"/build/"$([ $name = conv1d ] && echo causal_conv1d || echo mamba_ssm)"-*/)
        (
            t0=$SECONDS
            timeout --kill-after=10 "$cap" nice -n 10 "$PY" -m pip install -v --no-index --no-deps \
                --no-build-isolation --no-cache-dir --target "$KERNELS/$name" "$dir" >"$WORK/logs/build_$name.log" 2>&1
            echo "$? $((SECONDS - t0))" >"$WORK/build_$name.rc"
        ) &
    done
    wait
}

build_pid=""
start_build() {
    wanted build || return 0
    if [ "$dry" = 1 ]; then
        echo "dry run: nothing is built on the CPU" >"$WORK/build.skip"
    elif [ -f "$KERNELS/imports.ok" ]; then
        echo "0 reused" >"$WORK/build_conv1d.rc" && echo "0 reused" >"$WORK/build_mamba.rc"
        echo "[gpu-check] build: kernels built by an earlier call on this machine are reused"
    else
        local cap=$((BUILD_CAP - $(elapsed)))
        echo "[gpu-check] build: mamba-ssm and causal-conv1d for sm_90 in the background, at most $cap s"
        build_kernels "$cap" >"$WORK/logs/build.log" 2>&1 &
        build_pid=$!
    fi
}

# ----------------------------------------------------------------------------------------------- steps
# the steps without the kernels first, while they build; then the two that use them, with 110 s kept for
# them (tests 30 s, mamba 80 s) whatever the first steps take (nothing kept when neither runs)
export RESERVE=0
{ wanted tests || wanted mamba; } && RESERVE=110
extract_step() { step extract 120 "$PY" benchmarks/gpu_check.py extract "${common[@]}"; }
[ "$build_after_extract" = 0 ] && start_build
step info 40 "$PY" benchmarks/gpu_check.py info "${common[@]}"
[ "$build_after_extract" = 1 ] && { extract_step; start_build; }
step data 120 "$PY" benchmarks/gpu_check.py data "${common[@]}"
step train 150 "$PY" benchmarks/gpu_check.py train "${common[@]}"
[ "$build_after_extract" = 0 ] && extract_step
step workflow 150 "$PY" benchmarks/gpu_check.py workflow "${common[@]}"
export RESERVE=0
if wanted build; then
    t0=$SECONDS
    [ -n "$build_pid" ] && wait "$build_pid"
    cat "$WORK/logs/build.log" 2>/dev/null
    for name in conv1d mamba; do
        [ -f "$WORK/logs/build_$name.log" ] && tail -n 3000 "$WORK/logs/build_$name.log" >"$OUT/build_$name.log"
    done
    "$PY" benchmarks/gpu_check.py build "${common[@]}" --kernels "$KERNELS" --seconds $((SECONDS - t0))
fi
for dir in "$KERNELS"/conv1d "$KERNELS"/mamba; do
    [ -d "$dir" ] && export PYTHONPATH="$PYTHONPATH:$dir"
done
RESERVE=60 step tests 60 "$PY" benchmarks/gpu_check.py tests "${common[@]}"
step mamba 100 "$PY" benchmarks/gpu_check.py mamba "${common[@]}"
echo "[gpu-check] done in $(elapsed) s: $OUT/gpu_check.md"
cat "$OUT/gpu_check.md"
exec >&- 2>&-
wait "$tee_pid" 2>/dev/null  # the log is complete before the device tool collects $OUT
# exit 1 when a step failed, broke or ran out of time (skipped steps are not failures)
! grep -qE '"status": "(fail|error|timeout)"' "$OUT/gpu_check.json"
