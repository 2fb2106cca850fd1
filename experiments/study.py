"""What every study's run.py does: parse --workdir/--quick/--parallel, run the study's sweep (resuming), then its
report, and print the verdict line."""

import argparse
import datetime
import os
import platform
import sys
import time

import numpy as np

from jaxllm.sweep import command


def stats(values) -> dict:
  """{"mean", "std" (ddof=1; 0 for one value), "n"} of the finite values (mean NaN when there are none)."""
  v = np.asarray([x for x in values if x is not None and np.isfinite(x)], float)
  return {"mean": float(v.mean()) if len(v) else float("nan"), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
          "n": len(v)}


def noise(a: dict, b: dict) -> float:
  """Twice the standard error of a difference of two means (stats dicts): the band a difference must leave to
  count."""
  return 2.0 * float(np.sqrt(a["std"] ** 2 / max(a["n"], 1) + b["std"] ** 2 / max(b["n"], 1)))


def preamble(study: str, quick: bool, runtime_s: float | None) -> str:
  """The paragraph under a REPORT.md's title: when, where, how long, the command, where the protocol is."""
  runtime = f", {runtime_s / 60:.1f} min for this invocation" if runtime_s else ""
  return (f"{datetime.date.today().isoformat()}, {os.cpu_count()} CPU cores ({platform.machine()}){runtime}"
          f"{' — **--quick: a check of the pipeline, not a result**' if quick else ''}.\n"
          f"`python experiments/{study}/run.py --workdir DIR{' --quick' if quick else ''}`; the protocol is in "
          "README.md beside\nthis file; every number below is computed from the runs in DIR (`results.md` lists "
          "each point).")


def tiny_lm_config(sources: str, model: dict, steps: int, quick: bool):
  """configs/pretrain_tiny.py on a synthetic language (jaxllm/data/synthetic.py) for `steps`, with `model`'s
  shape: the pretraining point of the synthetic-data studies."""
  from configs import pretrain_tiny

  c = pretrain_tiny.get_config()
  c.data.sources = sources
  c.data.validation_fraction = 0.05
  c.data.tokenizer.vocab_size = 512          # the words, their syllables, letters and bytes: every word one token
  for key, value in model.items():
    c.model[key] = value
  c.model.remat_policy = "none"
  c.train.steps, c.train.batch_size, c.train.seq_len = steps, 16, 64
  c.train.log_every = 100
  c.train.eval_every = steps // 3
  c.train.eval_batches = 2 if quick else 8
  c.train.checkpoint_every = steps
  c.train.num_samples = 0
  c.optimizer.warmup_steps = steps // 10
  return c


def sft_config(pretrain):
  """configs/sft.py (masked SFT: its data keys, prompt_loss_weight, overlong) on a pretraining config's model,
  tokenizer, train and optimizer settings: the fine-tuning points of a synthetic-data study set the rest."""
  from configs import sft

  c = sft.get_config().unlock()
  samples = c.train.sample_tokens, c.train.sample_prompts
  for section in ("model", "train", "optimizer"):
    c[section] = pretrain[section]
  c.train.sample_tokens, c.train.sample_prompts = samples
  c.data.tokenizer = pretrain.data.tokenizer
  return c


def save_report(directory: str, text: str) -> str:
  """Writes DIR/REPORT.md; returns its path."""
  path = os.path.join(directory, "REPORT.md")
  with open(path, "w") as f:
    f.write(text)
  return path


def main(description: str, sweep_file: str, report, argv=None, arg: str = "") -> int:
  """`report.write(workdir, quick=, runtime_s=) -> (path, verdict line)`; `arg` is passed to the sweep file
  after quick=... (e.g. a shared tokenizer's path, given a workdir: a function of it)."""
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--quick", action="store_true", help="a few small points, 1 seed: a check, not a result")
  parser.add_argument("--parallel", type=int, default=2, help="points run at a time")
  args = parser.parse_args(argv)
  start, workdir = time.time(), os.path.abspath(args.workdir)
  os.makedirs(workdir, exist_ok=True)
  extra = arg(workdir, args.quick) if callable(arg) else arg
  spec = f"{sweep_file}:quick={args.quick}" + (f",{extra}" if extra else "")
  statuses = command.run(spec, workdir, parallel=args.parallel)
  failed = [name for name, status in statuses.items() if status != "done"]
  if failed:
    print(f"not done: {failed}; see {workdir}/<point>/train.log, then rerun to resume", file=sys.stderr)
    return 1
  path, verdict = report.write(workdir, quick=args.quick, runtime_s=time.time() - start)
  print(f"{verdict}\nwrote {path}")
  return 0
