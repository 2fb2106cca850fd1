"""Scaling and schedules at tiny scale, one command: the sweep (resuming), then REPORT.md and the plots.

  python experiments/schedules_scaling/run.py --workdir runs/schedules_scaling [--quick] [--parallel 2]
"""

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repository root: configs/, experiments/

from experiments.schedules_scaling import report  # noqa: E402
from jaxllm.data import sources  # noqa: E402
from jaxllm.data.tokenizer import train_tokenizer  # noqa: E402
from jaxllm.sweep import command  # noqa: E402


def shared_tokenizer(workdir: str, quick: bool) -> str:
  """One sentencepiece model on the corpus's training split for every point (as a run would train its own)."""
  path = os.path.join(workdir, "tokenizer.model")
  if not os.path.exists(path):
    docs = sources.documents("stdlib", "train", validation_fraction=0.02)
    tok = train_tokenizer((docs[i] for i in range(len(docs))), vocab_size=512 if quick else 2048,
                          max_sentences=20_000 if quick else 200_000)
    tok.save(path)
  return path


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--quick", action="store_true", help="1 seed, 3 sizes, 40 steps: a check, not a result")
  parser.add_argument("--parallel", type=int, default=2)
  args = parser.parse_args(argv)
  start = time.time()
  workdir = os.path.abspath(args.workdir)
  os.makedirs(workdir, exist_ok=True)
  tokenizer = shared_tokenizer(workdir, args.quick)
  spec = f"{os.path.join(HERE, 'sweep.py')}:quick={args.quick},tokenizer={tokenizer}"
  statuses = command.run(spec, workdir, parallel=args.parallel)
  failed = [name for name, status in statuses.items() if status != "done"]
  if failed:
    print(f"not done: {failed}; see {workdir}/<point>/train.log, then rerun to resume", file=sys.stderr)
    return 1
  path, verdict = report.write(workdir, quick=args.quick, runtime_s=time.time() - start)
  print(f"{verdict}\nwrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
