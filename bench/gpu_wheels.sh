#!/usr/bin/env bash
# Wheels of the packages jaxllm needs that a GPU machine without network lacks, into .whl/ (git-ignored), for
# bench/gpu.sh to install there without an index.   bash bench/gpu_wheels.sh [PYTHON_VERSION]   (default 3.12)
#
# This workplace's lent H200 has Python 3.12 with jax and jax-cuda13 0.11.2, flax, optax, orbax-checkpoint,
# sentencepiece, numpy and matplotlib, and reaches no package index. Of what jaxllm imports it lacks grain (with
# array_record and portpicker, which grain imports), ml_collections, chatterbot-corpus (the SFT data module's
# default corpus) and tensorboardX (jaxllm.metrics). The pins are constraints.txt's, the versions CI tests. Run
# this here, then carry .whl with the run: run(command="bash bench/gpu.sh", carry=[".whl"], timeout_s=560).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:-3.12}
pins=()
for name in grain array_record portpicker ml_collections chatterbot-corpus tensorboardX; do
  pin=$(grep -i "^${name}==" constraints.txt) || { echo "constraints.txt pins no $name" >&2; exit 1; }
  pins+=("$pin")
done
mkdir -p .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$python" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d .whl "${pins[@]}"
ls -l .whl
