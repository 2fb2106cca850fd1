"""A sweep's results: one row per point, means over seeds, and the files that show them.

  DIR/results.csv                 one row per point: axes, status, steps, wall_s, tokens/s, <metric>/final|best
  DIR/results.md                  the points, then the means over seeds
  DIR/loss_curves.png             training loss against step for every point (eval/loss as markers)
  DIR/<metric>_vs_<axis>.png      a final metric against a numeric axis, mean over seeds with the std as error bars

It reads what the runner writes: DIR/sweep.json (axes, their short names, the points) and, per point,
DIR/<name>/metrics.jsonl and DIR/<name>/status.json. Standard library and numpy only, so that a report can be
made on a machine without JAX.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re

import numpy as np

from jaxllm.errors import RunError

NOT_METRICS = ("step", "tokens_per_sec", "mfu", "learning_rate")  # per-step bookkeeping, not results
FIXED = ("name", "status", "steps", "wall_s", "tokens_per_sec")  # collect's columns besides axes and metrics


def _read_json(path: str) -> dict | None:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _read_jsonl(path: str) -> list[dict]:
  """The rows of a metrics.jsonl; [] when missing. A line that does not parse is skipped: a running or killed
  point's file can end in a half-written line."""
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    for line in f:
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return rows


def _number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _finite(v) -> bool:
  return _number(v) and math.isfinite(v)


def _maximized(key: str) -> bool:
  """Accuracies are better high; every other metric (losses, perplexities, norms) is better low."""
  return "accuracy" in key or key.endswith("/acc") or key.endswith("acc_norm")


def _read_sweep(directory: str) -> dict:
  sweep = _read_json(os.path.join(directory, "sweep.json"))
  if sweep is None:
    raise RunError(f"{directory}: no sweep.json, so not a sweep directory (python -m jaxllm.sweep writes one)")
  return sweep


def _axis_names(sweep: dict) -> list[str]:
  """The column of each axis: its short name, or its dotted key where the short name is one of collect's own
  columns (train.steps is "steps" in point names)."""
  shorts = [sweep.get("short", {}).get(axis, axis) for axis in sweep["axes"]]
  return [axis if short in FIXED else short for axis, short in zip(sweep["axes"], shorts)]


def _point_row(sweep: dict, point: dict, directory: str) -> dict:
  rundir = os.path.join(directory, point["name"])
  rows = _read_jsonl(os.path.join(rundir, "metrics.jsonl"))
  status = _read_json(os.path.join(rundir, "status.json")) or {}
  out = {"name": point["name"]}
  for axis, column in zip(sweep["axes"], _axis_names(sweep)):
    out[column] = point.get("overrides", {}).get(axis)
  steps = [r["step"] for r in rows if _number(r.get("step"))]
  speeds = [r["tokens_per_sec"] for r in rows if _finite(r.get("tokens_per_sec")) and r["tokens_per_sec"] != 0]
  out.update(status=status.get("status", "pending"), steps=max(steps) if steps else None,
             wall_s=status.get("wall_s"), tokens_per_sec=float(np.mean(speeds)) if speeds else None)
  keys = dict.fromkeys(k for r in rows for k, v in r.items() if k not in NOT_METRICS and _number(v))
  for key in keys:
    # Non-finite values are skipped for both: a NaN is not a result, and the status says the run went wrong.
    values = [r[key] for r in rows if _finite(r.get(key))]
    out[f"{key}/final"] = values[-1] if values else None
    out[f"{key}/best"] = (max(values) if _maximized(key) else min(values)) if values else None
  return out


def collect(directory: str) -> list[dict]:
  """One row per point of DIR/sweep.json, in its order; None where a value is missing."""
  sweep = _read_sweep(directory)
  return [_point_row(sweep, point, directory) for point in sweep["points"]]


def _axis_columns(rows: list[dict]) -> list[str]:
  return [k for k in rows[0] if k not in FIXED and not k.endswith(("/final", "/best"))] if rows else []


def _metric_columns(rows: list[dict]) -> list[str]:
  return sorted({k for r in rows for k in r if k.endswith(("/final", "/best"))})


def _stats(values: list) -> dict:
  """mean, sample std (ddof=1; 0 for one value) and n of the finite values; mean and std None when n == 0."""
  x = np.array([v for v in values if _finite(v)], dtype=np.float64)
  n = len(x)
  return {"mean": float(x.mean()) if n else None, "std": float(x.std(ddof=1)) if n > 1 else (0.0 if n else None),
          "n": n}


def group(rows: list[dict], seed_key: str = "seed") -> list[dict]:
  """The points that share every axis value but the seed, in order of first appearance. Each group holds the
  shared axis values, `points` (names of all its points), `done` (how many are done) and, per numeric column
  (tokens_per_sec, wall_s, every final and best metric), `{"mean", "std", "n"}` over its done points only."""
  axes = _axis_columns(rows)
  shared = [a for a in axes if a != seed_key]
  numeric = ["tokens_per_sec", "wall_s", *_metric_columns(rows)]
  groups: dict[str, list[dict]] = {}
  for r in rows:
    # Without a seed axis every point is its own group, even if two happen to share all values.
    # JSON text as the key: an axis value may be a list (lora.targets), which does not hash.
    key = json.dumps([r.get(a) for a in shared] + ([] if seed_key in axes else [r["name"]]))
    groups.setdefault(key, []).append(r)
  out = []
  for members in groups.values():
    done = [r for r in members if r["status"] == "done"]
    g = {a: members[0].get(a) for a in shared}
    g.update(points=[r["name"] for r in members], done=len(done))
    g.update({col: _stats([r.get(col) for r in done]) for col in numeric})
    out.append(g)
  return out


def _fmt(v) -> str:
  """4 significant digits; thousands separators instead of an exponent for large numbers (tokens/s, seconds)."""
  if v is None or (isinstance(v, float) and not math.isfinite(v)):
    return "—" if v is None else str(v)
  if not _number(v):
    return str(v)
  if isinstance(v, int):
    return str(v)
  return f"{v:,.0f}" if abs(v) >= 1e4 else f"{v:.4g}"


def _cell(stats: dict) -> str:
  """`mean ± std (n)`, or a dash when no done point has the value."""
  return "—" if stats["n"] == 0 else f"{_fmt(stats['mean'])} ± {_fmt(stats['std'])} ({stats['n']})"


def _md_table(header: list[str], body: list[list[str]]) -> list[str]:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  return lines + ["| " + " | ".join(cells) + " |" for cells in body]


def _write_csv(path: str, rows: list[dict]):
  columns = ["name", *_axis_columns(rows), "status", "steps", "wall_s", "tokens_per_sec", *_metric_columns(rows)]
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    for r in rows:
      writer.writerow({c: "" if r.get(c) is None else r[c] for c in columns})


def _write_md(path: str, sweep: dict, rows: list[dict], groups: list[dict], seed_key: str):
  axes = _axis_columns(rows)
  # The training loss first, then the rest by name (eval/... before the diagnostics such as grad_norm).
  finals = sorted((c for c in _metric_columns(rows) if c.endswith("/final")), key=lambda c: (c != "loss/final", c))
  metric_names = [c[:-len("/final")] for c in finals]
  lines = [f"# Sweep of {sweep.get('config', '?')}", "", "## Points", ""]
  lines += _md_table(["name", *axes, "status", "steps", "wall s", "tokens/s", *metric_names],
                     [[r["name"], *(_fmt(r[a]) for a in axes), r["status"], _fmt(r["steps"]), _fmt(r["wall_s"]),
                       _fmt(r["tokens_per_sec"]), *(_fmt(r.get(c)) for c in finals)] for r in rows])
  lines += ["", "Metrics: the last finite value logged; best values are in results.csv.", ""]
  if seed_key not in axes:
    lines += [f"No `{seed_key}` axis: one run per setting, so no means over seeds.", ""]
  else:
    shared = [a for a in axes if a != seed_key]
    lines += ["## Over seeds", ""]
    lines += _md_table([*shared, "done", "tokens/s", *metric_names],
                       [[*(_fmt(g[a]) for a in shared), f"{g['done']}/{len(g['points'])}",
                         _cell(g["tokens_per_sec"]), *(_cell(g[c]) for c in finals)] for g in groups])
    left_out = [f"`{r['name']}` ({r['status']})" for r in rows if r["status"] != "done"]
    lines += ["", "Cells: mean ± sample std (n finite values) over the seeds of the points that are done."]
    if left_out:
      lines += ["Left out of the means: " + ", ".join(left_out) + "."]
    lines += [""]
  with open(path, "w") as f:
    f.write("\n".join(lines))


def _pyplot():
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return None
  return plt


def _save(plt, fig, ax, path: str) -> str:
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def _plot_curves(plt, directory: str, sweep: dict, path: str) -> str | None:
  fig, ax = plt.subplots(figsize=(7, 4.5))
  drawn = False
  for point in sweep["points"]:
    rows = _read_jsonl(os.path.join(directory, point["name"], "metrics.jsonl"))
    train = [(r["step"], r["loss"]) for r in rows if _finite(r.get("loss"))]
    evals = [(r["step"], r["eval/loss"]) for r in rows if _finite(r.get("eval/loss"))]
    if not train and not evals:
      continue
    # A lone row draws no line segment, so it gets a marker.
    style = {"lw": 1, "marker": "." if len(train) == 1 else None, "label": point["name"]}
    color = ax.plot(*zip(*train), **style)[0].get_color() if train else None
    if evals:
      ax.plot(*zip(*evals), "o", ms=4, color=color, label=None if train else point["name"])
    drawn = True
  if not drawn:
    plt.close(fig)
    return None
  ax.set_xlabel("step")
  ax.set_ylabel("loss (lines: train, dots: eval)")
  ax.legend(fontsize="small")
  return _save(plt, fig, ax, path)


def _plot_vs_axis(plt, rows: list[dict], groups: list[dict], axis: str, others: list[str], metric: str,
                  path: str) -> str | None:
  """`metric` against `axis`: one line per setting of the `others` axes, the mean over seeds with std error bars,
  and each done seed as a faint dot."""
  lines: dict[str, list] = {}
  for g in groups:
    if g[metric]["n"] and _number(g[axis]):
      lines.setdefault(json.dumps([g[o] for o in others]), []).append(g)
  if not lines:
    return None
  fig, ax = plt.subplots(figsize=(6, 4))
  for members in lines.values():
    members.sort(key=lambda g: g[axis])
    label = ", ".join(f"{o}={_fmt(members[0][o])}" for o in others) or "mean ± std over seeds"
    x = [g[axis] for g in members]
    bars = ax.errorbar(x, [g[metric]["mean"] for g in members], yerr=[g[metric]["std"] for g in members],
                       marker="o", capsize=3, label=label)
    names = {name for g in members for name in g["points"]}
    seeds = [(r[axis], r[metric]) for r in rows if r["name"] in names and r["status"] == "done"
             and _finite(r.get(metric))]
    if seeds:
      ax.scatter(*zip(*seeds), s=10, alpha=0.4, color=bars.lines[0].get_color())
  values = [g[axis] for members in lines.values() for g in members]
  if min(values) > 0 and max(values) >= 10 * min(values):
    ax.set_xscale("log")
  ax.set_xlabel(axis)
  ax.set_ylabel(metric)
  ax.legend(fontsize="small")
  return _save(plt, fig, ax, path)


def _file_name(stem: str) -> str:
  return re.sub(r"[^A-Za-z0-9._=-]", "_", stem)


def _plot(directory: str, sweep: dict, rows: list[dict], groups: list[dict], seed_key: str) -> dict[str, str]:
  plt = _pyplot()
  if plt is None:
    return {}
  written = {}
  curves = _plot_curves(plt, directory, sweep, os.path.join(directory, "loss_curves.png"))
  if curves:
    written["loss_curves"] = curves
  shared = [a for a in _axis_columns(rows) if a != seed_key]
  numeric = [a for a in shared if all(_number(r[a]) for r in rows if r[a] is not None)
             and any(r[a] is not None for r in rows)]
  metrics = [c for c in _metric_columns(rows) if c == "loss/final" or (c.startswith("eval/") and c.endswith("/final"))]
  for axis in numeric:
    for metric in metrics:
      stem = _file_name(f"{metric}_vs_{axis}")
      path = _plot_vs_axis(plt, rows, groups, axis, [a for a in shared if a != axis], metric,
                           os.path.join(directory, stem + ".png"))
      if path:
        written[stem] = path
  return written


def write(directory: str, seed_key: str = "seed") -> dict[str, str]:
  """Writes results.csv, results.md and the plots into the sweep directory; returns {kind: path} of what it
  wrote (kinds: csv, md, loss_curves, and the stem of each <metric>_vs_<axis> plot)."""
  sweep = _read_sweep(directory)
  rows = collect(directory)
  groups = group(rows, seed_key)
  written = {"csv": os.path.join(directory, "results.csv"), "md": os.path.join(directory, "results.md")}
  _write_csv(written["csv"], rows)
  _write_md(written["md"], sweep, rows, groups, seed_key)
  written.update(_plot(directory, sweep, rows, groups, seed_key))
  return written
