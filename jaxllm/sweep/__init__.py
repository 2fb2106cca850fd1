"""Sweeps: a grid of configs run as one experiment, each point in its own run directory, then one table.

A config file defines its sweep beside `get_config`, as a list of points, each a dict of dotted config keys to
values, built with these helpers:

  from jaxllm import sweep

  def get_sweep(arg=None):
    return sweep.product(sweep.axis("optimizer.learning_rate", [1e-3, 3e-3, 1e-2]), sweep.seeds(3))

  python -m jaxllm.sweep --config configs/pretrain_tiny.py --workdir runs/lr_sweep [--parallel 2] [--dry-run]

A point may also name its own config file (`"config": "configs/sft_tiny.py"`) and start from another point's run
(`"init_from": "@<point name>"`): the runner orders the points so that a run starts after the one it needs
(pretrain -> SFT grid -> DPO grid in one sweep). See jaxllm/sweep/points.py (names, validation),
runner.py (local processes, SLURM arrays) and report.py (results.csv, results.md, plots).
"""

from __future__ import annotations

import itertools


def axis(key: str, values) -> list[dict]:
  """One axis: a point per value of a dotted config key."""
  return [{key: v} for v in values]


def seeds(n: int, key: str = "seed") -> list[dict]:
  """The seed axis: seeds 0 .. n-1 (the report averages over it)."""
  return axis(key, range(n))


def zipped(**axes) -> list[dict]:
  """Axes that move together (the i-th value of each): zipped(**{"train.steps": [100, 200], "optimizer.warmup_steps":
  [10, 20]}). Dotted keys go through ** as strings."""
  lengths = {len(v) for v in axes.values()}
  if len(lengths) > 1:
    raise ValueError(f"sweep.zipped: the axes have different lengths {sorted(lengths)}")
  return [dict(zip(axes, values)) for values in zip(*axes.values())]


def product(*axes) -> list[dict]:
  """Every combination of the axes: each argument is a list of partial points (axis, seeds, zipped) or a dict
  {key: values} (one axis per key)."""
  lists = []
  for a in axes:
    if isinstance(a, dict):
      lists.extend(axis(k, v) for k, v in a.items())
    else:
      lists.append(list(a))
  return [dict(kv for part in combo for kv in part.items()) for combo in itertools.product(*lists)]
