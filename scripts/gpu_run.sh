#!/usr/bin/env bash
# One call on a lent GPU machine (torch and triton already installed, no network):
# install vhist without touching its torch, then run the parts named on the command line.
#   bash scripts/gpu_run.sh tests            # whole suite, compiled Triton
#   bash scripts/gpu_run.sh bench [ARGS...]  # bench/kernels.py ARGS
#   bash scripts/gpu_run.sh models [ARGS...] # bench/models.py ARGS
# Logs and result files go to $OUT (the device tool brings them back) when it is set.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
python3 -m pip install -q --no-build-isolation --no-deps -e . >"$OUT/install.log" 2>&1 || {
    cat "$OUT/install.log"; exit 1; }
part=${1:-tests}; shift || true
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
case "$part" in
    tests) python3 -m pytest -q -rs "$@" 2>&1 | tee "$OUT/pytest.log" ;;
    bench) python3 bench/kernels.py --out "$OUT" "$@" 2>&1 | tee "$OUT/bench_kernels.log" ;;
    models) python3 bench/models.py --out "$OUT" "$@" 2>&1 | tee "$OUT/bench_models.log" ;;
    *) echo "unknown part $part (tests | bench | models)"; exit 2 ;;
esac
