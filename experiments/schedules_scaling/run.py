"""Scaling and schedules at tiny scale, one command: the sweep (resuming), then REPORT.md and the plots.

  python experiments/schedules_scaling/run.py --workdir runs/schedules_scaling [--quick] [--parallel 2]
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repository root: configs/, experiments/

from experiments import study  # noqa: E402
from experiments.schedules_scaling import report  # noqa: E402
from jaxllm.data import sources  # noqa: E402
from jaxllm.data.tokenizer import train_tokenizer  # noqa: E402


def shared_tokenizer(workdir: str, quick: bool) -> str:
  """One sentencepiece model on the corpus's training split for every point (as a run would train its own)."""
  path = os.path.join(workdir, "tokenizer.model")
  if not os.path.exists(path):
    docs = sources.documents("stdlib", "train", validation_fraction=0.02)
    tok = train_tokenizer((docs[i] for i in range(len(docs))), vocab_size=512 if quick else 2048,
                          max_sentences=20_000 if quick else 200_000)
    tok.save(path)
  return path


if __name__ == "__main__":
  sys.exit(study.main(__doc__.split("\n")[0], os.path.join(HERE, "sweep.py"), report,
                      arg=lambda workdir, quick: f"tokenizer={shared_tokenizer(workdir, quick)}"))
