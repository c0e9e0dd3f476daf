#!/usr/bin/env bash
# Every GPU measurement of docs/benchmarks.md in one go; results and the printed tables land in $1.
#   bench/gpu_check.sh gpu-results               (H100 / H200, about 8 minutes)
#   bench/gpu_check.sh /tmp/check --small        (tiny sizes on the CPU)
set -euo pipefail
out=${1:?usage: bench/gpu_check.sh OUT_DIR [--small] [--scale-videos N]}
shift
mkdir -p "$out"
cd "$(dirname "$0")/.."
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" python -m bench gpu-check --out "$out" "$@" 2>&1 | tee "$out/log.txt"
