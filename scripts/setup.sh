#!/usr/bin/env bash
# Installs vhist for development. A machine without CUDA gets the CPU build of torch
# (torch==2.13.0 on these machines) first, so that installing vhist never pulls a
# multi-GB CUDA torch; a machine that already has torch keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    "$PYTHON" -m pip install torch==2.13.0
fi
"$PYTHON" -m pip install -e ".[dev]"
