"""Run with 8 emulated CPU devices (tests/test_sharding.py::test_multidevice_suite does): the same losses on
every mesh, with gradient accumulation, across a change of mesh at a checkpoint, and with 2 processes."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxllm import metrics as metrics_lib, train
from tests.conftest import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 10
# fsdp=8 alone runs in test_checkpoint_moves_between_meshes (steps 1-5), fsdp=4,tensor=2 in
# test_lora_same_losses_on_a_mesh (JAXLLM_SLOW_TESTS=1)
MESHES = {"data=8": (8, 1, 1), "data=2,fsdp=2,tensor=2": (2, 2, 2)}


def config(corpus_dir, mesh=(1, 1, 1), **overrides):
  c = tiny_config(corpus_dir, **{
      "train.steps": STEPS, "train.batch_size": 8, "train.eval_batches": 0, "train.num_samples": 0,
      "train.checkpoint_every": 5, "model.num_heads": 4, "model.num_kv_heads": 2, "model.head_dim": 8,
      "data.num_shards": 2, **overrides})
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
  return c


def losses(workdir):
  return np.array([r["loss"] for r in metrics_lib.read_metrics(workdir) if "loss" in r])


@pytest.fixture(scope="module")
def reference_run(corpus_dir, tmp_path_factory):
  """One device; its workdir."""
  assert jax.device_count() == 8
  workdir = str(tmp_path_factory.mktemp("one_device"))
  train.run(config(corpus_dir), workdir, devices=jax.devices()[:1])
  return workdir


@pytest.fixture(scope="module")
def reference(reference_run):
  return losses(reference_run)


def assert_close(got, want):
  assert got.shape == want.shape == (STEPS,)
  rel = np.max(np.abs(got - want) / np.abs(want))
  print(f"max relative loss difference {rel:.2e}")
  assert rel <= 1e-5


@pytest.fixture(scope="module")
def mesh_runs(corpus_dir, tmp_path_factory):
  """name -> losses of a 10-step run on that mesh (cached: the two-process test reuses data=8)."""
  cache = {}

  def get(name):
    if name not in cache:
      workdir = str(tmp_path_factory.mktemp(name.replace(",", "_").replace("=", "")))
      train.run(config(corpus_dir, MESHES[name]), workdir)
      cache[name] = losses(workdir)
    return cache[name]

  return get


@pytest.mark.parametrize("name", list(MESHES))
def test_same_losses_on_every_mesh(reference, mesh_runs, name):
  assert_close(mesh_runs(name), reference)


def test_gradient_accumulation_4x2_equals_batch_8(reference, corpus_dir, tmp_path):
  train.run(config(corpus_dir, (2, 1, 1), **{"train.grad_accum": 4}), str(tmp_path), devices=jax.devices()[:2])
  assert_close(losses(str(tmp_path)), reference)


def test_checkpoint_moves_between_meshes(reference, corpus_dir, tmp_path):
  """Steps 1-5 on fsdp=8, then resume from checkpoint 5 on (2, 2, 2), then 2 more steps on one device."""
  workdir = str(tmp_path)
  train.run(config(corpus_dir, (1, 8, 1)), workdir, stop_after=5)
  train.run(config(corpus_dir, (2, 2, 2)), workdir)
  assert_close(losses(workdir), reference)
  # and the final checkpoint restores onto a single device
  more = config(corpus_dir, **{"train.steps": STEPS + 2})
  train.run(more, workdir, devices=jax.devices()[:1])
  assert len(losses(workdir)) == STEPS + 2


@pytest.mark.skipif(not os.environ.get("JAXLLM_SLOW_TESTS"),
                    reason="two more runs (~30 s), past CI's budget: JAXLLM_SLOW_TESTS=1")
def test_lora_same_losses_on_a_mesh(reference_run, corpus_dir, tmp_path):
  """LoRA on every target kind (q/k/v/o with their multi-head factors, MLP, the tied embedding and logits), with
  dropout, on fsdp=4,tensor=2 (factors placed by the logical axes of their base weights) == one device."""
  lora = {"init_from": reference_run, "lora.enabled": True, "lora.targets": "all", "lora.dropout": 0.1,
          "optimizer.learning_rate": 3e-2}
  one, mesh = str(tmp_path / "one"), str(tmp_path / "mesh")
  train.run(config(corpus_dir, **lora), one, devices=jax.devices()[:1])
  train.run(config(corpus_dir, (1, 4, 2), **lora), mesh)
  got, want = losses(mesh), losses(one)
  assert want[-1] < want[0] - 0.05  # the delta trains
  assert_close(got, want)


TWO_PROCESS_SCRIPT = """
import pathlib, sys
from jaxllm import distributed, train
from tests.multidevice.test_equivalence import config
distributed.initialize()
train.run(config(pathlib.Path(sys.argv[1]), (8, 1, 1)), sys.argv[2])
"""


def test_two_processes_match_one(corpus_dir, mesh_runs, tmp_path):
  """2 processes x 4 CPU devices (jax.distributed over localhost, gloo) == 1 process x 8 devices."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  two = str(tmp_path / "two")
  procs = []
  for i in range(2):
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4"  # the last count wins
    env = dict(os.environ, XLA_FLAGS=flags, JAXLLM_COORDINATOR=f"127.0.0.1:{port}",
               JAXLLM_NUM_PROCESSES="2", JAXLLM_PROCESS_ID=str(i), JAXLLM_INIT_TIMEOUT="120",
               PYTHONPATH=ROOT)
    procs.append(subprocess.Popen([sys.executable, "-c", TWO_PROCESS_SCRIPT, str(corpus_dir), two], cwd=ROOT,
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
  assert "step 10/10" in outs[0] and "step 10/10" not in outs[1]  # only process 0 logs
  assert_close(losses(two), mesh_runs("data=8"))
  files = os.listdir(os.path.join(two, "checkpoints", "10", "data"))
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(files)  # each process's data position
