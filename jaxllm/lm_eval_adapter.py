"""lm-evaluation-harness (0.4) on a jaxllm run: the model `jaxllm` answers the harness's three requests with
jaxllm.evaluation.Scorer (full, LoRA merged or imported Hugging Face runs).

  pip install -e ".[eval]"
  python -m jaxllm.lm_eval_adapter --model jaxllm --model_args run=runs/sft_tiny --tasks my_task \
      --include_path my_tasks/ [--batch_size 16] [--model_args run=DIR,step=N,max_length=512]

The harness finds its own models by name and an external one only once its class is registered in the running
process (`--include_path` adds tasks, not models; 0.4 reads no entry points for models): this module registers
`jaxllm` when imported and, run as a script, hands its arguments to lm-eval's command line, which then knows it.
In Python, `import jaxllm.lm_eval_adapter` before `lm_eval.simple_evaluate(model="jaxllm", ...)` does the same.

Generation is greedy whatever the task's generation_kwargs say (do_sample, temperature are ignored); `until`
cuts the text as the harness does, and max_gen_toks is capped at half of max_length (the run's train.seq_len
by default) so that the context keeps the other half.
"""

from __future__ import annotations

import sys

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from jaxllm import evaluation


@register_model("jaxllm")
class JaxllmLM(LM):
  """model_args: run (a run directory), step (default: its newest checkpoint), max_length (tokens per row,
  default: the run's train.seq_len); --batch_size N sets the rows per batch ("auto": 16)."""

  def __init__(self, run: str, step=None, max_length=None, batch_size=16, max_batch_size=None, device=None):
    super().__init__()
    del max_batch_size, device  # JAX places the model on its default device
    rows = 16 if batch_size in (None, "auto") or str(batch_size).startswith("auto") else int(batch_size)
    extra = {"max_length": int(max_length)} if max_length else {}
    self.scorer = evaluation.Scorer.from_run(run, int(step) if step else None, batch_size=rows, **extra)

  def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
    return self.scorer.loglikelihood([tuple(r.args) for r in requests])

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    return self.scorer.loglikelihood_rolling([r.args[0] for r in requests])

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Requests that share `until` and max_gen_toks are generated together; results in request order."""
    groups: dict[tuple, list[int]] = {}
    for k, r in enumerate(requests):
      kwargs = r.args[1] or {}
      until = kwargs.get("until") or ()
      until = (until,) if isinstance(until, str) else tuple(until)
      max_tokens = min(int(kwargs.get("max_gen_toks", evaluation.MAX_TOKENS)), self.scorer.max_length // 2)
      groups.setdefault((until, max_tokens), []).append(k)
    out: list = [None] * len(requests)
    for (until, max_tokens), ks in groups.items():
      texts = self.scorer.generate_until([requests[k].args[0] for k in ks], until, max_tokens)
      for k, text in zip(ks, texts):
        out[k] = text
    return out


def main(argv: list[str] | None = None):
  """lm-eval's command line with `jaxllm` registered (this module's import did it)."""
  from lm_eval.__main__ import cli_evaluate

  saved, sys.argv = sys.argv, ["lm_eval", *(sys.argv[1:] if argv is None else argv)]  # lm-eval parses sys.argv
  try:
    cli_evaluate()
  finally:
    sys.argv = saved


if __name__ == "__main__":
  main()
