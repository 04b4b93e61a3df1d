#!/usr/bin/env bash
# One call on a lent GPU machine (torch and triton already installed, no network).
#   bash scripts/gpu_run.sh all [--dry-run] [--budget S] [--only PARTS]
#        everything in 9 minutes (scripts/gpu_run.py): ceilings, GPU tests, quick kernel
#        bench, model bench, a short `vhist train`; results in $OUT (else bench/results/)
#   bash scripts/gpu_run.sh tests [PYTEST ARGS]   # whole suite, compiled Triton
#   bash scripts/gpu_run.sh bench [ARGS...]       # bench/kernels.py ARGS
#   bash scripts/gpu_run.sh models [ARGS...]      # bench/models.py ARGS
# A real run first installs vhist without touching the machine's torch
# (pip install --no-build-isolation --no-deps -e .); --dry-run (CPU, CI) installs nothing.
set -uo pipefail
cd "$(dirname "$0")/.."
export VHIST_GPU_RUN_T0=$(date +%s)
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
part=${1:-all}; shift || true
dry=0
for arg in "$@"; do [[ $arg == --dry-run ]] && dry=1; done
if [[ $dry == 0 ]]; then
    OUT=${OUT:-bench/results}
    mkdir -p "$OUT"
    unset TRITON_INTERPRET
    { echo "\$ $PY -m pip install --no-build-isolation --no-deps -e ."
      "$PY" -m pip install -q --no-build-isolation --no-deps -e . 2>&1; } >>"$OUT/gpu_run.log" || {
        tail -20 "$OUT/gpu_run.log"; exit 1; }
    export OUT
fi
case "$part" in
    all) exec "$PY" scripts/gpu_run.py "$@" ;;
    tests) nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
           "$PY" -m pytest -q -rs "$@" 2>&1 | tee -a "$OUT/gpu_run.log" ;;
    bench) "$PY" bench/kernels.py --out "$OUT" "$@" 2>&1 | tee -a "$OUT/gpu_run.log" ;;
    models) "$PY" bench/models.py --out "$OUT" "$@" 2>&1 | tee -a "$OUT/gpu_run.log" ;;
    *) echo "unknown part $part (all | tests | bench | models)"; exit 2 ;;
esac
