#!/usr/bin/env bash
# The README's test command: environment, real test data, the one-node SLURM cluster, lint, then the whole
# test suite. Extra arguments go to pytest (e.g. scripts/run_tests.sh -k tile, or -m slurm).
# The SLURM tests (marker `slurm`) need the cluster that scripts/slurm_cluster.sh starts (root and apt-get).
# Where that cannot be, PATHMIL_SKIP_SLURM=1 runs everything else and says loudly that those did not run.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
source scripts/venv.sh
scripts/fetch_test_data.sh

# pytest's arguments, with any -m expression taken out so that the SLURM deselection can be added to it
marker=""
args=()
while [ $# -gt 0 ]; do
    case "$1" in
    -m)
        marker="$2"
        shift 2
        ;;
    -m*)
        marker="${1#-m}"
        shift
        ;;
    *)
        args+=("$1")
        shift
        ;;
    esac
done

skip_banner() {
    echo "[pathmil] ##############################################################################"
    echo "[pathmil] PATHMIL_SKIP_SLURM=1: the SLURM tests (marker 'slurm') were DESELECTED, NOT run:"
    echo "[pathmil] the workflow's SLURM profile is untested here. Unset it where root can start the cluster."
    echo "[pathmil] ##############################################################################"
}

skip_slurm="${PATHMIL_SKIP_SLURM:-0}"
if [ "$skip_slurm" = 1 ]; then
    skip_banner
    marker="${marker:+($marker) and }not slurm"
else
    echo "[pathmil] starting the one-node SLURM cluster"
    if ! scripts/slurm_cluster.sh start; then
        echo "[pathmil] error: could not start the SLURM test cluster (scripts/slurm_cluster.sh start" \
            "needs root and apt-get; its message is above). Fix that, or set PATHMIL_SKIP_SLURM=1 to run" \
            "the other tests without the SLURM ones." >&2
        exit 1
    fi
fi

echo "[pathmil] ruff check"
ruff check .
echo "[pathmil] pytest"
status=0
# the slowest tests are listed at the end. One process: with two pytest-xdist workers on the 2 test cores
# the run took 27 min (38 min of CPU; 2026-11-30, beside a niced benchmark) where one process takes 17:
# the workflow tests' own jobs and threads compete with the other worker for the same cores
python -m pytest --durations=15 ${marker:+-m "$marker"} "${args[@]}" || status=$?
if [ "$skip_slurm" = 1 ]; then skip_banner; fi
exit $status
