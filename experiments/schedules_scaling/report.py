"""REPORT.md and plots of experiments/schedules_scaling from its sweep directory; the verdict is computed here,
from the runs: a power law L = a·N^-α fitted to the final validation loss of each size (mean over seeds) in
log-log, and the final validation loss of warmup-stable-decay against cosine.

  python experiments/schedules_scaling/report.py DIR     # (run.py calls it after the sweep)
"""

import datetime
import os
import platform
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from experiments import study  # noqa: E402
from experiments.schedules_scaling import sweep  # noqa: E402
from jaxllm import model as model_lib, runs  # noqa: E402
from jaxllm.metrics import read_metrics  # noqa: E402
from jaxllm.sweep import report as sweep_report  # noqa: E402

METRIC = "eval/loss/final"
R2_REPRODUCED, R2_PARTLY = 0.95, 0.8


def non_embedding_params(run_dir: str) -> int:
  """Parameters outside the embedding (and the untied output matrix): Kaplan et al.'s N."""
  cfg = runs.model_config(run_dir)
  return model_lib.num_params(cfg) - cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)


def fit_power_law(n, loss) -> tuple[float, float, float]:
  """(α, a, R²) of log L = log a − α·log N, least squares over the given points."""
  x, y = np.log(np.asarray(n, float)), np.log(np.asarray(loss, float))
  slope, intercept = np.polyfit(x, y, 1)
  residual = y - (slope * x + intercept)
  r2 = 1.0 - np.sum(residual ** 2) / np.sum((y - y.mean()) ** 2)
  return -slope, float(np.exp(intercept)), float(r2)


def _stats(values) -> tuple[float, float, int]:
  v = np.asarray([x for x in values if x is not None and np.isfinite(x)], float)
  return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, len(v)


def analyse(directory: str, quick: bool) -> dict:
  rows = {r["name"]: r for r in sweep_report.collect(directory)}
  sizes = list(sweep.QUICK_SIZES if quick else sweep.SIZES)
  scaling = []
  for size in sizes:
    names = [n for n in rows if n.startswith(f"scale_{size}_")]
    scaling.append({"size": size, "n": non_embedding_params(os.path.join(directory, names[0])),
                    "losses": [rows[n][METRIC] for n in names], "names": names})
  for s in scaling:
    s["mean"], s["std"], s["count"] = _stats(s["losses"])
  alpha, a, r2 = fit_power_law([s["n"] for s in scaling], [s["mean"] for s in scaling])
  schedule_size = sweep.QUICK_SCHEDULE_SIZE if quick else sweep.SCHEDULE_SIZE
  schedules = {"cosine": [n for n in rows if n.startswith(f"scale_{schedule_size}_")]}
  for name in sweep.WSD:
    found = [n for n in rows if n.startswith(f"sched_{name}_")]
    if found:
      schedules[name] = found
  compared = {k: dict(zip(("mean", "std", "count"), _stats([rows[n][METRIC] for n in v])), names=v)
              for k, v in schedules.items()}
  return {"scaling": scaling, "alpha": alpha, "a": a, "r2": r2, "schedules": compared,
          "schedule_size": schedule_size}


def verdict(result: dict) -> str:
  alpha, r2 = result["alpha"], result["r2"]
  law = "reproduced" if alpha > 0 and r2 >= R2_REPRODUCED else "partly" if alpha > 0 and r2 >= R2_PARTLY else "not"
  cos, wsd = result["schedules"]["cosine"], result["schedules"].get("wsd20")
  diff = wsd["mean"] - cos["mean"]
  spread = float(np.hypot(wsd["std"], cos["std"]))
  matches = diff <= spread  # within the spread, or lower (better) than cosine
  outcome = ("reproduced" if law == "reproduced" and matches else
             "not reproduced" if law == "not" and not matches else "partly")
  return (f"Verdict: {outcome} — power law L ∝ N^-α with α = {alpha:.3f}, R² = {r2:.3f} "
          f"({'a straight line' if law == 'reproduced' else 'not a clean straight line'} in log-log over "
          f"{len(result['scaling'])} sizes); WSD 20% cooldown − cosine = {diff:+.4f} nats "
          f"({'within' if abs(diff) <= spread else 'below' if diff < 0 else 'above'} the seed spread ±{spread:.4f})")


def plot(directory: str, result: dict) -> list[str]:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import matplotlib.ticker

  fig, ax = plt.subplots(figsize=(6, 4))
  n = np.array([s["n"] for s in result["scaling"]], float)
  for s in result["scaling"]:
    ax.scatter([s["n"]] * len(s["losses"]), s["losses"], color="tab:blue", alpha=0.35, s=14)
  ax.errorbar(n, [s["mean"] for s in result["scaling"]], yerr=[s["std"] for s in result["scaling"]], fmt="o",
              color="tab:blue", capsize=3, label="final validation loss (mean ± std over seeds)")
  grid = np.geomspace(n.min(), n.max(), 50)
  ax.plot(grid, result["a"] * grid ** -result["alpha"], "--", color="tab:red",
          label=f"fit: {result['a']:.3g}·N^-{result['alpha']:.3f} (R² {result['r2']:.3f})")
  ax.set_xscale("log")
  ax.set_yscale("log")
  for axis in (ax.xaxis, ax.yaxis):  # label the decades and a few round losses, not every minor tick
    axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
  ax.yaxis.set_major_locator(matplotlib.ticker.FixedLocator([4.0, 4.5, 5.0, 5.5, 6.0, 7.0, 8.0]))
  ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
  ax.set_xlabel("non-embedding parameters N")
  ax.set_ylabel("validation loss (nats/token)")
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=8)
  fig.tight_layout()
  paths = [os.path.join(directory, "scaling.png")]
  fig.savefig(paths[0], dpi=100)
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(6, 4))
  for name, s in result["schedules"].items():
    curves = [[(r["step"], r["eval/loss"]) for r in read_metrics(os.path.join(directory, p)) if "eval/loss" in r]
              for p in s["names"]]
    steps = [step for step, _ in curves[0]]
    mean = np.mean([[v for _, v in c] for c in curves], axis=0)
    ax.plot(steps, mean, "o-", label=f"{name}: final {s['mean']:.4f} ± {s['std']:.4f} (n={s['count']})")
  ax.set_xlabel("step")
  ax.set_ylabel("validation loss (mean over seeds)")
  ax.set_title(f"schedules on size {result['schedule_size']}, equal steps")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  paths.append(os.path.join(directory, "schedules.png"))
  fig.savefig(paths[1], dpi=100)
  plt.close(fig)
  return paths


def write(directory: str, quick: bool = False, runtime_s: float | None = None) -> tuple[str, str]:
  """Writes DIR/REPORT.md and the plots; returns (its path, the verdict line)."""
  result = analyse(directory, quick)
  line = verdict(result)
  plot(directory, result)
  table = "\n".join(f"| {s['size']} | {s['n']:,} | {s['mean']:.4f} ± {s['std']:.4f} ({s['count']}) |"
                    for s in result["scaling"])
  cos = result["schedules"]["cosine"]["mean"]
  schedules = "\n".join(f"| {k} | {s['mean']:.4f} ± {s['std']:.4f} ({s['count']}) | {s['mean'] - cos:+.4f} |"
                        for k, s in result["schedules"].items())
  when = datetime.date.today().isoformat()
  machine = f"{os.cpu_count()} CPU cores ({platform.machine()})"
  runtime = f", {runtime_s / 60:.1f} min for this invocation" if runtime_s else ""
  text = f"""# Scaling and schedules at tiny scale: report

{when}, {machine}{runtime}{" — **--quick: a check of the pipeline, not a result**" if quick else ""}.
`python experiments/schedules_scaling/run.py --workdir DIR{" --quick" if quick else ""}`; the protocol is in
README.md beside this file; every number below is computed from the runs in DIR (`results.md` lists each point).

{line}

## Final validation loss against non-embedding parameters (cosine, equal tokens)

| size | non-embedding params N | final validation loss (mean ± std (n)) |
| --- | ---: | ---: |
{table}

Fit over the size means: L = {result['a']:.4g}·N^-{result['alpha']:.4f}, R² = {result['r2']:.4f}
(reproduced: α > 0 and R² ≥ {R2_REPRODUCED}; partly: R² ≥ {R2_PARTLY}). ![scaling](scaling.png)

## Schedules at equal steps (size {result['schedule_size']})

| schedule | final validation loss (mean ± std (n)) | − cosine |
| --- | ---: | ---: |
{schedules}

WSD with a 20% cooldown matches cosine when its final loss is within the seed spread of cosine's (the two stds
added in quadrature) or below it. ![schedules](schedules.png)
"""
  return study.save_report(directory, text), line


if __name__ == "__main__":
  print(write(sys.argv[1], quick="--quick" in sys.argv)[1])
