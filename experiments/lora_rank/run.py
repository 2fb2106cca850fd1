"""LoRA rank and targets (Hu et al. 2021, Tables 5-6) at tiny scale, one command: the data, the sweep (resuming),
then REPORT.md and the plots.

  python experiments/lora_rank/run.py --workdir runs/lora_rank [--quick] [--parallel 2]
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repository root: configs/, experiments/

from experiments import study  # noqa: E402
from experiments.lora_rank import report  # noqa: E402
from jaxllm.data import synthetic  # noqa: E402

LANGUAGE = {"seed": 0, "num_words": 32, "branching": 2}  # small enough for the tiny model to learn almost fully
RELABEL_SEED, NEAR_TOPIC = 7, 0


def write_data(workdir: str, quick: bool) -> str:
  """DIR/data/{pretrain,near,far}.jsonl: the four-topic language, one of its topics, and that topic relabelled."""
  data = os.path.join(workdir, "data")
  if not os.path.exists(os.path.join(data, "far.jsonl")):  # written last
    lang = synthetic.language(**LANGUAGE)
    synthetic.write_documents(os.path.join(data, "pretrain.jsonl"), lang, 4000 if quick else 40000, words=24,
                              seed=1)
    synthetic.write_documents(os.path.join(data, "near.jsonl"), lang, 3000, words=24, seed=2, topics=[NEAR_TOPIC])
    synthetic.write_documents(os.path.join(data, "far.jsonl"), lang.relabelled(RELABEL_SEED), 3000, words=24,
                              seed=3, topics=[NEAR_TOPIC])
  return data


if __name__ == "__main__":
  sys.exit(study.main(__doc__.split("\n")[0], os.path.join(HERE, "sweep.py"), report,
                      arg=lambda workdir, quick: f"data={write_data(workdir, quick)}"))
