"""Parameter-efficient fine-tuning methods against full fine-tuning (Lester et al. 2021, Fig. 1; Liu et al. 2022,
Tables 1-2) at tiny scale, one command: the data, the sweep (resuming), then REPORT.md and the plot.

  python experiments/peft_methods/run.py --workdir runs/peft_methods [--quick] [--parallel 2]
  python experiments/peft_methods/run.py --workdir runs/peft_methods --probe   # the learning-rate probe, first

--probe runs the learning-rate probe instead (sweep.PROBE_LRS, seed 0, in the same DIR: the main run then reuses
its pretraining and its points at sweep.LR); REPORT.md shows the probe wherever its runs are in DIR.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repository root: configs/, experiments/

from experiments import study  # noqa: E402
from experiments.lora_rank import run as lora_rank  # noqa: E402
from experiments.peft_methods import report, sweep  # noqa: E402
from jaxllm.data import synthetic  # noqa: E402


def write_data(workdir: str, quick: bool) -> str:
  """DIR/data/pretrain.jsonl (lora_rank's: the four-topic language) and DIR/data/sft_{near,far}.jsonl:
  prompt/answer walks of its topic 0, and of that topic with the vocabulary relabelled."""
  data = os.path.join(workdir, "data")
  if not os.path.exists(sweep.data_file(data, "far")):  # written last
    lang = synthetic.language(**lora_rank.LANGUAGE)
    synthetic.write_documents(os.path.join(data, "pretrain.jsonl"), lang, 4000 if quick else 40000, words=24,
                              seed=1)
    for task, language, seed in (("near", lang, 2), ("far", lang.relabelled(lora_rank.RELABEL_SEED), 3)):
      synthetic.write_sft(sweep.data_file(data, task), language, sweep.QUICK_PAIRS if quick else sweep.PAIRS,
                          prompt_words=sweep.PROMPT_WORDS, answer_words=sweep.ANSWER_WORDS, seed=seed,
                          topics=[lora_rank.NEAR_TOPIC])
  return data


def share_across_points(workdir: str):
  """The points of one DIR share one measured peak FLOP/s and one compilation cache (a method's seeds compile the
  same programs): the same numbers, sooner. An outer setting (the tests') wins."""
  os.environ.setdefault("JAXLLM_PEAK_FLOPS_CACHE", os.path.join(workdir, "peak_flops.json"))
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(workdir, "jax_cache"))


def prepare(workdir: str, quick: bool, probe: bool) -> str:
  """The sweep file's arg, once the data is written and the cache shared."""
  share_across_points(workdir)
  return f"data={write_data(workdir, quick)},probe={probe}"


if __name__ == "__main__":
  probe = "--probe" in sys.argv
  sys.exit(study.main(__doc__.split("\n")[0], os.path.join(HERE, "sweep.py"), report,
                      argv=[a for a in sys.argv[1:] if a != "--probe"],
                      arg=lambda workdir, quick: prepare(workdir, quick, probe)))
