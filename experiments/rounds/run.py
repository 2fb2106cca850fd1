"""Llama 3.1's iterated post-training at tiny scale, one command: the data, the SFT model and the reward model,
then R rounds per seed of best-of-N sampling -> SFT on the best answers -> DPO on the best/worst pairs (resuming),
then REPORT.md and the plot.

  python experiments/rounds/run.py --workdir runs/rounds [--quick]

The points are sweep.py's get_sweep, in the sweep runner's order (each after the run it starts from); they run
here, in this process, rather than through `jaxllm sweep`: round k's data are the samples of round k-1's model,
which a sweep point cannot make. Before a round's SFT point, jaxllm.rejection_sample samples its policy. Each
point records DIR/<name>/status.json as the runner does, so `python -m jaxllm.sweep report DIR` tabulates them.
"""

import argparse
import json
import os
import re
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repository root: configs/, experiments/

import jax  # noqa: E402
import numpy as np  # noqa: E402

from experiments.dpo_beta import run as dpo_beta_run, sweep as task  # noqa: E402
from experiments.rounds import report, sweep  # noqa: E402
from jaxllm import rejection_sample, train  # noqa: E402
from jaxllm.data import synthetic  # noqa: E402
from jaxllm.errors import Preempted  # noqa: E402
from jaxllm.sweep import points as points_lib, report as sweep_report, runner  # noqa: E402

PROMPT_SEED = 10  # round k's prompts: seed 10 + k (the data files use seeds 1 and 2, the report's prompts 100)
NEW_TOKENS = 2 * task.ANSWER_WORDS + 2  # as the report's: room for a policy that does not stop after 8 words
PROMPT_TOKENS = 16                      # a 4-word prompt in the chat template is about 10 tokens


def prompts_file(data: str, round_: int) -> str:
  return os.path.join(data, "prompts", f"round{round_}.jsonl")


def write_data(workdir: str, quick: bool, rounds: int) -> str:
  """experiments/dpo_beta's files (DIR/data/sft.jsonl: the SFT model's; DIR/data/dpo/pairs.jsonl: the reward
  model's pairs, labelled by the true reward) and each round's fresh prompts, DIR/data/prompts/round<k>.jsonl."""
  data = dpo_beta_run.write_data(workdir, quick)
  lang = synthetic.language(**task.LANGUAGE)
  for k in range(1, rounds + 1):
    if not os.path.exists(path := prompts_file(data, k)):
      rng = np.random.default_rng(PROMPT_SEED + k)
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(path + ".tmp", "w") as f:
        for _ in range(sweep.QUICK_PROMPTS if quick else sweep.PROMPTS):
          f.write(json.dumps({"prompt": " ".join(lang.walk(rng, 0, task.PROMPT_WORDS))}) + "\n")
      os.replace(path + ".tmp", path)
  return data


def sample(workdir: str, data: str, round_: int, seed: int, quick: bool) -> dict:
  """Round k's best-of-N samples of its policy for seed s, scored by the reward model (resumes a partial one)."""
  samples = sweep.QUICK_SAMPLES if quick else sweep.SAMPLES
  args = rejection_sample.parser().parse_args([
      "--policy", os.path.join(workdir, sweep.policy(round_, seed)), "--reward", os.path.join(workdir, "rm"),
      "--prompts", prompts_file(data, round_), "--samples", str(samples),
      "--out", sweep.samples_dir(os.path.join(workdir, "samples"), round_, seed),
      "--temperature", "1.0", "--max-new-tokens", str(NEW_TOKENS), "--max-prompt-tokens", str(PROMPT_TOKENS),
      "--batch-prompts", str(256 // samples), "--shard-prompts", "256", "--seed", str(1000 * seed + round_)])
  return rejection_sample.run(args)


def run_point(point, workdir: str) -> str:
  """Trains one point in this process (resuming its checkpoint), recording its status.json as the runner does."""
  point_dir = os.path.join(workdir, point.name)
  attempts = runner.read_status(point_dir).get("attempts", 0) + 1
  start = time.time()
  runner.write_status(point_dir, status="running", attempts=attempts, started=start, returncode=None, wall_s=0.0,
                      error="")
  try:
    train.run(points_lib.resolved_config(point, lambda name: os.path.join(workdir, name)), point_dir)
  except BaseException as e:  # preempted or interrupted: the rerun resumes it; else it is retried
    stopped = isinstance(e, (Preempted, KeyboardInterrupt))
    runner.write_status(point_dir, status="interrupted" if stopped else "failed", returncode=1, attempts=attempts,
                        wall_s=time.time() - start, error=f"{type(e).__name__}: {e}"[:500])
    raise
  runner.write_status(point_dir, status="done", returncode=0, attempts=attempts, wall_s=time.time() - start,
                      error="")
  return "done"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--quick", action="store_true", help="2 rounds, 1 seed, short runs: a check, not a result")
  parser.add_argument("--rounds", type=int, default=0, help=f"R (default {sweep.ROUNDS}; --quick: "
                      f"{sweep.QUICK_ROUNDS}); a rerun with a larger R continues the same chains")
  args = parser.parse_args(argv)
  start, workdir = time.time(), os.path.abspath(args.workdir)
  os.makedirs(workdir, exist_ok=True)
  if not jax.config.jax_compilation_cache_dir:  # every round compiles the same programs: compile them once
    jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  arg = f"quick={args.quick},rounds={args.rounds}"
  data = write_data(workdir, args.quick, sweep.rounds(arg))
  spec = f"{os.path.join(HERE, 'sweep.py')}:{arg},data={data},samples={os.path.join(workdir, 'samples')}"
  points, axes, short = points_lib.expand(spec, sweep.get_sweep(spec.partition(":")[2]))
  points_lib.validate(points)  # every config checked before anything runs
  with open(os.path.join(workdir, "sweep.json"), "w") as f:  # what `python -m jaxllm.sweep report DIR` reads
    json.dump({"config": spec, "axes": axes, "short": short, "points": [p.to_json() for p in points]}, f, indent=2)
  for point in points:
    if runner.read_status(os.path.join(workdir, point.name))["status"] == "done":
      continue
    if m := re.fullmatch(r"round(\d+)_sft_seed(\d+)", point.name):  # round k's data: its policy's samples
      k, s = int(m.group(1)), int(m.group(2))
      counts = sample(workdir, data, k, s, args.quick)
      print(f"round {k}, seed {s}: sampled {sweep.policy(k, s)}: {json.dumps(counts)}", flush=True)
    print(f"point {point.name}", flush=True)
    run_point(point, workdir)
  sweep_report.write(workdir)
  path, verdict = report.write(workdir, quick=args.quick, runtime_s=time.time() - start)
  print(f"{verdict}\nwrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
