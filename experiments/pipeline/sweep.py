"""The sweep of experiments/pipeline: pretrain -> SFT -> LoRA-DPO at tiny scale (configs/*_tiny.py), the DPO stage
as plain DPO and with the three standard remedies for a policy that drifts from its SFT start, over 3 seeds.

  python experiments/pipeline/run.py --workdir runs/pipeline [--quick]
"""

import os

from jaxllm.config import parse_arg

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = {stage: os.path.join(ROOT, "configs", f"{stage}_tiny.py") for stage in ("pretrain", "sft", "dpo")}

# the DPO stage: plain, and each remedy alone
VARIANTS = {
    "dpo": {},
    "rpo": {"dpo.rpo_alpha": 1.0},                    # + the chosen answer's NLL (Pang et al. 2024)
    "low_lr": {"optimizer.learning_rate": 5e-4},      # a quarter of dpo_tiny's 2e-3
    "beta_0.5": {"dpo.beta": 0.5},                    # a 5x stronger anchor to the SFT model
}
QUICK = {  # a check of the pipeline in about a minute: a smaller model, a few steps per stage
    "pretrain": {"train.steps": 30, "train.batch_size": 8, "train.seq_len": 64, "train.eval_batches": 2,
                 "optimizer.warmup_steps": 3, "model.d_model": 32, "model.num_layers": 2, "model.num_heads": 2,
                 "model.num_kv_heads": 1, "model.head_dim": 16, "model.mlp_dim": 64,
                 "data.tokenizer.vocab_size": 512, "data.tokenizer.max_sentences": 20_000},
    "sft": {"train.steps": 20, "train.batch_size": 8, "train.seq_len": 64, "train.eval_batches": 2,
            "optimizer.warmup_steps": 2},
    "dpo": {"train.steps": 10, "train.batch_size": 4, "train.seq_len": 64, "train.eval_batches": 2,
            "train.eval_every": 5, "optimizer.warmup_steps": 1},
}
QUICK_VARIANTS = ("dpo", "rpo")


def get_config(arg=None):
  raise ValueError("experiments/pipeline/sweep.py: each point names its own config (configs/*_tiny.py)")


def get_sweep(arg=None):
  a = parse_arg(arg, quick=False)
  quiet = {"train.num_samples": 0}  # the report generates its own samples
  extra = lambda stage: {**quiet, **(QUICK[stage] if a.quick else {})}
  points = [{"name": "pretrain", "config": CONFIG["pretrain"], **extra("pretrain")},
            {"name": "sft", "config": CONFIG["sft"], "init_from": "@pretrain", **extra("sft")}]
  for variant, overrides in VARIANTS.items():
    if a.quick and variant not in QUICK_VARIANTS:
      continue
    points += [{"name": f"{variant}_seed{s}", "config": CONFIG["dpo"], "init_from": "@sft", "seed": s, **overrides,
                **extra("dpo")} for s in range(1 if a.quick else 3)]
  return points
