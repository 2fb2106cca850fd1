"""REPORT.md and plot of experiments/pipeline from its sweep directory. Each stage's effect on held-out data
(pretraining: validation loss; SFT: held-out answer loss; DPO: held-out preference accuracy and margin), and what
DPO does to the SFT model: the held-out answer loss of each DPO run, measured on the SFT run's own validation
split, and the share of degenerate greedy answers to held-out questions.

  python experiments/pipeline/report.py DIR [--quick]     # (run.py calls it after the sweep)
"""

import collections
import datetime
import os
import platform
import sys

import jax
import ml_collections
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from experiments import study  # noqa: E402
from experiments.pipeline import sweep  # noqa: E402
from jaxllm import generate, runs, tasks  # noqa: E402
from jaxllm.data import chat  # noqa: E402
from jaxllm.metrics import read_metrics  # noqa: E402
from jaxllm.tasks.lm import next_token_loss_fn  # noqa: E402

MAX_DAMAGE = 0.10       # DPO may raise the held-out answer loss by at most 10% ...
MAX_EXTRA_DEGENERATE = 0.05  # ... and the share of degenerate answers by at most 5 points over SFT's
NUM_PROMPTS, NEW_TOKENS = 24, 48


def first_and_last(workdir: str, key: str) -> tuple[float, float]:
  values = [(r["step"], r[key]) for r in read_metrics(workdir) if key in r]
  return values[0][1], values[-1][1]


class HeldOut:
  """The SFT run's validation conversations: its eval batches (answer tokens only) and held-out questions."""

  def __init__(self, sft_dir: str):
    config = ml_collections.ConfigDict(runs.read_config(sft_dir))
    task = tasks.make(config)
    _, val, _ = task.sources()
    self.tokenizer = runs.load_run(sft_dir)[2]
    self.batches = task.eval_batches(val, self.tokenizer)
    firsts = [val[i][0]["content"] for i in range(len(val))]
    english = [q for q in firsts if q.isascii()]  # readable in the report; the others where there are too few
    self.questions = (english + [q for q in firsts if not q.isascii()])[:NUM_PROMPTS]
    self.stops = (self.tokenizer.eos_id, self.tokenizer.token_id(chat.DEFAULT_TEMPLATE.end))
    self._loss = None

  def answer_loss(self, cfg, params) -> float:
    self._loss = self._loss or jax.jit(next_token_loss_fn(cfg))
    sums = [jax.device_get(self._loss(params, b)) for b in self.batches]
    return float(sum(s for s, _ in sums) / sum(w for _, (w, _) in sums))

  def answers(self, cfg, params) -> list[list[int]]:
    prompts = [chat.render_prompt([{"role": "user", "content": q}], self.tokenizer) for q in self.questions]
    outs = generate.generate(cfg, params, prompts, max_new_tokens=NEW_TOKENS, rng=jax.random.key(0),
                             temperature=0.0, stop_ids=self.stops, vocab_limit=self.tokenizer.vocab_size)
    return [[t for t in out if t not in self.stops] for out in outs]


def degenerate(ids: list[int]) -> bool:
  """A token 3-gram that occurs 3 or more times: the loops ("estostostosto") a drifting policy falls into."""
  grams = collections.Counter(tuple(ids[i:i + 3]) for i in range(len(ids) - 2))
  return bool(grams) and max(grams.values()) >= 3


def _stats(values) -> tuple[float, float]:
  v = np.asarray(values, float)
  return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def analyse(directory: str) -> dict:
  held = HeldOut(os.path.join(directory, "sft"))
  out = {"pretrain": first_and_last(os.path.join(directory, "pretrain"), "eval/loss"),
         "sft_metrics": first_and_last(os.path.join(directory, "sft"), "eval/loss")}
  cfg, params, _ = runs.load_run(os.path.join(directory, "sft"))
  sft_answers = held.answers(cfg, params)
  out["sft"] = {"answer_loss": held.answer_loss(cfg, params), "degenerate": np.mean([degenerate(a) for a in sft_answers]),
                "examples": [held.tokenizer.decode(a) for a in sft_answers[:3]]}
  out["questions"] = held.questions[:3]
  variants = {}
  for variant in sweep.VARIANTS:
    names = sorted(n for n in os.listdir(directory) if n.startswith(f"{variant}_seed"))
    if not names:
      continue
    rows = collections.defaultdict(list)
    for name in names:
      run_dir = os.path.join(directory, name)
      cfg, params, _ = runs.load_run(run_dir)
      answers = held.answers(cfg, params)
      rows["answer_loss"].append(held.answer_loss(cfg, params))
      rows["degenerate"].append(np.mean([degenerate(a) for a in answers]))
      rows["accuracy"].append(first_and_last(run_dir, "eval/rewards/accuracy")[1])
      rows["margin"].append(first_and_last(run_dir, "eval/rewards/margin")[1])
      rows["examples"] = rows["examples"] or [held.tokenizer.decode(a) for a in answers[:3]]
    v = {k: _stats(rows[k]) for k in ("answer_loss", "degenerate", "accuracy", "margin")}
    v["n"], v["examples"] = len(names), rows["examples"]
    v["damage"] = v["answer_loss"][0] / out["sft"]["answer_loss"] - 1
    v["ok"] = v["damage"] <= MAX_DAMAGE and v["degenerate"][0] <= out["sft"]["degenerate"] + MAX_EXTRA_DEGENERATE
    variants[variant] = v
  out["variants"] = variants
  return out


def verdict(result: dict) -> str:
  (pt0, pt1), (sft0, sft1) = result["pretrain"], result["sft_metrics"]
  plain = result["variants"]["dpo"]
  stages = pt1 < pt0 and sft1 < sft0 and plain["accuracy"][0] > 0.5
  fine = [k for k, v in result["variants"].items() if v["ok"] and v["accuracy"][0] > 0.5]
  best = max(fine, key=lambda k: result["variants"][k]["accuracy"][0]) if fine else None
  outcome = "reproduced" if stages and best else "partly" if stages else "not reproduced"
  def describe(k):
    v = result["variants"][k]
    return (f"{k}: accuracy {v['accuracy'][0]:.2f}, answer loss {v['damage']:+.0%}, "
            f"{v['degenerate'][0]:.0%} degenerate")
  return (f"Verdict: {outcome} — pretraining validation loss {pt0:.2f} -> {pt1:.2f}; SFT held-out answer loss "
          f"{sft0:.2f} -> {sft1:.2f} ({result['sft']['degenerate']:.0%} degenerate answers); {describe('dpo')}"
          + (f"; best that keeps the SFT model (within {MAX_DAMAGE:.0%}): {describe(best)}" if best else
             f"; no DPO variant keeps the answer loss within {MAX_DAMAGE:.0%} and the answers as clean as SFT's"))


def plot(directory: str, result: dict) -> str:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  names = list(result["variants"])
  fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
  sft = result["sft"]["answer_loss"]
  losses = [result["variants"][k]["answer_loss"] for k in names]
  left.bar(["SFT"] + names, [sft] + [m for m, _ in losses], yerr=[0] + [s for _, s in losses], capsize=3,
           color=["tab:gray"] + ["tab:green" if result["variants"][k]["ok"] else "tab:red" for k in names])
  shares = [result["sft"]["degenerate"]] + [result["variants"][k]["degenerate"][0] for k in names]
  for i, (share, height) in enumerate(zip(shares, [sft] + [m for m, _ in losses])):
    left.text(i, height / 2, f"{share:.0%}\ndegenerate", ha="center", color="white", fontsize=8)
  left.axhline(sft * (1 + MAX_DAMAGE), ls="--", color="k", lw=1, label=f"SFT + {MAX_DAMAGE:.0%}")
  left.set_ylabel("held-out answer loss (nats/token)")
  left.set_title("what DPO does to the SFT model (green: keeps it)")
  left.legend(fontsize=8)
  accuracy = [result["variants"][k]["accuracy"] for k in names]
  right.bar(names, [m for m, _ in accuracy], yerr=[s for _, s in accuracy], capsize=3, color="tab:blue")
  right.axhline(0.5, ls="--", color="k", lw=1, label="chance")
  right.set_ylim(0, 1)
  right.set_ylabel("held-out preference accuracy")
  right.set_title("what DPO learns")
  right.legend(fontsize=8)
  for ax in (left, right):
    ax.grid(alpha=0.3, axis="y")
  fig.tight_layout()
  path = os.path.join(directory, "pipeline.png")
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def write(directory: str, quick: bool = False, runtime_s: float | None = None) -> tuple[str, str]:
  """Writes DIR/REPORT.md and DIR/pipeline.png; returns (the report's path, the verdict line)."""
  result = analyse(directory)
  line = verdict(result)
  plot(directory, result)
  rows = "\n".join(
      f"| {k} | {v['n']} | {v['accuracy'][0]:.3f} ± {v['accuracy'][1]:.3f} | {v['margin'][0]:.3f} ± "
      f"{v['margin'][1]:.3f} | {v['answer_loss'][0]:.3f} ± {v['answer_loss'][1]:.3f} ({v['damage']:+.1%}) | "
      f"{v['degenerate'][0]:.0%} | {'yes' if v['ok'] else 'no'} |" for k, v in result["variants"].items())
  cell = lambda text: " ".join(text.replace("|", "/").split())[:70] or "(empty)"
  examples = "\n".join(
      "| " + " | ".join(cell(t) for t in [q, result["sft"]["examples"][i]]
                        + [v["examples"][i] for v in result["variants"].values()]) + " |"
      for i, q in enumerate(result["questions"]))
  (pt0, pt1), (sft0, sft1) = result["pretrain"], result["sft_metrics"]
  runtime = f", {runtime_s / 60:.1f} min for this invocation" if runtime_s else ""
  text = f"""# The tiny pipeline, stage by stage: report

{datetime.date.today().isoformat()}, {os.cpu_count()} CPU cores ({platform.machine()}){runtime}{" — **--quick: a check of the pipeline, not a result**" if quick else ""}.
`python experiments/pipeline/run.py --workdir DIR{" --quick" if quick else ""}`; the protocol is in README.md beside this file.

{line}

## Each stage on held-out data

| stage | held-out metric | before | after |
| --- | --- | ---: | ---: |
| pretrain | validation loss (nats/token) | {pt0:.3f} | {pt1:.3f} |
| SFT | held-out answer loss | {sft0:.3f} | {sft1:.3f} |

## The DPO stage against the SFT model (mean ± std over seeds)

SFT model: held-out answer loss {result['sft']['answer_loss']:.3f}, {result['sft']['degenerate']:.0%} degenerate greedy answers
to {len(result['questions']) and NUM_PROMPTS} held-out questions (a token 3-gram repeated 3+ times).

| DPO variant | seeds | held-out accuracy | held-out margin | answer loss (vs SFT) | degenerate | keeps SFT |
| --- | ---: | ---: | ---: | ---: | ---: | --- |
{rows}

"keeps SFT": answer loss within {MAX_DAMAGE:.0%} of the SFT model's and at most {MAX_EXTRA_DEGENERATE:.0%} more
degenerate answers. ![pipeline](pipeline.png)

## Greedy answers to held-out questions (first seed)

| question | SFT | {" | ".join(result["variants"])} |
| --- | --- | {" | ".join("---" for _ in result["variants"])} |
{examples}
"""
  return study.save_report(directory, text), line


if __name__ == "__main__":
  print(write(sys.argv[1], quick="--quick" in sys.argv)[1])
