#!/usr/bin/env bash
# Wall time of the commands that need no model (docs/benchmarks.md, "Start-up of the commands"), RUNS runs each:
#   bench/start_times.sh [RUNS]
# Runs `python -m vitparity` and `python -m pytest -p vitparity.pytest_plugin` from an empty temporary folder, so the
# vitparity that python imports is the installed one (or the one PYTHONPATH names: a checkout of an older commit).
set -u
runs=${1:-3}
golden=$(python -c "from vitparity.builtin import BUILTIN_GOLDEN; print(next(BUILTIN_GOLDEN.rglob('*.npz')))")
here=$(mktemp -d)
trap 'rm -rf "$here"' EXIT
cd "$here" || exit 1
measure() {  # LABEL COMMAND...: the label, the exit status and each run's wall seconds
    local label=$1 times="" start status
    shift
    for _ in $(seq "$runs"); do
        start=$(date +%s.%N)
        "$@" >/dev/null 2>&1
        status=$?
        times="$times $(python -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.2f}')" "$start" "$(date +%s.%N)")"
    done
    echo "$label (exit $status):$times"
}
measure "vitparity --version" python -m vitparity --version
measure "vitparity --help" python -m vitparity --help
measure "vitparity extract --help" python -m vitparity extract --help
measure "vitparity golden-show GOLDEN" python -m vitparity golden-show "$golden"
measure "vitparity extract --dtype float8" python -m vitparity extract --dtype float8
measure "vitparity verify --features_dir /no/such" python -m vitparity verify --features_dir /no/such
measure "pytest -p vitparity.pytest_plugin --help" python -m pytest -p vitparity.pytest_plugin --help
measure "pytest -p vitparity.pytest_plugin --num-frames=abc" \
    python -m pytest -p no:cacheprovider -p vitparity.pytest_plugin --num-frames=abc --pyargs vitparity.parity_tests
