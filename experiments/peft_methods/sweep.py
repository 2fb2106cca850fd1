"""The sweep of experiments/peft_methods: experiments/lora_rank's tiny model pretrained on a four-topic Markov
language (jaxllm/data/synthetic.py), then SFT on prompt/answer walks of a task near its pretraining (one of its
topics) and one far from it (that topic, vocabulary relabelled) by five methods at the same steps: full
fine-tuning, LoRA r=8 on attention and MLP, prompt tuning (20 virtual tokens), prefix tuning (20 keys and values
per layer, trained directly) and prefix tuning through a reparameterisation MLP of width 256; 3 seeds each, every
method at its learning rate in LR. With probe=True, instead: every method at each learning rate of PROBE_LRS,
seed 0 (the probe that chose LR; its points at LR are the main sweep's seed-0 points, shared in one DIR).

  python experiments/peft_methods/run.py --workdir runs/peft_methods [--quick] [--probe]

arg: quick (fewer, shorter points: what the tests run), probe, data (the directory of the JSONL files run.py
writes), stage (pretrain | sft) and method (a key of METHODS, for stage=sft).
"""

import os

from experiments import study
from experiments.lora_rank import sweep as lora_rank
from jaxllm import config as config_lib
from jaxllm.config import parse_arg

MODEL = lora_rank.MODEL  # d_model 64, 2 layers: lora_rank's pretrained model, on its data
METHODS = {              # the config keys that select each method; every other key is the same
    "full": {},
    "lora": {"lora.enabled": True, "lora.rank": 8, "lora.alpha": 16.0, "lora.targets": "attention,mlp"},
    "prompt": {"prompt_tuning.num_tokens": 20},
    "prefix": {"prefix_tuning.num_tokens": 20},
    "prefix_mlp": {"prefix_tuning.num_tokens": 20, "prefix_tuning.hidden": 256},
}
LR = {"full": 1e-2, "lora": 1e-2, "prompt": 3e-1, "prefix": 1.0, "prefix_mlp": 3e-2}  # chosen by the probe
PROBE_LRS = {"full": (1e-3, 3e-3, 1e-2, 3e-2), "lora": (3e-3, 1e-2, 3e-2), "prompt": (3e-2, 1e-1, 3e-1, 1.0),
             "prefix": (1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0), "prefix_mlp": (3e-3, 1e-2, 3e-2, 1e-1)}  # half-decades
TASKS, QUICK_TASKS = ("near", "far"), ("near",)
QUICK_METHODS = ("full", "lora", "prompt", "prefix")  # two waves of two; tests/test_prefix.py trains a prefix MLP
SEEDS, QUICK_SEEDS = 3, 1
PROMPT_WORDS, ANSWER_WORDS = 4, 12  # a short prompt: its topic is not yet certain when the answer starts
PAIRS, QUICK_PAIRS, EVAL_FRACTION = 3000, 1000, 0.1  # per task file, 10% of them held out
STEPS, QUICK_STEPS = 200, 12


def _arg(arg):
  return parse_arg(arg, quick=False, probe=False, data="", stage="pretrain", method="full")


def data_file(data: str, task: str) -> str:
  return os.path.join(data, f"sft_{task}.jsonl")


def get_config(arg=None):
  """stage=pretrain: lora_rank's pretraining point; stage=sft: masked SFT (configs/sft.py's data keys) on the
  same model by `method` (a key of METHODS), for the points to set init_from, data, seed and learning rate."""
  a = _arg(arg)
  c = study.tiny_lm_config(os.path.join(a.data, "pretrain.jsonl"), MODEL, 40 if a.quick else 3000, a.quick)
  if a.stage == "pretrain":
    return c
  c = study.sft_config(c)
  steps = QUICK_STEPS if a.quick else STEPS
  c.data.validation_fraction = EVAL_FRACTION
  c.data.overlong = "drop"                # none is: 4 + 12 words and the template, under 32 of the 64 tokens
  c.optimizer.weight_decay = 0.0          # README.md: it would shrink a prompt at its learning rate
  c.optimizer.warmup_steps = steps // 10
  c.train.steps, c.train.eval_every, c.train.checkpoint_every = steps, steps // 4, steps
  for key, value in METHODS[a.method].items():
    config_lib.override(c, key, value)
  return c


def point_name(task: str, method: str, lr: float, seed: int) -> str:
  return f"{task}_{method}_lr{lr:g}_seed{seed}"


def finetune(a, task: str, method: str, lr: float, seed: int) -> dict:
  """The method lives in the point's config (not its keys), so the sweep's own report has only seed and lr
  as numeric axes."""
  return {"name": point_name(task, method, lr, seed), "init_from": "@pretrain", "seed": seed,
          "config": f"{os.path.abspath(__file__)}:quick={a.quick},data={a.data},stage=sft,method={method}",
          "data.sources": data_file(a.data, task), "optimizer.learning_rate": lr}


def get_sweep(arg=None):
  a = _arg(arg)
  # the probe's sweep and the main one share this point: its config names neither
  points = [{"name": "pretrain", "config": f"{os.path.abspath(__file__)}:quick={a.quick},data={a.data}"}]
  for task in (QUICK_TASKS if a.quick else TASKS):
    for m in (QUICK_METHODS if a.quick else METHODS):
      if a.probe:
        points += [finetune(a, task, m, lr, 0) for lr in PROBE_LRS[m]]
      else:
        points += [finetune(a, task, m, LR[m], s) for s in range(QUICK_SEEDS if a.quick else SEEDS)]
  return points
