"""REPORT.md and the plot of experiments/peft_methods from its run directories; the verdict is computed here, from
the final held-out answer loss of each point (mean and std over seeds), per task, against full fine-tuning:

  - a method's gap is its loss − full fine-tuning's, and its excess the gap over full fine-tuning's loss (loss
    stands in for the papers' error rate: P-tuning v2's "comparable" is about a point of accuracy, prompt tuning
    on the small T5s many points);
  - "close": the gap within the noise (twice the standard error of the difference) or an excess of at most CLOSE;
    "trails by a wide margin": the gap beyond the noise and an excess of at least WIDE;
  - the claim on each task: prompt tuning trails by a wide margin; prefix tuning (the better of direct and MLP,
    as P-tuning v2 picks the reparameterisation per task) and LoRA are close. Reproduced when all six hold (three
    parts x two tasks); not reproduced when prompt tuning trails widely on neither task; partly otherwise.

The learning-rate probe's choice per method is the rate of sweep.PROBE_LRS with the lowest sum over the tasks of
seed 0's final loss; the table says whether sweep.LR is that choice.

  python experiments/peft_methods/report.py DIR     # (run.py calls it after the sweep)
"""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

import numpy as np  # noqa: E402

from experiments import study  # noqa: E402
from experiments.peft_methods import sweep  # noqa: E402
from jaxllm.metrics import read_metrics  # noqa: E402

CLOSE, WIDE = 0.10, 0.25  # excess loss over full fine-tuning's: close at most CLOSE, a wide margin from WIDE
LABELS = {"full": "full FT", "lora": "LoRA r=8", "prompt": "prompt tuning", "prefix": "prefix (direct)",
          "prefix_mlp": "prefix (MLP)"}
VOCAB = 512  # study.tiny_lm_config's tokenizer


def trainable(method: str) -> int:
  """Trainable parameters of `method` on sweep.MODEL (the tiny preset's shape) with a VOCAB-piece tokenizer."""
  m, keys = sweep.MODEL, sweep.METHODS[method]
  d, f, l, e = m["d_model"], m["mlp_dim"], m["num_layers"], m["head_dim"]
  q, kv = m["num_heads"] * e, m["num_kv_heads"] * e
  if method == "full":  # the embedding (the tiny preset ties it to the output), per layer 2 norms, q, k, v, o and
    return VOCAB * d + l * (2 * d + d * (q + 2 * kv) + q * d + 3 * d * f) + d  # gate, up, down; the final norm
  if method == "lora":  # rank·(in + out) per targeted kernel
    return keys["lora.rank"] * l * ((d + q) + 2 * (d + kv) + (q + d) + 2 * (d + f) + (f + d))
  p = keys.get("prompt_tuning.num_tokens") or keys["prefix_tuning.num_tokens"]
  if method == "prompt":  # P virtual-token embeddings
    return p * d
  h = keys.get("prefix_tuning.hidden", 0)
  if not h:  # keys and values [L, P, K, E]
    return 2 * l * p * kv
  return p * d + d * h + h + h * l * 2 * kv + l * 2 * kv  # embedding, Linear(D, H), Linear(H, L·2·K·E)


def _curve(directory: str, name: str) -> dict | None:
  """{step: held-out answer loss} of a finished point, None if it is not done (or not run)."""
  status = os.path.join(directory, name, "status.json")
  if not os.path.exists(status):
    return None
  with open(status) as f:
    if json.load(f).get("status") != "done":
      return None
  return {r["step"]: r["eval/loss"] for r in read_metrics(os.path.join(directory, name)) if "eval/loss" in r}


def analyse(directory: str, quick: bool) -> dict:
  """The main cells (each method at sweep.LR, over seeds), their mean curves, the pretrained model's loss per
  task (step 0 of full fine-tuning) and the probe (seed 0 at each of sweep.PROBE_LRS, where its runs are in DIR).
  Reads the run directories, not DIR/sweep.json: the probe's sweep and the main one share DIR."""
  tasks, seeds = (sweep.QUICK_TASKS, sweep.QUICK_SEEDS) if quick else (sweep.TASKS, sweep.SEEDS)
  methods = sweep.QUICK_METHODS if quick else tuple(sweep.METHODS)
  cells, curves, before, probe = {}, {}, {}, {}
  for task in tasks:
    for m in methods:
      runs = [c for c in (_curve(directory, sweep.point_name(task, m, sweep.LR[m], s)) for s in range(seeds)) if c]
      cells[(task, m)] = study.stats([c[max(c)] for c in runs])
      steps = sorted(set.intersection(*(set(c) for c in runs))) if runs else []
      curves[(task, m)] = {s: float(np.mean([c[s] for c in runs])) for s in steps}
      for lr in sweep.PROBE_LRS[m]:
        c = _curve(directory, sweep.point_name(task, m, lr, 0))
        probe[(task, m, lr)] = c[max(c)] if c else None
    full = _curve(directory, sweep.point_name(task, "full", sweep.LR["full"], 0))
    before[task] = full[min(full)]
  return {"tasks": tasks, "methods": methods, "cells": cells, "curves": curves, "before": before, "probe": probe,
          "quick": quick}


def compare(result: dict, task: str, method: str) -> dict:
  """{"gap", "noise", "excess", "close", "wide"} of `method` against full fine-tuning on `task`."""
  full, m = result["cells"][(task, "full")], result["cells"][(task, method)]
  gap, noise = m["mean"] - full["mean"], study.noise(m, full)
  excess = gap / full["mean"]
  return {"gap": gap, "noise": noise, "excess": excess,
          "close": bool(gap <= noise or excess <= CLOSE), "wide": bool(gap > noise and excess >= WIDE)}


def findings(result: dict) -> dict:
  """Per task: each method's comparison, and the better prefix variant."""
  out = {}
  for task in result["tasks"]:
    f = {m: compare(result, task, m) for m in result["methods"] if m != "full"}
    f["best_prefix"] = min((m for m in ("prefix", "prefix_mlp") if m in f),
                           key=lambda m: result["cells"][(task, m)]["mean"])
    out[task] = f
  return out


def verdict(result: dict) -> str:
  f = findings(result)
  parts = {task: (f[task]["prompt"]["wide"], f[task][f[task]["best_prefix"]]["close"], f[task]["lora"]["close"])
           for task in result["tasks"]}
  outcome = ("reproduced" if all(all(p) for p in parts.values()) else
             "not reproduced" if not any(p[0] for p in parts.values()) else "partly")

  def says(task, m):
    c = f[task][m]
    word = "trails widely" if c["wide"] else "close" if c["close"] else "trails"
    return f"{LABELS[m]} {c['gap']:+.3f} ({100 * c['excess']:+.0f}%, {word})"

  return (f"Verdict: {outcome} — held-out answer loss against full fine-tuning (the excess over its loss): " +
          "; ".join(f"{task}: full {result['cells'][(task, 'full')]['mean']:.3f}, " +
                    ", ".join(says(task, m) for m in ("prompt", f[task]["best_prefix"], "lora"))
                    for task in result["tasks"]) +
          f" (close: within the noise or ≤{100 * CLOSE:.0f}%; widely: beyond it and ≥{100 * WIDE:.0f}%)")


def probe_choice(result: dict, method: str) -> float | None:
  """The learning rate of sweep.PROBE_LRS with the lowest sum over the tasks of seed 0's final loss (None until
  the probe has run them all)."""
  losses = {lr: [result["probe"][(t, method, lr)] for t in result["tasks"]] for lr in sweep.PROBE_LRS[method]}
  if any(v is None for row in losses.values() for v in row):
    return None
  return min(losses, key=lambda lr: sum(losses[lr]))


def plot(directory: str, result: dict) -> str:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import matplotlib.ticker

  methods, tasks = result["methods"], result["tasks"]
  fig, axes = plt.subplots(2, len(tasks), figsize=(5.5 * len(tasks), 7.5), squeeze=False)
  for col, task in enumerate(tasks):
    ax = axes[0, col]
    cells = [result["cells"][(task, m)] for m in methods]
    ax.bar(range(len(methods)), [c["mean"] for c in cells], yerr=[c["std"] for c in cells], capsize=4,
           color=[f"C{i}" for i in range(len(methods))])
    ax.set_xticks(range(len(methods)), [f"{LABELS[m]}\n{trainable(m):,} params" for m in methods], fontsize=7)
    ax.axhline(result["cells"][(task, "full")]["mean"], color="gray", ls="--", lw=1)
    ax.set_ylabel("held-out answer loss (mean ± std over seeds)")
    ax.set_title({"near": "near task: one of the pretraining topics",
                  "far": "far task: that topic, vocabulary relabelled"}[task] +
                 f"; pretrained {result['before'][task]:.2f}", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    ax = axes[1, col]
    for i, m in enumerate(methods):
      curve = result["curves"][(task, m)]
      ax.plot(sorted(curve), [curve[s] for s in sorted(curve)], "o-", color=f"C{i}", ms=3,
              label=f"{LABELS[m]} (lr {sweep.LR[m]:g})")
    ax.set_yscale("log")  # the late gaps, under step 0's loss of the new chat format
    ax.yaxis.set_major_locator(matplotlib.ticker.FixedLocator([0.4, 0.6, 1, 1.5, 2, 3, 5, 8]))
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("held-out answer loss (mean over seeds)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
  fig.tight_layout()
  path = os.path.join(directory, "peft_methods.png")
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def _probe_table(result: dict) -> str:
  """The probe's rows (seed 0's final loss at each learning rate of sweep.PROBE_LRS; each row's best in bold), or
  a line saying how to run it."""
  if not any(v is not None for (_, m, lr), v in result["probe"].items() if lr != sweep.LR[m]):
    return "Not in DIR: `run.py --probe` runs it (before the main run, in the same DIR)."
  rows = []
  for m in result["methods"]:
    choice = probe_choice(result, m)
    said = ("—" if choice is None else f"{choice:g}" + ("" if choice == sweep.LR[m] else
                                                        f" (**not** sweep.LR's {sweep.LR[m]:g})"))
    for task in result["tasks"]:
      losses = {lr: result["probe"][(task, m, lr)] for lr in sweep.PROBE_LRS[m]}
      done = {lr: v for lr, v in losses.items() if v is not None}
      best = min(done, key=done.get) if done else None
      cells = ", ".join(("—" if v is None else f"**{lr:g}: {v:.4f}**" if lr == best else f"{lr:g}: {v:.4f}")
                        for lr, v in losses.items())
      rows.append(f"| {LABELS[m]} | {task} | {cells} | {said} |")
  return ("Seed 0's final held-out answer loss at each learning rate (lr: loss; each row's best in bold) and the "
          "rate with\nthe lowest sum over the tasks, which the runs above use:\n\n"
          "| method | task | learning rate: loss | chosen |\n| --- | --- | --- | ---: |\n" + "\n".join(rows))


def write(directory: str, quick: bool = False, runtime_s: float | None = None) -> tuple[str, str]:
  """Writes DIR/REPORT.md and the plot; returns (its path, the verdict line)."""
  result = analyse(directory, quick)
  line = verdict(result)
  plot(directory, result)
  f, tasks = findings(result), result["tasks"]
  rows = []
  for m in result["methods"]:
    row = f"| {LABELS[m]} | {sweep.LR[m]:g} | {trainable(m):,} |"
    for task in tasks:
      c, cmp = result["cells"][(task, m)], f[task].get(m)
      rel = f" {cmp['gap']:+.4f} ± {cmp['noise']:.4f} | {100 * cmp['excess']:+.0f}%" if cmp else " — | —"
      row += f" {c['mean']:.4f} ± {c['std']:.4f} ({c['n']}) |{rel} |"
    rows.append(row)
  before = " and ".join(f"{result['before'][t]:.4f} on the {t} task" for t in tasks)
  text = f"""# Parameter-efficient fine-tuning against full fine-tuning at tiny scale: report

{study.preamble("peft_methods", quick, runtime_s)}

{line}

## Held-out answer loss after {sweep.QUICK_STEPS if quick else sweep.STEPS} SFT steps (mean ± std (n) over seeds)

Before fine-tuning, the pretrained model's held-out answer loss is {before}
(the chat template's markers and the answer's closing `<|end|>` are new to it). Gap: the method's loss − full
fine-tuning's, ± the noise (twice the standard error of the difference); excess: the gap over full fine-tuning's
loss.

| method | lr | trainable params | {" | ".join(f"{t} | gap | excess" for t in tasks)} |
| --- | ---: | ---: | {" | ".join("---: | ---: | ---:" for _ in tasks)} |
{chr(10).join(rows)}

![peft_methods](peft_methods.png)

The pretrained model has {trainable('full'):,} parameters. The prefix MLP's {trainable('prefix_mlp'):,} train, but a
finished run stores the {trainable('prefix'):,} keys and values they produce.

## The learning-rate probe

{_probe_table(result)}
"""
  return study.save_report(directory, text), line


if __name__ == "__main__":
  print(write(sys.argv[1], quick="--quick" in sys.argv)[1])
