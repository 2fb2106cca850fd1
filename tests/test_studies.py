"""The paper-ablation studies: their analysis against exact inputs, and each study's --quick run end to end
(REPORT.md with a computed Verdict line, and its plots)."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments.schedules_scaling import report as scaling_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_power_law_fit_recovers_an_exact_law():
  n = np.array([1e4, 3e4, 1e5, 3e5, 1e6])
  alpha, a, r2 = scaling_report.fit_power_law(n, 12.0 * n ** -0.08)
  assert alpha == pytest.approx(0.08) and a == pytest.approx(12.0) and r2 == pytest.approx(1.0)
  noisy = 12.0 * n ** -0.08 * np.array([1.02, 0.97, 1.03, 0.98, 1.0])
  assert scaling_report.fit_power_law(n, noisy)[2] < 0.99


@pytest.mark.parametrize("r2,wsd,want", [(0.99, 3.01, "reproduced"), (0.99, 2.5, "reproduced"),
                                          (0.9, 3.01, "partly"), (0.99, 3.5, "partly"), (0.5, 3.5, "not reproduced")])
def test_verdict_follows_the_numbers(r2, wsd, want):
  result = {"alpha": 0.05, "r2": r2, "scaling": [{}] * 5,
            "schedules": {"cosine": {"mean": 3.0, "std": 0.02}, "wsd20": {"mean": wsd, "std": 0.02}}}
  line = scaling_report.verdict(result)
  assert line.startswith(f"Verdict: {want} — ") and f"R² = {r2:.3f}" in line


def test_schedules_scaling_quick_end_to_end(tmp_path):
  env = {**os.environ, "PYTHONPATH": ROOT}
  if jax.config.jax_compilation_cache_dir:  # conftest's persistent cache: the points reuse compiled programs
    env.update(JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  workdir = tmp_path / "ss"
  proc = subprocess.run([sys.executable, "experiments/schedules_scaling/run.py", "--workdir", str(workdir),
                         "--quick"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = (workdir / "REPORT.md").read_text()
  verdicts = [line for line in report.splitlines() if line.startswith("Verdict: ")]
  assert len(verdicts) == 1 and verdicts[0].split(" — ")[0] in (
      "Verdict: reproduced", "Verdict: partly", "Verdict: not reproduced")
  for plot in ("scaling.png", "schedules.png", "results.md", "loss_curves.png"):
    assert (workdir / plot).stat().st_size > 0
  assert "| xs |" in report and "| wsd20 |" in report
