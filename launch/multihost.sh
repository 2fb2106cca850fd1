#!/usr/bin/env bash
# Any cluster: run this on every host, each with its rank (0 .. NUM_HOSTS-1). Host 0 is the coordinator.
#
#   launch/multihost.sh COORDINATOR_HOST:PORT NUM_HOSTS RANK CONFIG WORKDIR [--config.x=y ...]
#   e.g. on 4 hosts:  launch/multihost.sh 10.0.0.1:12345 4 $RANK configs/pretrain.py:size=7b,gpus=4x8 /shared/runs/pt_7b
#
# WORKDIR must be on a filesystem every host sees (checkpoints are written by all hosts, logs by host 0).
set -euo pipefail
usage="usage: launch/multihost.sh COORDINATOR:PORT NUM_HOSTS RANK CONFIG WORKDIR [--config.x=y ...]"
export JAXLLM_COORDINATOR=${1:?$usage}
export JAXLLM_NUM_PROCESSES=${2:?$usage}
export JAXLLM_PROCESS_ID=${3:?$usage}
config=${4:?$usage}
workdir=${5:?$usage}
shift 5
cd "$(dirname "$0")/.."
export JAXLLM_INIT_TIMEOUT=${JAXLLM_INIT_TIMEOUT:-600}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
if command -v nvidia-smi >/dev/null; then
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
fi
mkdir -p "$workdir"
python -m jaxllm.train --config "$config" --workdir "$workdir" "$@" 2>&1 | tee -a "$workdir/train.rank$JAXLLM_PROCESS_ID.log"
