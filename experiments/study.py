"""What every study's run.py does: parse --workdir/--quick/--parallel, run the study's sweep (resuming), then its
report, and print the verdict line."""

import argparse
import os
import sys
import time

from jaxllm.sweep import command


def save_report(directory: str, text: str) -> str:
  """Writes DIR/REPORT.md; returns its path."""
  path = os.path.join(directory, "REPORT.md")
  with open(path, "w") as f:
    f.write(text)
  return path


def main(description: str, sweep_file: str, report, argv=None, arg: str = "") -> int:
  """`report.write(workdir, quick=, runtime_s=) -> (path, verdict line)`; `arg` is passed to the sweep file
  after quick=... (e.g. a shared tokenizer's path, given a workdir: a function of it)."""
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--quick", action="store_true", help="a few small points, 1 seed: a check, not a result")
  parser.add_argument("--parallel", type=int, default=2, help="points run at a time")
  args = parser.parse_args(argv)
  start, workdir = time.time(), os.path.abspath(args.workdir)
  os.makedirs(workdir, exist_ok=True)
  extra = arg(workdir, args.quick) if callable(arg) else arg
  spec = f"{sweep_file}:quick={args.quick}" + (f",{extra}" if extra else "")
  statuses = command.run(spec, workdir, parallel=args.parallel)
  failed = [name for name, status in statuses.items() if status != "done"]
  if failed:
    print(f"not done: {failed}; see {workdir}/<point>/train.log, then rerun to resume", file=sys.stderr)
    return 1
  path, verdict = report.write(workdir, quick=args.quick, runtime_s=time.time() - start)
  print(f"{verdict}\nwrote {path}")
  return 0
