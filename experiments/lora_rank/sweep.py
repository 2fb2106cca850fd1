"""The sweep of experiments/lora_rank: a tiny model pretrained on a four-topic Markov language
(jaxllm/data/synthetic.py), then LoRA fine-tuning at ranks 1-64 on attention targets {q}, {q,v}, {q,k,v,o} on a
task near its pretraining (one of its topics) and, as a control, on a far task (that topic with its vocabulary
relabelled), each over 3 seeds.

  python experiments/lora_rank/run.py --workdir runs/lora_rank [--quick]

arg: quick (fewer, shorter points: what the tests run) and data (the directory of the JSONL files run.py writes).
"""

import os

from experiments import study
from jaxllm.config import parse_arg

RANKS, QUICK_RANKS = (1, 2, 4, 8, 16, 64), (1, 64)
TARGETS = {"q": r"attn/q/kernel$", "qv": r"attn/(q|v)/kernel$", "qkvo": r"attn/(q|k|v|o)/kernel$"}
QUICK_TARGETS = ("q", "qv")
BUDGET = {"q": 8, "qv": 4, "qkvo": 2}  # Hu et al. Table 5: one trainable-parameter budget, spread over the targets
FAR_TARGETS = ("qv",)                 # the control: the paper's recommended targets on a task far from pretraining
MODEL = {"d_model": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "head_dim": 16, "mlp_dim": 192}


def _arg(arg):
  return parse_arg(arg, quick=False, data="")


def get_config(arg=None):
  """Pretraining on every topic; the fine-tuning points override data.sources, init_from, lora.* and steps."""
  a = _arg(arg)
  return study.tiny_lm_config(os.path.join(a.data, "pretrain.jsonl"), MODEL, 100 if a.quick else 3000, a.quick)


def finetune(a, task: str, targets: str, rank: int, seed: int) -> dict:
  steps = 12 if a.quick else 200
  return {"name": f"{task}_{targets}_r{rank}_seed{seed}", "init_from": "@pretrain", "seed": seed,
          "data.sources": os.path.join(a.data, f"{task}.jsonl"), "data.validation_fraction": 0.1,
          "lora.enabled": True, "lora.rank": rank, "lora.alpha": 16.0, "lora.targets": TARGETS[targets],
          "train.steps": steps, "train.eval_every": steps // 4, "train.checkpoint_every": steps,
          "optimizer.warmup_steps": steps // 10}


def get_sweep(arg=None):
  a = _arg(arg)
  seeds = range(1 if a.quick else 3)
  ranks = QUICK_RANKS if a.quick else RANKS
  points = [{"name": "pretrain"}]
  for targets in (QUICK_TARGETS if a.quick else TARGETS):
    points += [finetune(a, "near", targets, r, s) for r in ranks for s in seeds]
  for targets in FAR_TARGETS:
    points += [finetune(a, "far", targets, r, s) for r in ranks for s in seeds]
  return points
