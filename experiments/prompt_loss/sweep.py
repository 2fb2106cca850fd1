"""The sweep of experiments/prompt_loss: a tiny model pretrained on four topics of a Markov language
(jaxllm/data/synthetic.py), then full SFT on prompt/answer pairs of a fifth topic with data.prompt_loss_weight in
{0, 0.01, 0.1, 0.5, 1} x answers short or long against the prompt x a small or a large training set, 3 seeds.

  python experiments/prompt_loss/run.py --workdir runs/prompt_loss [--quick]

arg: quick (fewer, shorter points: what the tests run) and data (the directory of the JSONL files run.py writes).
"""

import os

from configs import sft as sft_config
from experiments import study
from jaxllm.config import parse_arg

WEIGHTS, QUICK_WEIGHTS = (0.0, 0.01, 0.1, 0.5, 1.0), (0.0, 0.1)
SHAPES = {"short": (30, 3), "long": (8, 24)}  # answer length: (prompt words, answer words)
SIZES = {"small": 100, "large": 1000}          # training pairs
QUICK_SIZES = ("small",)
EVAL_PAIRS = 500                               # held-out pairs of each data file
MODEL = {"d_model": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "head_dim": 16, "mlp_dim": 192}


def _arg(arg):
  return parse_arg(arg, quick=False, data="", stage="pretrain")


def data_file(data: str, shape: str, size: str) -> str:
  return os.path.join(data, f"sft_{shape}_{size}.jsonl")


def get_config(arg=None):
  """Pretraining on four topics (stage=pretrain) or configs/sft.py's keys on the same model (stage=sft: the points
  set its data, init_from, steps and learning rate)."""
  a = _arg(arg)
  c = study.tiny_lm_config(os.path.join(a.data, "pretrain.jsonl"), MODEL, 100 if a.quick else 1500, a.quick)
  if a.stage == "pretrain":
    return c
  sft = sft_config.get_config().unlock()  # its data keys (prompt_loss_weight, overlong), this model and schedule
  samples = sft.train.sample_tokens, sft.train.sample_prompts
  for section in ("model", "train", "optimizer"):
    sft[section] = c[section]
  sft.train.sample_tokens, sft.train.sample_prompts = samples
  sft.data.tokenizer = c.data.tokenizer
  return sft


def sft(a, shape: str, size: str, weight: float, seed: int) -> dict:
  steps = 12 if a.quick else 150
  return {"name": f"{shape}_{size}_w{weight:g}_seed{seed}", "init_from": "@pretrain", "seed": seed,
          "config": f"{os.path.abspath(__file__)}:quick={a.quick},data={a.data},stage=sft",
          "data.sources": data_file(a.data, shape, size), "data.prompt_loss_weight": weight,
          "data.validation_fraction": EVAL_PAIRS / (EVAL_PAIRS + SIZES[size]), "data.overlong": "drop",
          "train.steps": steps, "train.eval_every": steps // 3, "train.checkpoint_every": steps,
          "optimizer.learning_rate": 1e-3, "optimizer.warmup_steps": steps // 10}


def get_sweep(arg=None):
  a = _arg(arg)
  points = [{"name": "pretrain"}]
  for shape in SHAPES:
    for size in (QUICK_SIZES if a.quick else SIZES):
      points += [sft(a, shape, size, w, s) for w in (QUICK_WEIGHTS if a.quick else WEIGHTS)
                 for s in range(1 if a.quick else 3)]
  return points
