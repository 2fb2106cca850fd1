#!/usr/bin/env bash
# Runs the tiny pipeline (pretrain -> SFT -> LoRA-DPO) with shortened step counts into OUT, for a bit-identity
# comparison of two versions of the code (a refactor must not change a single loss value):
#   bench/identity.sh OUT_A                      # on the old commit (e.g. a git worktree of it)
#   bench/identity.sh OUT_B                      # on the new one
#   python bench/identity_compare.py OUT_A OUT_B
# IDENTITY_ARGS adds overrides to every stage (IDENTITY_ARGS="--config.model.query_blocks=1" bench/identity.sh OUT).
set -euo pipefail
out=${1:?usage: bench/identity.sh OUT}
cd "$(dirname "$0")/.."
mkdir -p "$out"
out=$(cd "$out" && pwd)
steps=${STEPS:-60}
common=(--config.train.num_samples=0 --config.train.log_every=1 --config.train.eval_every=20 ${IDENTITY_ARGS:-})
python -m jaxllm.train --config configs/pretrain_tiny.py --workdir "$out/pretrain_tiny" "${common[@]}" \
    --config.train.steps=$((steps * 2)) --config.train.checkpoint_every=$((steps * 2)) > "$out/pretrain.log" 2>&1
python -m jaxllm.train --config configs/sft_tiny.py --workdir "$out/sft_tiny" "${common[@]}" \
    --config.train.steps="$steps" --config.init_from="$out/pretrain_tiny" > "$out/sft.log" 2>&1
python -m jaxllm.train --config configs/dpo_tiny.py --workdir "$out/dpo_tiny" "${common[@]}" \
    --config.train.steps="$steps" --config.init_from="$out/sft_tiny" > "$out/dpo.log" 2>&1
echo "wrote $out/{pretrain_tiny,sft_tiny,dpo_tiny}/metrics.jsonl"
