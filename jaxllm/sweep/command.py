"""The `jaxllm sweep` command (also `python -m jaxllm.sweep`).

  python -m jaxllm.sweep --config FILE[:arg] --workdir DIR [--parallel N] [--gpus 0,1,2,3] [--dry-run]
  python -m jaxllm.sweep --config FILE[:arg] --workdir DIR --slurm [--submit] [--sbatch=--partition=gpu ...]
  python -m jaxllm.sweep report DIR
  python -m jaxllm.sweep run-point --workdir DIR --point NAME     # one point (what a SLURM array task runs)

Every point is validated before any runs. Rerunning the same command skips the finished points, resumes the
interrupted ones and retries the failed ones; at the end DIR/results.csv, DIR/results.md and the plots are
written (report.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from jaxllm.errors import ConfigError
from jaxllm.sweep import points as points_lib, report, runner

SWEEP = "sweep.json"


def _save(sweep_dir: str, spec: str, points, axes, short):
  """Writes DIR/sweep.json, after checking that a point already recorded there has the same config."""
  path = os.path.join(sweep_dir, SWEEP)
  if os.path.exists(path):
    with open(path) as f:
      recorded = {p["name"]: p for p in json.load(f)["points"]}
    for p in points:
      old = recorded.get(p.name)
      if old and (old["config"], old["overrides"]) != (p.config, json.loads(json.dumps(p.overrides))):
        raise ConfigError(f"{sweep_dir}: point {p.name!r} was run with {old['config']} {old['overrides']}, not "
                          f"{p.config} {p.overrides}; choose another --workdir")
  os.makedirs(sweep_dir, exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump({"config": spec, "axes": axes, "short": short, "points": [p.to_json() for p in points]}, f, indent=2)
  os.replace(path + ".tmp", path)


def _load(sweep_dir: str) -> list[points_lib.Point]:
  with open(os.path.join(sweep_dir, SWEEP)) as f:
    return [points_lib.Point(**p) for p in json.load(f)["points"]]


def run_point(sweep_dir: str, name: str) -> int:
  point = next((p for p in _load(sweep_dir) if p.name == name), None)
  if point is None:
    raise ConfigError(f"--point: {sweep_dir}/{SWEEP} has no point {name!r}")
  returncode = runner.run_point(point, sweep_dir).wait()
  runner.finish_point(point, sweep_dir, returncode)
  return returncode


def run(spec: str, sweep_dir: str, *, parallel: int = 1, gpus=(), points=None, log=None) -> dict[str, str]:
  """Runs the sweep of the config `spec` in `sweep_dir` (validated, recorded, its unfinished points run) and
  writes its report; returns {point name: status}. `points`: (points, axes, short) loaded and validated."""
  log = log or (lambda message: print(message, flush=True))
  if points is None:
    points = points_lib.load(spec)
    points_lib.validate(points[0])
  points, axes, short = points
  _save(sweep_dir, spec, points, axes, short)
  log(f"sweep {spec}: {len(points)} points in {sweep_dir}, {parallel} at a time")
  statuses = runner.run_local(points, sweep_dir, parallel=parallel, gpus=list(gpus), log=log)
  report.write(sweep_dir)
  return statuses


def main(argv: list[str]) -> int:
  if argv[:1] == ["report"]:
    if len(argv) != 2:
      raise ConfigError("usage: python -m jaxllm.sweep report DIR")
    written = report.write(argv[1])
    print("\n".join(f"wrote {path}" for path in written.values()))
    return 0
  if argv[:1] == ["run-point"]:
    parser = argparse.ArgumentParser(prog="jaxllm sweep run-point")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--point", required=True)
    args = parser.parse_args(argv[1:])
    return run_point(os.path.abspath(args.workdir), args.point)
  parser = argparse.ArgumentParser(prog="jaxllm sweep", description=__doc__.split("\n")[0])
  parser.add_argument("--config", required=True, help="a config file with get_sweep(arg), FILE[:arg]")
  parser.add_argument("--workdir", required=True, help="the sweep's directory: one run directory per point")
  parser.add_argument("--parallel", type=int, default=1, help="points run at a time (the cores are divided)")
  parser.add_argument("--gpus", default="", help="CUDA device ids to divide among the parallel points: 0,1,2,3")
  parser.add_argument("--dry-run", action="store_true", help="validate and list the points and commands only")
  parser.add_argument("--slurm", action="store_true", help="write SLURM array scripts instead of running")
  parser.add_argument("--submit", action="store_true", help="with --slurm: submit them (sbatch)")
  parser.add_argument("--sbatch", action="append", default=[], help="an extra #SBATCH line, e.g. --sbatch=--gpus=8")
  args = parser.parse_args(argv)
  if args.parallel < 1:
    raise ConfigError(f"--parallel: must be >= 1, got {args.parallel}")
  sweep_dir = os.path.abspath(args.workdir)
  points, axes, short = points_lib.load(args.config)
  points_lib.validate(points)
  if args.dry_run:
    for p in points:
      status = runner.read_status(os.path.join(sweep_dir, p.name))["status"]
      print(f"{p.name} [{status}]\n  {' '.join(runner.command(p, sweep_dir))}")
    print(f"{len(points)} points over {', '.join(short[a] for a in axes) or 'no axis'}; nothing run (--dry-run)")
    return 0
  if args.slurm:
    _save(sweep_dir, args.config, points, axes, short)
    written = runner.slurm_scripts(points, sweep_dir, repo=os.getcwd(), sbatch_args=args.sbatch)
    print("\n".join(f"wrote {path}" for path in written))
    if args.submit:
      return subprocess.call([written[-1]])
    return 0
  statuses = run(args.config, sweep_dir, parallel=args.parallel, gpus=[g for g in args.gpus.split(",") if g],
                 points=(points, axes, short))
  with open(os.path.join(sweep_dir, "results.md")) as f:
    print(f.read())
  failed = [n for n, s in statuses.items() if s != "done"]
  for name in failed:
    print(f"{name}: {statuses[name]}: {runner.read_status(os.path.join(sweep_dir, name)).get('error', '')}",
          file=sys.stderr)
  return 1 if failed else 0
