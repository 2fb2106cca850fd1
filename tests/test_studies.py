"""The paper-ablation studies: their analysis against exact inputs, and each study's --quick run end to end
(REPORT.md with a computed Verdict line, and its plots)."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments import study
from experiments.lora_rank import report as lora_rank_report
from experiments.pipeline import report as pipeline_report
from experiments.prompt_loss import report as prompt_loss_report
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


def _quick(study: str, workdir) -> str:
  """Runs a study's --quick end to end; returns its REPORT.md after checking it has one computed verdict."""
  env = {**os.environ, "PYTHONPATH": ROOT}
  if jax.config.jax_compilation_cache_dir:  # conftest's persistent cache: the points reuse compiled programs
    env.update(JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  proc = subprocess.run([sys.executable, f"experiments/{study}/run.py", "--workdir", str(workdir), "--quick"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = (workdir / "REPORT.md").read_text()
  verdicts = [line for line in report.splitlines() if line.startswith("Verdict: ")]
  assert len(verdicts) == 1 and verdicts[0].split(" — ")[0] in (
      "Verdict: reproduced", "Verdict: partly", "Verdict: not reproduced")
  assert verdicts[0] in proc.stdout
  return report


def test_schedules_scaling_quick_end_to_end(tmp_path):
  report = _quick("schedules_scaling", tmp_path / "ss")
  for plot in ("scaling.png", "schedules.png", "results.md", "loss_curves.png"):
    assert (tmp_path / "ss" / plot).stat().st_size > 0
  assert "| xs |" in report and "| wsd20 |" in report


def test_pipeline_quick_end_to_end(tmp_path):
  report = _quick("pipeline", tmp_path / "pl")
  assert (tmp_path / "pl" / "pipeline.png").stat().st_size > 0
  assert "| pretrain | validation loss" in report and "| rpo | 1 |" in report


def test_lora_rank_quick_end_to_end(tmp_path):
  report = _quick("lora_rank", tmp_path / "lr")
  assert (tmp_path / "lr" / "lora_rank.png").stat().st_size > 0
  assert "| near | {q,v} |" in report and "| far | {q,v} |" in report


def test_prompt_loss_quick_end_to_end(tmp_path):
  report = _quick("prompt_loss", tmp_path / "pls")
  assert (tmp_path / "pls" / "prompt_loss.png").stat().st_size > 0
  assert "| short (3/30 words) | small (100) |" in report


def test_dpo_beta_quick_end_to_end(tmp_path):
  report = _quick("dpo_beta", tmp_path / "db")
  assert (tmp_path / "db" / "frontier.png").stat().st_size > 0
  assert "Tabular check: TV" in report and "| DPO | dpo_beta0.1 |" in report


def test_degenerate_answers_are_token_loops():
  assert pipeline_report.degenerate([5, 6, 7] * 3)
  assert pipeline_report.degenerate([1, 2] + [9, 9, 9, 9, 9])         # one token repeated: (9, 9, 9) x3
  assert not pipeline_report.degenerate([1, 2, 3, 4, 5, 6, 1, 2, 3])  # a 3-gram twice is a repetition, not a loop
  assert not pipeline_report.degenerate([])


def test_pipeline_verdict_follows_the_numbers():
  def result(damage, degenerate, accuracy):
    variant = {"accuracy": (accuracy, 0.01), "damage": damage, "degenerate": (degenerate, 0.0),
               "ok": damage <= 0.1 and degenerate <= 0.05}
    return {"pretrain": (8.0, 4.0), "sft_metrics": (5.0, 2.7), "sft": {"degenerate": 0.0},
            "variants": {"dpo": dict(variant), "rpo": {**variant, "damage": 0.02, "degenerate": (0.0, 0.0),
                                                        "ok": True}}}
  assert pipeline_report.verdict(result(0.3, 0.4, 0.8)).startswith("Verdict: reproduced — ")
  assert "best that keeps the SFT model (within 10%): rpo" in pipeline_report.verdict(result(0.3, 0.4, 0.8))
  bad = result(0.3, 0.4, 0.8)
  bad["variants"]["rpo"]["ok"] = False
  assert pipeline_report.verdict(bad).startswith("Verdict: partly — ")
  assert pipeline_report.verdict(result(0.3, 0.4, 0.45)).startswith("Verdict: not reproduced — ")


def _cell(means, std=0.01, n=3):
  return {k: {"mean": m, "std": std, "n": n} for k, m in means.items()}


def test_lora_rank_trainable_counts_by_hand():
  # sweep.MODEL: d 64, 4 heads x 16 (q and o: 64 wide), 2 kv heads x 16 (k and v: 32 wide), 2 layers
  assert lora_rank_report.trainable("q", 1) == 2 * (64 + 64)
  assert lora_rank_report.trainable("qv", 4) == 4 * 2 * ((64 + 64) + (64 + 32))
  assert lora_rank_report.trainable("qkvo", 2) == 2 * 2 * (2 * (64 + 64) + 2 * (64 + 32))


@pytest.mark.parametrize("qv64,q8,far1,want", [(2.0, 2.3, 3.0, "reproduced"), (1.9, 2.3, 3.0, "partly"),
                                               (2.0, 2.0, 3.0, "partly"), (1.9, 2.0, 3.0, "not reproduced")])
def test_lora_rank_verdict_follows_the_numbers(qv64, q8, far1, want):
  ranks = (1, 2, 4, 8, 16, 64)
  qv = {r: 2.0 for r in ranks} | {64: qv64}
  q = {1: 2.6, 2: 2.5, 4: 2.4, 8: q8, 16: 2.3, 64: 2.3}
  result = {"ranks": ranks, "before": {"near": 2.5, "far": 8.0},
            "cells": {("near", "q"): _cell(q), ("near", "qv"): _cell(qv), ("far", "qv"): _cell({1: far1, 2: 2.8,
                                                                                               4: 2.6, 8: 2.4,
                                                                                               16: 2.2, 64: 2.0})}}
  line = lora_rank_report.verdict(result)
  assert line.startswith(f"Verdict: {want} — ")
  assert f"r=1 − r=64 = {2.0 - qv64:+.4f}" in line


def test_stats_and_noise():
  assert study.stats([1.0, 3.0, None, float("nan")]) == {"mean": 2.0, "std": pytest.approx(np.sqrt(2)), "n": 2}
  assert study.stats([5.0]) == {"mean": 5.0, "std": 0.0, "n": 1}
  a, b = {"mean": 0, "std": 0.3, "n": 3}, {"mean": 0, "std": 0.4, "n": 3}
  assert study.noise(a, b) == pytest.approx(2 * np.sqrt(0.09 / 3 + 0.16 / 3))  # twice the s.e. of the difference


@pytest.mark.parametrize("short,long,want", [((3.0, 2.8), (2.0, 2.0), "reproduced"),
                                             ((3.0, 2.8), (2.0, 1.8), "partly"),
                                             ((3.0, 3.0), (2.0, 2.0), "not reproduced")])
def test_prompt_loss_verdict_follows_the_numbers(short, long, want):
  weights = (0.0, 0.01, 0.1, 0.5, 1.0)
  cells = {(shape, size): _cell(dict(zip(weights, (w0, w1, w1 + 0.05, w1 + 0.1, w1 + 0.2))))
           for shape, (w0, w1) in (("short", short), ("long", long)) for size in ("small", "large")}
  line = prompt_loss_report.verdict({"cells": cells, "weights": weights})
  assert line.startswith(f"Verdict: {want} — ")
  assert f"by {short[0] - short[1]:+.4f} nats" in line
