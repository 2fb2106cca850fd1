"""The weight of the prompt tokens in SFT (Shi et al. 2024; Huerta-Enochian & Ko 2024) at tiny scale, one command:
the data, the sweep (resuming), then REPORT.md and the plot.

  python experiments/prompt_loss/run.py --workdir runs/prompt_loss [--quick] [--parallel 2]
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repository root: configs/, experiments/

from experiments import study  # noqa: E402
from experiments.prompt_loss import report, sweep  # noqa: E402
from jaxllm.data import synthetic  # noqa: E402

LANGUAGE_SEED, PRETRAIN_TOPICS, TASK_TOPIC = 0, (0, 1, 2, 3), 4


def write_data(workdir: str, quick: bool) -> str:
  """DIR/data/pretrain.jsonl (four topics) and DIR/data/sft_<shape>_<size>.jsonl (the fifth topic; each file
  holds its training pairs and sweep.EVAL_PAIRS held-out ones, which the split separates)."""
  data = os.path.join(workdir, "data")
  done = os.path.join(data, "written")
  if not os.path.exists(done):
    lang = synthetic.language(LANGUAGE_SEED, topics=5)
    synthetic.write_documents(os.path.join(data, "pretrain.jsonl"), lang, 2000 if quick else 8000, words=24,
                              seed=1, topics=PRETRAIN_TOPICS)
    for i, (shape, (prompt, answer)) in enumerate(sweep.SHAPES.items()):
      for j, (size, n) in enumerate(sweep.SIZES.items()):
        synthetic.write_sft(sweep.data_file(data, shape, size), lang, n + sweep.EVAL_PAIRS, prompt_words=prompt,
                            answer_words=answer, seed=10 + 2 * i + j, topics=[TASK_TOPIC])
    open(done, "w").close()
  return data


if __name__ == "__main__":
  sys.exit(study.main(__doc__.split("\n")[0], os.path.join(HERE, "sweep.py"), report,
                      arg=lambda workdir, quick: f"data={write_data(workdir, quick)}"))
