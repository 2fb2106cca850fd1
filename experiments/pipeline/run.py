"""The tiny pipeline as a study, one command: its sweep (resuming), then REPORT.md and the plot.

  python experiments/pipeline/run.py --workdir runs/pipeline [--quick] [--parallel 2]
"""

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repository root: configs/, experiments/

from experiments.pipeline import report  # noqa: E402
from jaxllm.sweep import command  # noqa: E402


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--quick", action="store_true", help="a small model, a few steps, 1 seed: a check")
  parser.add_argument("--parallel", type=int, default=2)
  args = parser.parse_args(argv)
  start, workdir = time.time(), os.path.abspath(args.workdir)
  statuses = command.run(f"{os.path.join(HERE, 'sweep.py')}:quick={args.quick}", workdir, parallel=args.parallel)
  failed = [name for name, status in statuses.items() if status != "done"]
  if failed:
    print(f"not done: {failed}; see {workdir}/<point>/train.log, then rerun to resume", file=sys.stderr)
    return 1
  path, verdict = report.write(workdir, quick=args.quick, runtime_s=time.time() - start)
  print(f"{verdict}\nwrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
