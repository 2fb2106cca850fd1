"""DPO's reward-KL frontier against β (Rafailov et al. 2023, Fig. 2 left) at tiny scale, one command: the data, the
sweep (resuming), then REPORT.md and the plot.

  python experiments/dpo_beta/run.py --workdir runs/dpo_beta [--quick] [--parallel 2]
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repository root: configs/, experiments/

from experiments import study  # noqa: E402
from experiments.dpo_beta import report, sweep  # noqa: E402
from jaxllm.data import synthetic  # noqa: E402


def write_data(workdir: str, quick: bool) -> str:
  """DIR/data/sft.jsonl (the chain's continuations of prompt walks: π_ref's data), DIR/data/dpo/pairs.jsonl (pairs
  of two continuations of one prompt, the one of higher reward chosen) and DIR/data/preferred/pairs.jsonl (the same
  pairs' chosen answers as SFT pairs)."""
  data = os.path.join(workdir, "data")
  done = os.path.join(data, "written")
  if not os.path.exists(done):
    lang = synthetic.language(**sweep.LANGUAGE)
    positive = synthetic.positive_words(lang, **sweep.POSITIVE)
    n = sweep.QUICK_PAIRS if quick else sweep.PAIRS
    synthetic.write_sft(sweep.sft_file(data), lang, n["sft"], prompt_words=sweep.PROMPT_WORDS,
                        answer_words=sweep.ANSWER_WORDS, seed=1)
    synthetic.write_preferences(sweep.pairs_file(data, "dpo"), lang, n["dpo"], prompt_words=sweep.PROMPT_WORDS,
                                answer_words=sweep.ANSWER_WORDS, seed=2, positive=positive)
    synthetic.write_preferred_sft(sweep.pairs_file(data, "preferred"), sweep.pairs_file(data, "dpo"))
    open(done, "w").close()
  return data


if __name__ == "__main__":
  sys.exit(study.main(__doc__.split("\n")[0], os.path.join(HERE, "sweep.py"), report,
                      arg=lambda workdir, quick: f"data={write_data(workdir, quick)}"))
