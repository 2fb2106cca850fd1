"""The tiny pipeline as a study, one command: its sweep (resuming), then REPORT.md and the plot.

  python experiments/pipeline/run.py --workdir runs/pipeline [--quick] [--parallel 2]
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repository root: configs/, experiments/

from experiments import study  # noqa: E402
from experiments.pipeline import report  # noqa: E402

if __name__ == "__main__":
  sys.exit(study.main(__doc__.split("\n")[0], os.path.join(HERE, "sweep.py"), report))
