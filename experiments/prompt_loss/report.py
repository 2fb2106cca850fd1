"""REPORT.md and the plot of experiments/prompt_loss from its sweep directory; the verdict is computed here, from
the final held-out answer loss of each point (mean and std over seeds; the held-out loss is on answer tokens
only, whatever the training weight of the prompt):

  - short answers, small training set: the best small non-zero weight (0.01 or 0.1) beats weight 0 by more than
    the noise (twice the standard error of the difference);
  - long answers, small training set: that gain vanishes: within the noise, or under a quarter of the gain with
    short answers.

  python experiments/prompt_loss/report.py DIR     # (run.py calls it after the sweep)
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from experiments import study  # noqa: E402
from experiments.prompt_loss import sweep  # noqa: E402
from jaxllm.sweep import report as sweep_report  # noqa: E402

METRIC = "eval/loss/final"
SMALL_WEIGHTS = (0.01, 0.1)  # "a small non-zero weight"
VANISHED = 0.25              # the long-answer gain counts as vanished below this share of the short-answer gain


def analyse(directory: str, quick: bool) -> dict:
  rows = {r["name"]: r for r in sweep_report.collect(directory)}
  weights = sweep.QUICK_WEIGHTS if quick else sweep.WEIGHTS
  cells = {}  # (shape, size) -> {weight: stats}
  for shape in sweep.SHAPES:
    for size in (sweep.QUICK_SIZES if quick else sweep.SIZES):
      cells[(shape, size)] = {
          w: study.stats([rows[n][METRIC] for n in rows if n.startswith(f"{shape}_{size}_w{w:g}_")]) for w in weights}
  return {"cells": cells, "weights": weights, "quick": quick}


def gain(cell: dict) -> tuple[float, float, float]:
  """(weight 0's loss − the best small weight's, the noise of that difference, the best small weight)."""
  small = [w for w in SMALL_WEIGHTS if w in cell] or [w for w in cell if w > 0]
  best = min(small, key=lambda w: cell[w]["mean"])
  return cell[0.0]["mean"] - cell[best]["mean"], study.noise(cell[0.0], cell[best]), best


def findings(result: dict) -> dict:
  short_gain, short_noise, short_w = gain(result["cells"][("short", "small")])
  long_gain, long_noise, long_w = gain(result["cells"][("long", "small")])
  return {"short_gain": short_gain, "short_noise": short_noise, "short_w": short_w, "long_gain": long_gain,
          "long_noise": long_noise, "long_w": long_w, "helps_short": short_gain > short_noise,
          "vanishes_long": long_gain <= long_noise or long_gain < VANISHED * max(short_gain, 0.0)}


def verdict(result: dict) -> str:
  f = findings(result)
  outcome = ("reproduced" if f["helps_short"] and f["vanishes_long"] else
             "partly" if f["helps_short"] or (f["vanishes_long"] and f["long_gain"] < f["short_gain"]) else
             "not reproduced")
  return (f"Verdict: {outcome} — small training set, short answers: weight {f['short_w']:g} lowers the held-out "
          f"answer loss by {f['short_gain']:+.4f} nats against weight 0 ({'beyond' if f['helps_short'] else 'within'}"
          f" the noise ±{f['short_noise']:.4f}); long answers: by {f['long_gain']:+.4f} (weight {f['long_w']:g}; "
          f"{'vanishes' if f['vanishes_long'] else 'does not vanish'}: noise ±{f['long_noise']:.4f}, "
          f"{100 * f['long_gain'] / f['short_gain'] if f['short_gain'] > 0 else float('nan'):.0f}% of the "
          f"short-answer gain, vanished below {100 * VANISHED:.0f}%)")


def plot(directory: str, result: dict) -> str:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for ax, shape in zip(axes, sweep.SHAPES):
    for (s, size), c in result["cells"].items():
      if s != shape:
        continue
      w = sorted(c)
      ax.errorbar(w, [c[x]["mean"] for x in w], yerr=[c[x]["std"] for x in w], fmt="o-", capsize=3,
                  label=f"{size} training set ({sweep.SIZES[size]} pairs)")
    prompt, answer = sweep.SHAPES[shape]
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xlabel("data.prompt_loss_weight")
    ax.set_ylabel("held-out answer loss (mean ± std over seeds)")
    ax.set_title(f"{shape} answers: {prompt}-word prompt, {answer}-word answer", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
  fig.tight_layout()
  path = os.path.join(directory, "prompt_loss.png")
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def write(directory: str, quick: bool = False, runtime_s: float | None = None) -> tuple[str, str]:
  """Writes DIR/REPORT.md and the plot; returns (its path, the verdict line)."""
  result = analyse(directory, quick)
  line = verdict(result)
  plot(directory, result)
  weights = result["weights"]
  body = "\n".join(
      f"| {shape} ({sweep.SHAPES[shape][1]}/{sweep.SHAPES[shape][0]} words) | {size} ({sweep.SIZES[size]}) | "
      + " | ".join(f"{c[w]['mean']:.4f} ± {c[w]['std']:.4f} ({c[w]['n']})" for w in weights) + " |"
      for (shape, size), c in result["cells"].items())
  text = f"""# The prompt-loss weight in SFT at tiny scale: report

{study.preamble("prompt_loss", quick, runtime_s)}

{line}

## Held-out answer loss after SFT (mean ± std (n) over seeds)

| answers (answer/prompt words) | training pairs | {" | ".join(f"w={w:g}" for w in weights)} |
| --- | --- | {" | ".join("---:" for _ in weights)} |
{body}

![prompt_loss](prompt_loss.png)
"""
  return study.save_report(directory, text), line


if __name__ == "__main__":
  print(write(sys.argv[1], quick="--quick" in sys.argv)[1])
