#!/usr/bin/env bash
# The whole pipeline at tiny scale, on a CPU in a few minutes: pretrain on Python's standard library, then
# masked SFT on the chatterbot conversations, then LoRA-DPO on preference pairs built from them, printing
# samples after each stage (and answers before SFT and DPO).
#   bash experiments/tiny_pipeline.sh [RUNS_DIR]      (default runs/; re-running resumes or skips finished stages)
set -euo pipefail
runs=${1:-runs}
cd "$(dirname "$0")/.."
python -m jaxllm.train --config configs/pretrain_tiny.py --workdir "$runs/pretrain_tiny"
python -m jaxllm.train --config configs/sft_tiny.py --workdir "$runs/sft_tiny" --config.init_from="$runs/pretrain_tiny"
# RPO (the chosen answer's NLL beside the DPO loss) keeps the SFT model's answers: experiments/pipeline/REPORT.md
python -m jaxllm.train --config configs/dpo_tiny.py --workdir "$runs/dpo_tiny" --config.init_from="$runs/sft_tiny" \
    --config.dpo.rpo_alpha=1.0
