"""The runs of experiments/rounds: Llama 3.1's post-training loop at tiny scale on the synthetic task of
experiments/dpo_beta (a one-topic Markov language; the true reward is the share of "positive" words). An SFT
model from scratch (dpo_beta's π_ref, the same config and data), a reward model from it on pairs labelled by the
true reward, then R rounds per seed of: best-of-N samples of the last round's policy scored by the reward model
(run.py, jaxllm.rejection_sample) -> SFT on the best answers -> DPO on the best/worst pairs.

  python experiments/rounds/run.py --workdir runs/rounds [--quick]

get_sweep(arg) lists the runs as sweep points chained by init_from ("@round1_dpo_seed0"), in the order the sweep
runner gives them; a round's points also read the samples of the policy before them, which the runner cannot
make, so run.py runs the points itself, sampling before each round (see README.md).

arg: quick (fewer, shorter runs: what the tests run), rounds (get_sweep: R; 0 = ROUNDS, or QUICK_ROUNDS), data
(DIR/data: run.py writes it), samples (DIR/samples: the rejection-sampling outputs, one directory per round and
seed) and stage (get_config: sft | reward | best: SFT on the best answers | dpo).
"""

import os

from configs import dpo as dpo_config, reward as reward_config
from experiments.dpo_beta import sweep as task  # the synthetic task, shared with the DPO study
from jaxllm.config import parse_arg
from jaxllm.errors import ConfigError

ROUNDS, QUICK_ROUNDS = 3, 2
SEEDS, QUICK_SEEDS = 3, 1          # each seed its own chain of rounds from the one SFT model and reward model
PROMPTS, QUICK_PROMPTS = 512, 128   # fresh prompts per round (the same for every seed)
SAMPLES, QUICK_SAMPLES = 8, 4       # N of best-of-N
REWARD_STEPS, QUICK_REWARD_STEPS = 200, 60
ROUND_STEPS, QUICK_ROUND_STEPS = 64, 24  # each of a round's SFT and DPO: 2 epochs of its best answers / pairs
BETA, NLL = 0.1, 0.2                # Llama 3's DPO: β, and an NLL term on the chosen answers of weight 0.2
STAGES = ("sft", "reward", "best", "dpo")


def _arg(arg):
  return parse_arg(arg, quick=False, rounds=0, data="", samples="", stage="sft")


def rounds(arg) -> int:
  a = _arg(arg)
  return a.rounds or (QUICK_ROUNDS if a.quick else ROUNDS)


def samples_dir(samples: str, round_: int, seed: int) -> str:
  """The rejection-sampling output of round k, seed s: best.jsonl (SFT) and pairs.jsonl (DPO) once complete."""
  return os.path.join(samples, f"round{round_}_seed{seed}")


def policy(round_: int, seed: int) -> str:
  """The point whose model round k's samples come from: the SFT model, then each round's DPO model."""
  return "sft" if round_ == 1 else f"round{round_ - 1}_dpo_seed{seed}"


def get_config(arg=None):
  """stage=sft: experiments/dpo_beta's π_ref (masked SFT from scratch on the chain's continuations); stage=reward:
  configs/reward.py on dpo_beta's preference pairs; stage=best / dpo: a round's SFT on the best answers and its
  DPO on the best/worst pairs (full fine-tuning: KL is measured against the SFT model itself). The points set
  init_from and, for a round, data.sources."""
  a = _arg(arg)
  if a.stage not in STAGES:
    raise ConfigError(f"config arg stage={a.stage!r}: one of {', '.join(STAGES)}")
  if a.stage == "sft":
    c = task.get_config(f"quick={a.quick},data={a.data},stage=sft").unlock()
  else:
    if a.stage in ("reward", "dpo"):
      c = (reward_config if a.stage == "reward" else dpo_config).get_config("lora=False").unlock()
    else:  # configs/sft.py's keys, as dpo_beta's SFT on the preferred answers
      c = task.get_config(f"quick={a.quick},data={a.data},stage=preferred").unlock()
    c.data.validation_fraction = 0.05
    c.data.overlong = "drop"                   # none is: 4 + 8 words (a policy's answer: at most 18 tokens)
    c.data.tokenizer.vocab_size = 448
    for key, value in task.MODEL.items():
      c.model[key] = value
    c.model.remat_policy = "none"
    c.train.batch_size, c.train.seq_len = 16, 32
    c.train.num_samples = 0
    if a.stage == "reward":
      c.data.sources = task.pairs_file(a.data, "dpo")
      c.train.steps = QUICK_REWARD_STEPS if a.quick else REWARD_STEPS
      c.optimizer.learning_rate = 1e-3         # bench/RESULTS.md: 0.98 held-out accuracy after 200 steps
    else:
      c.data.sources = ""                      # the point's samples: best.jsonl or pairs.jsonl
      c.data.validation_fraction = 0.2 if a.quick else 0.05  # at least a batch of 16 held out
      c.data.on_bad_record = "skip"            # an empty sampled answer (<|end|> first) is no example: skipped,
      c.data.max_bad_fraction = 0.25           # counted (data/bad_empty); a policy writes a few
      c.train.steps = QUICK_ROUND_STEPS if a.quick else ROUND_STEPS
      c.optimizer.learning_rate = 1e-3 if a.stage == "best" else 3e-4  # dpo_beta's baseline's and DPO's
      if a.stage == "dpo":
        c.dpo.beta, c.dpo.rpo_alpha = BETA, NLL
  c.train.eval_every = c.train.steps if a.quick or a.stage in ("best", "dpo") else max(c.train.steps // 4, 1)
  c.train.eval_batches = 2 if a.quick else 8
  if a.quick and a.stage in ("best", "dpo"):
    c.train.eval_batches = 0                   # the report measures the policies; a compile less per run
  c.train.checkpoint_every = c.train.steps     # only the end: the next round starts from it
  c.train.keep_checkpoints = 1
  c.optimizer.warmup_steps = c.train.steps // 10
  return c


def get_sweep(arg=None):
  a = _arg(arg)
  config = lambda stage: f"{os.path.abspath(__file__)}:quick={a.quick},data={a.data},stage={stage}"
  points = [{"name": "sft", "config": config("sft")},  # rm before the rounds: every round's sampling reads it
            {"name": "rm", "config": config("reward"), "init_from": "@sft"}]
  for k in range(1, rounds(arg) + 1):
    for s in range(QUICK_SEEDS if a.quick else SEEDS):
      samples = samples_dir(a.samples, k, s)
      points += [{"name": f"round{k}_sft_seed{s}", "config": config("best"), "init_from": f"@{policy(k, s)}",
                  "seed": s, "data.sources": os.path.join(samples, "best.jsonl")},
                 {"name": f"round{k}_dpo_seed{s}", "config": config("dpo"), "init_from": f"@round{k}_sft_seed{s}",
                  "seed": s, "data.sources": os.path.join(samples, "pairs.jsonl")}]
  return points
