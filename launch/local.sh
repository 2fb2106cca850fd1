#!/usr/bin/env bash
# Run one training job on this machine (CPU, or every local GPU when jax[cuda] is installed).
#   launch/local.sh configs/pretrain_tiny.py runs/pretrain_tiny [--config.train.steps=100 ...]
set -euo pipefail
config=${1:?usage: launch/local.sh CONFIG WORKDIR [--config.x=y ...]}
workdir=${2:?usage: launch/local.sh CONFIG WORKDIR [--config.x=y ...]}
shift 2
cd "$(dirname "$0")/.."
mkdir -p "$workdir"
# GPU runs: let XLA take most of the memory up front and overlap collectives with compute.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
python -m jaxllm.train --config "$config" --workdir "$workdir" "$@" 2>&1 | tee -a "$workdir/train.log"
