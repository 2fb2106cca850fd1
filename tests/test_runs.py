"""The run directory's guards and the command line's refusals: config drift on resume is refused before anything
is written (accepted changes go to config_history.jsonl), a second writer is refused while a run holds the
workdir, and every refusal is one line on stderr with exit code 2."""

import json
import os
import subprocess
import sys
import time

import pytest

from jaxllm import errors, lock, metrics as metrics_lib, runs, train
from tests.conftest import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_resume_refuses_config_drift_and_records_accepted_changes(corpus_dir, tmp_path):
  workdir = str(tmp_path / "run")
  config = tiny_config(corpus_dir, **{"train.steps": 2, "train.eval_batches": 0, "train.num_samples": 0,
                                      "train.checkpoint_every": 2, "model.scan_layers": True})  # not the preset's
  train.run(config, workdir)
  before = open(os.path.join(workdir, "config.json")).read()
  rows = metrics_lib.read_metrics(workdir)
  drifted = tiny_config(corpus_dir, **{"train.steps": 4, "train.eval_batches": 0, "train.num_samples": 0,
                                       "train.checkpoint_every": 2, "seed": 7, "optimizer.learning_rate": 0.5,
                                       "model.scan_layers": False})
  with pytest.raises(errors.RunError) as e:
    train.run(drifted, workdir)
  message = str(e.value)
  assert "\n" not in message and "seed: 0 -> 7" in message and "optimizer.learning_rate: 0.01 -> 0.5" in message
  assert "model.scan_layers: True -> False" in message  # the checkpoints' layout
  assert "train.steps" not in message  # a longer run is allowed
  assert open(os.path.join(workdir, "config.json")).read() == before  # nothing written
  assert metrics_lib.read_metrics(workdir) == rows
  assert not os.path.exists(os.path.join(workdir, runs.HISTORY))
  # cadence and length may change: accepted, recorded, and config.json then holds the new values; with
  # model.scan_layers unset the run keeps its own layout (the tiny preset's would be the loop)
  longer = tiny_config(corpus_dir, **{"train.steps": 3, "train.eval_batches": 0, "train.num_samples": 0,
                                      "train.checkpoint_every": 3, "train.log_every": 3})
  train.run(longer, workdir)
  history = [json.loads(line) for line in open(os.path.join(workdir, runs.HISTORY))]
  assert history[-1]["changed"] == {"train.checkpoint_every": [2, 3], "train.log_every": [1, 3],
                                    "train.steps": [2, 3]}
  assert runs.read_config(workdir)["train"]["steps"] == 3 and runs.read_config(workdir)["model"]["scan_layers"]


def _cli(*args, env=None):
  return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
                        env={**os.environ, **(env or {})})


def test_cli_refusals_are_one_line_with_exit_2(tmp_path):
  """A bad value, a misspelt key and a workdir another process holds: one line naming it, exit 2, no traceback."""
  base = ["jaxllm.train", "--config", "configs/pretrain_tiny.py", "--workdir", str(tmp_path / "a")]
  cases = [(base + ["--config.train.batch_size=-4"], r"error: train.batch_size: must be > 0, got -4"),
           (base + ["--config.train.batchsize=4"], "batchsize")]
  holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from jaxllm import lock; "
                             f"lock.WorkdirLock({str(tmp_path / 'held')!r}).acquire(); print('held', flush=True); "
                             "time.sleep(60)"], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": ROOT})
  try:
    assert holder.stdout.readline().strip() == "held"
    cases.append((["jaxllm.train", "--config", "configs/pretrain_tiny.py", "--workdir", str(tmp_path / "held")],
                  f"is in use by pid {holder.pid}"))
    for argv, want in cases:
      start = time.time()
      proc = _cli(*argv)
      lines = proc.stderr.strip().splitlines()
      assert proc.returncode == 2, proc.stderr[-2000:]
      assert len(lines) == 1 and lines[0].startswith("error: ") and want in lines[0], proc.stderr[-2000:]
      assert "Traceback" not in proc.stderr and time.time() - start < 60
  finally:
    holder.kill()
    holder.wait()
  assert not os.path.exists(tmp_path / "a" / "config.json")
  # --debug adds the traceback to the same refusal
  proc = _cli(*cases[0][0], "--debug")
  assert proc.returncode == 2 and "Traceback" in proc.stderr and proc.stderr.strip().endswith(
      "error: train.batch_size: must be > 0, got -4")


def test_a_running_workdir_is_locked_in_process(corpus_dir, tmp_path):
  """While a WorkdirLock is held (as a run holds it), train.run on that workdir is refused before writing."""
  workdir = str(tmp_path / "busy")
  with lock.WorkdirLock(workdir):
    with pytest.raises(lock.WorkdirLocked, match=f"in use by pid {os.getpid()}"):
      train.run(tiny_config(corpus_dir, **{"train.steps": 1}), workdir)
  assert sorted(os.listdir(workdir)) == [".lock"]
