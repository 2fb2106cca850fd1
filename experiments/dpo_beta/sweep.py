"""The sweep of experiments/dpo_beta: a tiny model SFT-trained from scratch on the continuations of a one-topic
Markov language (jaxllm/data/synthetic.py): the reference π_ref. From it, full fine-tuning (no LoRA: KL is
measured against the SFT model itself) on preference pairs labelled by a programmatic reward (the share of
"positive" words): sigmoid DPO at β ∈ {0.05, 0.1, 0.5, 1, 5}, IPO, cDPO and SimPO beside it, and the baseline of
SFT on the preferred answers at two lengths of training, 3 seeds each.

  python experiments/dpo_beta/run.py --workdir runs/dpo_beta [--quick]

arg: quick (fewer, shorter points: what the tests run), data (the directory of the JSONL files run.py writes) and
stage (sft: the reference, from scratch | dpo: the preference points | preferred: SFT on the chosen answers).
"""

import os

from configs import dpo as dpo_config, sft as sft_config
from jaxllm.config import parse_arg

LANGUAGE = {"seed": 0, "num_words": 32, "topics": 1, "branching": 4}  # one chain: π_ref has one thing to learn
POSITIVE = {"n": 8, "seed": 1}     # the reward's "positive" words: 8 of the 32 (a continuation's mean share: 0.18)
PROMPT_WORDS, ANSWER_WORDS = 4, 8  # a prompt walk, then the 8 words that continue it
PAIRS = {"sft": 8000, "dpo": 4000}  # continuations for π_ref; preference pairs (shared by DPO and the baseline)
QUICK_PAIRS = {"sft": 2000, "dpo": 1000}
MODEL = {"d_model": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "head_dim": 16, "mlp_dim": 192}

BETAS, QUICK_BETAS = (0.05, 0.1, 0.5, 1.0, 5.0), (0.1, 1.0)
OTHERS = {  # the DPO family beside it, each at a usual setting
    "ipo": {"dpo.kind": "ipo", "dpo.beta": 0.1},                               # target margin 1/(2β) = 5 nats
    "cdpo": {"dpo.kind": "sigmoid", "dpo.beta": 0.1, "dpo.label_smoothing": 0.1},  # 10% of labels assumed flipped
    "simpo": {"dpo.kind": "simpo", "dpo.beta": 2.0, "dpo.gamma": 1.0},          # no reference; Meng et al.'s β, γ/β
}
PREFERRED_STEPS, QUICK_PREFERRED_STEPS = (100, 400), (20,)  # the baseline: SFT on the chosen answers, short and long
DPO_STEPS, QUICK_DPO_STEPS = 300, 20
CHECKPOINTS = 4  # kept per run, at 1/4, 1/2, 3/4 and the end of training: the report evaluates each (as the paper)


def _arg(arg):
  return parse_arg(arg, quick=False, data="", stage="sft")


def sft_file(data: str) -> str:
  return os.path.join(data, "sft.jsonl")


def pairs_file(data: str, kind: str) -> str:
  """data/{dpo,preferred}/pairs.jsonl: one file name, so the split (crc32 of "file name:line") holds out the same
  pairs for DPO and for SFT on the preferred answers."""
  return os.path.join(data, kind, "pairs.jsonl")


def get_config(arg=None):
  """stage=sft: masked SFT from scratch on the chain's continuations (the reference); stage=dpo: configs/dpo.py with
  full fine-tuning; stage=preferred: configs/sft.py's keys on the chosen answers. The points set init_from."""
  a = _arg(arg)
  if a.stage == "dpo":
    c = dpo_config.get_config("lora=False").unlock()
    c.data.sources = pairs_file(a.data, "dpo")
  else:
    c = sft_config.get_config().unlock()
    c.data.sources = sft_file(a.data) if a.stage == "sft" else pairs_file(a.data, "preferred")
  c.data.validation_fraction = 0.05
  c.data.overlong = "drop"                     # none is: 4 + 8 words, the markers, well under seq_len
  c.data.tokenizer.vocab_size = 448            # the words in both forms (first, after a space), syllables, bytes
  for key, value in MODEL.items():
    c.model[key] = value
  c.model.remat_policy = "none"
  c.train.batch_size, c.train.seq_len = 16, 32
  if a.stage == "sft":
    c.train.steps = 150 if a.quick else 2000
    c.optimizer.learning_rate = 3e-3             # from scratch: pretraining's rate
  elif a.stage == "dpo":
    c.train.steps = QUICK_DPO_STEPS if a.quick else DPO_STEPS  # 300: 1.3 epochs of the pairs
    c.optimizer.learning_rate = 3e-4             # a third of configs/dpo.py's: at 1e-3, β = 0.1 degenerates
  else:
    c.train.steps = max(QUICK_PREFERRED_STEPS if a.quick else PREFERRED_STEPS)  # the points set their own
    c.optimizer.learning_rate = 1e-3
  c.train.log_every = 50
  c.train.eval_every = max(c.train.steps // 4, 1)
  c.train.eval_batches = 2 if a.quick else 8
  c.train.checkpoint_every = max(c.train.steps // CHECKPOINTS, 1)
  c.train.keep_checkpoints = CHECKPOINTS
  c.train.num_samples = 0                      # the report samples the policies itself
  c.optimizer.warmup_steps = c.train.steps // 10
  return c


def _point(a, name: str, stage: str, **overrides) -> dict:
  steps = overrides.get("train.steps")
  timing = {"train.eval_every": max(steps // 4, 1), "train.checkpoint_every": max(steps // CHECKPOINTS, 1),
            "optimizer.warmup_steps": steps // 10} if steps else {}
  return {"name": name, "config": f"{os.path.abspath(__file__)}:quick={a.quick},data={a.data},stage={stage}",
          "init_from": "@sft", **overrides, **timing}


def get_sweep(arg=None):
  a = _arg(arg)
  seeds = range(1 if a.quick else 3)
  points = [{"name": "sft", "config": f"{os.path.abspath(__file__)}:quick={a.quick},data={a.data},stage=sft"}]
  for beta in (QUICK_BETAS if a.quick else BETAS):
    points += [_point(a, f"dpo_beta{beta:g}_seed{s}", "dpo", seed=s, **{"dpo.kind": "sigmoid", "dpo.beta": beta})
               for s in seeds]
  for kind, overrides in ({} if a.quick else OTHERS).items():
    points += [_point(a, f"{kind}_seed{s}", "dpo", seed=s, **overrides) for s in seeds]
  for steps in (QUICK_PREFERRED_STEPS if a.quick else PREFERRED_STEPS):
    points += [_point(a, f"preferred_steps{steps}_seed{s}", "preferred", seed=s, **{"train.steps": steps})
               for s in seeds]
  return points
