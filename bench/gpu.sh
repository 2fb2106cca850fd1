#!/usr/bin/env bash
# On a machine with one GPU: tokens/s, MFU, peak memory and compile time of the 124m and 1b train steps, and the
# LoRA and DPO steps at 124m (bench/gpu.py), appended to bench/RESULTS.md.   bash bench/gpu.sh [gpu.py flags]
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v nvidia-smi >/dev/null; then nvidia-smi -L; fi
python -c "import jax; jax.devices('gpu')" >/dev/null 2>&1 || pip install -e ".[gpu]"
timeout 480 python bench/gpu.py --write "$@"
