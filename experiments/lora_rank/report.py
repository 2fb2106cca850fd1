"""REPORT.md and plots of experiments/lora_rank from its sweep directory; the verdict is computed here, from the
final held-out loss of each point (mean and std over seeds):

  - {q,v} is rank-insensitive: |L(r=1) − L(r=64)| within the noise (twice the standard error of the difference);
  - {q} alone is worse at the same trainable-parameter budget (q r=8 against q,v r=4, Table 5) and more
    rank-sensitive (the spread of its means over ranks is larger than {q,v}'s);
  - the far control: on the relabelled vocabulary, rank does matter (r=1 worse than r=64 beyond the noise).

  python experiments/lora_rank/report.py DIR     # (run.py calls it after the sweep)
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from experiments import study  # noqa: E402
from experiments.lora_rank import sweep  # noqa: E402
from jaxllm.metrics import read_metrics  # noqa: E402
from jaxllm.sweep import report as sweep_report  # noqa: E402

METRIC = "eval/loss/final"


def trainable(targets: str, rank: int) -> int:
  """LoRA parameters of `targets` at `rank` on sweep.MODEL: rank·(in + out) per kernel per layer."""
  m = sweep.MODEL
  d, q_out, kv_out = m["d_model"], m["num_heads"] * m["head_dim"], m["num_kv_heads"] * m["head_dim"]
  per = {"q": d + q_out, "k": d + kv_out, "v": d + kv_out, "o": q_out + d}
  return rank * m["num_layers"] * sum(per[t] for t in targets)


def analyse(directory: str, quick: bool) -> dict:
  rows = {r["name"]: r for r in sweep_report.collect(directory)}
  ranks = sweep.QUICK_RANKS if quick else sweep.RANKS
  cells = {}  # (task, targets) -> {rank: stats}
  for task, targets in [("near", t) for t in (sweep.QUICK_TARGETS if quick else sweep.TARGETS)] + \
                       [("far", t) for t in sweep.FAR_TARGETS]:
    cells[(task, targets)] = {
        r: study.stats([rows[n][METRIC] for n in rows if n.startswith(f"{task}_{targets}_r{r}_")]) for r in ranks}
  before = {}  # the pretrained model's held-out loss on each task: step 0 of any of its fine-tuning points
  for task in ("near", "far"):
    first = next(n for n in rows if n.startswith(f"{task}_"))
    before[task] = next(r["eval/loss"] for r in read_metrics(os.path.join(directory, first)) if "eval/loss" in r)
  return {"cells": cells, "ranks": ranks, "before": before, "quick": quick}


def findings(result: dict) -> dict:
  """The verdict's parts, each with its numbers."""
  cells, lo, hi = result["cells"], min(result["ranks"]), max(result["ranks"])
  qv, q, far = cells[("near", "qv")], cells[("near", "q")], cells[("far", "qv")]

  def spread(c):  # max − min of the means over ranks
    means = [s["mean"] for s in c.values()]
    return max(means) - min(means)

  out = {"qv_gap": qv[lo]["mean"] - qv[hi]["mean"], "qv_noise": study.noise(qv[lo], qv[hi]),
         "far_gap": far[lo]["mean"] - far[hi]["mean"], "far_noise": study.noise(far[lo], far[hi]),
         "q_spread": spread(q), "qv_spread": spread(qv)}
  # Table 5's budget: q at 2x the rank of q,v (equal parameters up to GQA's smaller k/v); quick has only 1 and 64
  q_rank, qv_rank = (sweep.BUDGET["q"], sweep.BUDGET["qv"]) if sweep.BUDGET["q"] in q else (hi, hi)
  out.update(q_rank=q_rank, qv_rank=qv_rank, budget_gap=q[q_rank]["mean"] - qv[qv_rank]["mean"],
             budget_noise=study.noise(q[q_rank], qv[qv_rank]))
  out["qv_flat"] = abs(out["qv_gap"]) <= out["qv_noise"]
  out["q_worse"] = out["budget_gap"] > out["budget_noise"]
  out["q_more_sensitive"] = out["q_spread"] > out["qv_spread"]
  out["far_matters"] = out["far_gap"] > out["far_noise"]
  out["recovered"] = ((result["before"]["near"] - qv[lo]["mean"]) / (result["before"]["near"] - qv[hi]["mean"])
                      if result["before"]["near"] != qv[hi]["mean"] else float("nan"))
  return out


def verdict(result: dict) -> str:
  f, lo, hi = findings(result), min(result["ranks"]), max(result["ranks"])
  claims = (f["qv_flat"], f["q_worse"], f["q_more_sensitive"], f["far_matters"])
  outcome = ("reproduced" if all(claims) else
             "not reproduced" if not f["qv_flat"] and not f["q_worse"] else "partly")
  return (f"Verdict: {outcome} — near task, q,v: r={lo} − r={hi} = {f['qv_gap']:+.4f} nats "
          f"({'within' if f['qv_flat'] else 'outside'} the noise ±{f['qv_noise']:.4f}; r={lo} recovers "
          f"{100 * f['recovered']:.0f}% of r={hi}'s gain); q r={f['q_rank']} − q,v r={f['qv_rank']} = "
          f"{f['budget_gap']:+.4f} ({'worse' if f['q_worse'] else 'not worse'} beyond ±{f['budget_noise']:.4f}); "
          f"spread over ranks q {f['q_spread']:.4f} vs q,v {f['qv_spread']:.4f}; far control: r={lo} − r={hi} = "
          f"{f['far_gap']:+.4f} ({'rank matters' if f['far_matters'] else 'rank does not matter'})")


def plot(directory: str, result: dict) -> str:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import matplotlib.ticker

  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for ax, task in zip(axes, ("near", "far")):
    for (t, targets), c in result["cells"].items():
      if t != task:
        continue
      ranks = sorted(c)
      ax.errorbar(ranks, [c[r]["mean"] for r in ranks], yerr=[c[r]["std"] for r in ranks], fmt="o-", capsize=3,
                  label=f"{{{','.join(targets)}}}")
    ax.axhline(result["before"][task], color="gray", ls="--", label="pretrained, before fine-tuning")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("LoRA rank r")
    ax.set_ylabel("held-out loss (mean ± std over seeds)")
    ax.set_title({"near": "near task: one of the pretraining topics",
                  "far": "far control: that topic, vocabulary relabelled"}[task], fontsize=10)
    if task == "far":
      ax.set_yscale("log")
      ax.yaxis.set_major_locator(matplotlib.ticker.FixedLocator([1, 1.5, 2, 3, 4, 6, 8]))
      ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
      ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
  fig.tight_layout()
  path = os.path.join(directory, "lora_rank.png")
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def write(directory: str, quick: bool = False, runtime_s: float | None = None) -> tuple[str, str]:
  """Writes DIR/REPORT.md and the plot; returns (its path, the verdict line)."""
  result = analyse(directory, quick)
  line = verdict(result)
  plot(directory, result)
  ranks = result["ranks"]
  header = "| task | targets | " + " | ".join(f"r={r}" for r in ranks) + " |"
  rule = "| --- | --- | " + " | ".join("---:" for _ in ranks) + " |"
  body = "\n".join(f"| {task} | {{{','.join(targets)}}} | " + " | ".join(
      f"{c[r]['mean']:.4f} ± {c[r]['std']:.4f} ({c[r]['n']})" for r in ranks) + " |"
      for (task, targets), c in result["cells"].items())
  params = "\n".join(f"| {{{','.join(t)}}} | " + " | ".join(f"{trainable(t, r):,}" for r in ranks) + " |"
                     for t in (sweep.QUICK_TARGETS if quick else sweep.TARGETS))
  text = f"""# LoRA rank and targets at tiny scale: report

{study.preamble("lora_rank", quick, runtime_s)}

{line}

## Held-out loss after LoRA fine-tuning (mean ± std (n) over seeds)

Before fine-tuning, the pretrained model's held-out loss is {result['before']['near']:.4f} on the near task and
{result['before']['far']:.4f} on the far one.

{header}
{rule}
{body}

![lora_rank](lora_rank.png)

## Trainable parameters

| targets | {" | ".join(f"r={r}" for r in ranks)} |
| --- | {" | ".join("---:" for _ in ranks)} |
{params}

Table 5's budget compares q at r=8 with q,v at r=4 and q,k,v,o at r=2 ({trainable("q", 8):,}, {trainable("qv", 4):,}
and {trainable("qkvo", 2):,} parameters here: equal but for grouped-query attention's narrower k and v).
"""
  return study.save_report(directory, text), line


if __name__ == "__main__":
  print(write(sys.argv[1], quick="--quick" in sys.argv)[1])
