"""Sweeps: expansion and names, validation before anything runs, and the runner with real processes: a failing
point does not stop the others, a rerun skips finished points and retries failed ones, a point killed mid-run
(SIGKILL) resumes from its checkpoint; the SLURM array scripts of a chained sweep. (Aggregation: test_sweep_report.)"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from jaxllm import sweep
from jaxllm.errors import ConfigError
from jaxllm.sweep import command, points as points_lib, runner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SWEEP_FILE = '''
import pathlib
from jaxllm import sweep
from tests.conftest import tiny_config

def get_config(arg):
  return tiny_config(pathlib.Path(arg), **{{"train.steps": {steps}, "train.eval_every": {steps},
                                          "train.checkpoint_every": 2, "train.num_samples": 0,
                                          "train.eval_batches": 0}})

def get_sweep(arg):
  return {points}
'''


def sweep_file(tmp_path, points: str, steps: int = 4) -> str:
  path = tmp_path / "sweep_config.py"
  path.write_text(SWEEP_FILE.format(points=points, steps=steps))
  return str(path)


def test_helpers_expand_and_name_points():
  raw = sweep.product(sweep.axis("optimizer.learning_rate", [1e-3, 3e-5]), sweep.seeds(2))
  assert raw == [{"optimizer.learning_rate": 1e-3, "seed": 0}, {"optimizer.learning_rate": 1e-3, "seed": 1},
                 {"optimizer.learning_rate": 3e-5, "seed": 0}, {"optimizer.learning_rate": 3e-5, "seed": 1}]
  points, axes, short = points_lib.expand("c.py", raw)
  assert [p.name for p in points] == ["lr=0.001,seed=0", "lr=0.001,seed=1", "lr=3e-05,seed=0", "lr=3e-05,seed=1"]
  assert axes == ["optimizer.learning_rate", "seed"] and short == {"optimizer.learning_rate": "lr", "seed": "seed"}
  # a key that does not vary is not an axis; zipped axes move together; shared short names fall back to full keys
  raw = sweep.product(sweep.zipped(**{"train.steps": [10, 20], "optimizer.warmup_steps": [1, 2]}),
                      {"lora.rank": [4], "model.num_layers": [2, 4], "lora.alpha": [8.0]})
  points, axes, _ = points_lib.expand("c.py", raw)
  assert [p.name for p in points] == ["steps=10,warmup=1,num_layers=2", "steps=10,warmup=1,num_layers=4",
                                      "steps=20,warmup=2,num_layers=2", "steps=20,warmup=2,num_layers=4"]
  assert points_lib.short_names(["a.rank", "b.rank", "seed"]) == {"a.rank": "a.rank", "b.rank": "b.rank",
                                                                    "seed": "seed"}
  with pytest.raises(ValueError, match="different lengths"):
    sweep.zipped(a=[1, 2], b=[1])


def test_chained_points_are_ordered_and_references_checked():
  raw = [{"name": "dpo", "config": "dpo.py", "init_from": "@sft"}, {"name": "sft", "config": "sft.py",
                                                                    "init_from": "@pt"}, {"name": "pt"}]
  points, _, _ = points_lib.expand("pt.py", raw)
  assert [(p.name, p.config, p.after) for p in points] == [("pt", "pt.py", []), ("sft", "sft.py", ["pt"]),
                                                           ("dpo", "dpo.py", ["sft"])]
  with pytest.raises(ConfigError, match="names no point"):
    points_lib.expand("c.py", [{"name": "a", "init_from": "@b"}])
  with pytest.raises(ConfigError, match="form a cycle"):
    points_lib.expand("c.py", [{"name": "a", "init_from": "@b"}, {"name": "b", "init_from": "@a"}])
  with pytest.raises(ConfigError, match="repeats another point"):
    points_lib.expand("c.py", [{"seed": 1, "name": "x"}, {"seed": 2, "name": "x"}])
  assert runner.command(points[2], "/s")[-1] == "--config.init_from=/s/sft"


@pytest.mark.parametrize("bad,message", [
    ('{"train.stepz": 3}', r"sweep point 'stepz=3': train.stepz: no such config key; did you mean 'steps'"),
    ('{"train.steps": 2.5}', r"sweep point 'steps=2.5': train.steps: 2.5 does not fit the field"),
    ('{"train.batch_size": -1}', r"sweep point 'bs=-1': train.batch_size: must be > 0, got -1"),
])
def test_points_are_validated_before_anything_runs(tmp_path, corpus_dir, bad, message):
  path = sweep_file(tmp_path, f'[{{"seed": 0}}, {bad}]')
  with pytest.raises(ConfigError, match=message):
    command.main(["--config", f"{path}:{corpus_dir}", "--workdir", str(tmp_path / "s")])
  assert not os.path.exists(tmp_path / "s")


def _env():
  env = {**os.environ, "PYTHONPATH": ROOT}
  import jax
  if jax.config.jax_compilation_cache_dir:  # conftest's persistent cache: the points reuse each other's programs
    env.update(JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return env


def _sweep(argv, **kw):
  return subprocess.run([sys.executable, "-m", "jaxllm.sweep", *argv], cwd=ROOT, capture_output=True, text=True,
                        timeout=600, env=_env(), **kw)


def test_a_failing_point_does_not_stop_the_others_and_a_rerun_retries_it(tmp_path, corpus_dir):
  (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{not json\n')
  path = sweep_file(tmp_path, '[{"seed": 0}, {"seed": 1, "data.sources": %r, "name": "broken"}]'
                    % str(tmp_path / "bad.jsonl"))
  spec, workdir = f"{path}:{corpus_dir}", str(tmp_path / "s")
  proc = _sweep(["--config", spec, "--workdir", workdir, "--parallel", "2"])
  assert proc.returncode == 1, proc.stderr[-3000:]
  status = {n: runner.read_status(os.path.join(workdir, n)) for n in ("seed=0", "broken")}
  assert {n: s["status"] for n, s in status.items()} == {"seed=0": "done", "broken": "failed"}
  failed = "broken"
  assert "bad.jsonl:2" in status[failed]["error"] and status[failed]["returncode"] == 2
  assert "failed" in proc.stderr and "sweep: 1 done, 0 running, 1 failed" in proc.stdout
  results = open(os.path.join(workdir, "results.md")).read()
  assert "seed=0" in results and "failed" in results
  assert json.load(open(os.path.join(workdir, "sweep.json")))["axes"] == ["seed", "data.sources"]
  # the rerun: finished points are skipped (one attempt each), the failed one is tried again
  (tmp_path / "bad.jsonl").write_text('{"text": "the cat sees the moon. a dog finds the ball."}\n' * 40)
  proc = _sweep(["--config", spec, "--workdir", workdir])
  assert proc.returncode == 0, proc.stderr[-3000:]
  attempts = {n: runner.read_status(os.path.join(workdir, n))["attempts"] for n in status}
  assert attempts == {n: 2 if n == failed else 1 for n in status}


@pytest.mark.skipif(not os.environ.get("JAXLLM_SLOW_TESTS"),
                    reason="40 s on 2 cores, past CI's budget: JAXLLM_SLOW_TESTS=1 (a run's own resume after SIGKILL "
                           "is tests/test_reliability.py's; a failed point's retry is the test above)")
def test_a_point_killed_mid_run_resumes_from_its_checkpoint(tmp_path, corpus_dir):
  path = sweep_file(tmp_path, '[{"seed": 0}]', steps=400)
  spec, workdir = f"{path}:{corpus_dir}", str(tmp_path / "s")
  proc = subprocess.Popen([sys.executable, "-m", "jaxllm.sweep", "--config", spec, "--workdir", workdir], cwd=ROOT,
                          env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
  checkpoints = os.path.join(workdir, "point0", "checkpoints")
  deadline = time.time() + 240
  while not (os.path.isdir(checkpoints) and any(d.isdigit() for d in os.listdir(checkpoints))):
    assert time.time() < deadline and proc.poll() is None
    time.sleep(0.2)
  os.killpg(proc.pid, signal.SIGKILL)  # the runner and its training process, at once
  proc.wait()
  assert runner.read_status(os.path.join(workdir, "point0"))["status"] == "running"  # as the kill left it
  path = sweep_file(tmp_path, '[{"seed": 0}]', steps=40)  # shorter: train.steps may change
  done = _sweep(["--config", spec, "--workdir", workdir])
  assert done.returncode == 0, done.stderr[-3000:]
  log = open(os.path.join(workdir, "point0", "train.log")).read()
  assert "--- attempt 2" in log and "resumed from" in log.split("--- attempt 2")[1]
  assert max(r["step"] for r in map(json.loads, open(os.path.join(workdir, "point0", "metrics.jsonl")))) == 40


def test_slurm_array_scripts_of_a_chained_sweep(tmp_path):
  raw = [{"name": "pt", "seed": 0}, {"name": "sft-a", "init_from": "@pt", "seed": 1},
         {"name": "sft-b", "init_from": "@pt", "seed": 2}, {"name": "dpo", "init_from": "@sft-a", "seed": 3}]
  points, _, _ = points_lib.expand("configs/pretrain_tiny.py", raw)
  workdir = str(tmp_path / "s")
  runner.write_status(os.path.join(workdir, "pt"), status="done", attempts=1)  # finished: not in any array
  written = runner.slurm_scripts(points, workdir, repo=ROOT, sbatch_args=["--gpus-per-task=8"])
  assert [os.path.basename(p) for p in written] == ["slurm_array_0.sbatch", "slurm_array_1.sbatch",
                                                    "slurm_submit.sh"]
  first, second = (open(p).read() for p in written[:2])
  assert "#SBATCH --array=0-1" in first and "#SBATCH --array=0-0" in second
  assert open(os.path.join(workdir, "slurm_points_0.txt")).read().split() == ["sft-a", "sft-b"]
  assert open(os.path.join(workdir, "slurm_points_1.txt")).read().split() == ["dpo"]
  assert "#SBATCH --gpus-per-task=8" in first and "#SBATCH --requeue" in first
  assert "-m jaxllm.sweep run-point --workdir" in first and 'scontrol requeue' in first
  submit = open(written[2]).read()
  assert submit.count("sbatch --parsable") == 2 and "--dependency=afterok:" in submit
  assert subprocess.run(["bash", "-n", written[0]]).returncode == 0 and subprocess.run(
      ["bash", "-n", written[2]]).returncode == 0
