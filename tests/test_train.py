"""End-to-end training on the synthetic corpus: the workdir contract, falling loss, exact resume, tokenizer
checks, the NaN guard, and gradient accumulation."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import flax.linen as nn

from jaxllm import config as config_lib, errors, metrics as metrics_lib, optim, peft, step as step_lib, tasks, train
from jaxllm.data.tokenizer import train_tokenizer
from tests.conftest import tiny_config

EXACT_KEYS = ("loss", "grad_norm", "learning_rate", "skipped_steps", "eval/loss")


def _final_params(workdir):
  mngr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
  restored = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  return restored["state"]["params"]


@pytest.fixture(scope="module")
def straight_run(corpus_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("straight"))
  last = train.run(tiny_config(corpus_dir, **{"train.steps": 24, "train.eval_every": 8,
                                              "train.checkpoint_every": 8}), workdir)
  return workdir, last


def test_workdir_contract_and_falling_loss(straight_run, capsys):
  workdir, last = straight_run
  for name in ("config.json", "metrics.jsonl", "tokenizer.model", "loss.png", "checkpoints"):
    assert os.path.exists(os.path.join(workdir, name)), name
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(workdir, "tb")))
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["16", "24", "8"]  # keep_checkpoints=3
  resolved = json.load(open(os.path.join(workdir, "config.json")))
  assert resolved["model"]["d_model"] == 32 and resolved["model"]["vocab_size"] == 320
  rows = metrics_lib.read_metrics(workdir)
  train_rows = [r for r in rows if "loss" in r]
  eval_rows = [r for r in rows if "eval/loss" in r]
  assert [r["step"] for r in train_rows] == list(range(1, 25))
  for key in ("loss", "learning_rate", "grad_norm", "tokens_per_sec", "mfu"):
    assert all(key in r for r in train_rows), key
  assert [r["step"] for r in eval_rows] == [0, 8, 16, 24]
  assert train_rows[0]["loss"] == pytest.approx(np.log(320) + 0.5, abs=0.5)  # logits ~ N(0, 1) at init
  assert eval_rows[-1]["eval/loss"] < train_rows[0]["loss"] - 1.5
  assert eval_rows[-1]["eval/loss"] < eval_rows[0]["eval/loss"]
  assert eval_rows[-1]["eval/perplexity"] == pytest.approx(np.exp(eval_rows[-1]["eval/loss"]), rel=1e-5)
  assert last["eval/loss"] == eval_rows[-1]["eval/loss"]
  assert 0 < train_rows[-1]["mfu"] < 1 and train_rows[-1]["tokens_per_sec"] > 0


def test_resume_gives_identical_metrics_and_params(straight_run, corpus_dir, tmp_path):
  """24 steps straight == 12 steps, a 'crash' (rows 9-12 logged after checkpoint 8), then resume."""
  straight, _ = straight_run
  cfg = tiny_config(corpus_dir, **{"train.steps": 24, "train.eval_every": 8, "train.checkpoint_every": 8})
  workdir = str(tmp_path / "resumed")
  train.run(cfg, workdir, stop_after=12)
  assert max(r["step"] for r in metrics_lib.read_metrics(workdir)) == 12
  train.run(cfg, workdir)
  a, b = metrics_lib.read_metrics(straight), metrics_lib.read_metrics(workdir)
  assert [r["step"] for r in a] == [r["step"] for r in b]
  for ra, rb in zip(a, b):
    for key in EXACT_KEYS:
      assert ra.get(key) == rb.get(key), (ra["step"], key)
  jax.tree.map(np.testing.assert_array_equal, _final_params(straight), _final_params(workdir))
  # TensorBoard, read back as it reads: the rows the crash logged after checkpoint 8 are purged, once each
  losses = tensorboard_scalars(os.path.join(workdir, "tb"))["loss"]
  assert [step for step, _ in losses] == [r["step"] for r in b if "loss" in r]
  np.testing.assert_allclose([v for _, v in losses], [r["loss"] for r in b if "loss" in r], rtol=1e-6)


def tensorboard_scalars(logdir: str) -> dict[str, list]:
  """{tag: [(step, value)]} of the event files in `logdir`, read in the order they were written, with
  TensorBoard's purge rule: a SessionLog START at step s drops the events at steps >= s logged before it."""
  from tensorboardX.proto import event_pb2

  scalars = {}
  for name in sorted(os.listdir(logdir), key=lambda n: int(n.split(".")[3])):  # events.out.tfevents.<time>.<host>
    data = open(os.path.join(logdir, name), "rb").read()
    offset = 0
    while offset < len(data):  # TFRecord: length (8), its crc (4), the record, its crc (4)
      length = int.from_bytes(data[offset:offset + 8], "little")
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 16 + length
      if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
        scalars = {tag: [(s, v) for s, v in rows if s < event.step] for tag, rows in scalars.items()}
      for value in event.summary.value:
        scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars


def test_resume_refuses_a_different_tokenizer(straight_run, corpus_dir, tmp_path):
  workdir, _ = straight_run
  other = train_tokenizer(["completely different text for another tokenizer"] * 50, vocab_size=300)
  path = str(tmp_path / "other.model")
  other.save(path)
  cfg = tiny_config(corpus_dir, **{"train.steps": 24, "data.tokenizer.path": path})
  with pytest.raises(ValueError, match="data.tokenizer.path: the tokenizer .* differs from this run"):
    train.run(cfg, workdir)
  # A swapped tokenizer file in the workdir is caught by the checkpoint's recorded hash.
  copy = str(tmp_path / "copy")
  os.makedirs(copy)
  os.symlink(os.path.join(workdir, "checkpoints"), os.path.join(copy, "checkpoints"))
  other.save(os.path.join(copy, "tokenizer.model"))
  with pytest.raises(ValueError, match="is not this run's"):
    train.run(tiny_config(corpus_dir, **{"train.steps": 24}), copy)


def test_non_finite_loss_aborts_and_keeps_last_good_state(corpus_dir, tmp_path):
  cfg = tiny_config(corpus_dir, **{"optimizer.learning_rate": 1e30, "optimizer.grad_clip": 0.0,
                                   "optimizer.warmup_steps": 0, "optimizer.schedule": "constant"})
  workdir = str(tmp_path / "nan")
  with pytest.raises(FloatingPointError, match=r"at step \d+"):
    train.run(cfg, workdir)
  params = _final_params(workdir)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_loss_spikes_are_skipped_against_a_numpy_threshold():
  """A toy regression through the real step: a step whose loss exceeds mean + k·std of the last W applied
  losses (numpy, from the metrics) leaves params and optimizer state unchanged and counts a spike; the others
  apply; non-finite steps count as skipped, not as spikes; nothing is skipped before the window is full."""
  k, window = 3.0, 4
  tx = optax.sgd(0.05)
  loss_fn = lambda w, batch, frozen, rng: (jnp.sum((batch["x"] @ w["w"] - batch["y"]) ** 2), (batch["x"].shape[0], {}))
  init = lambda r: step_lib.init_state(r, init_trainable=lambda _: {"w": jnp.zeros((3,))}, tx=tx, spike_window=window)
  state = jax.jit(init)(jax.random.key(0))
  step = jax.jit(functools.partial(step_lib.train_step, loss_fn=loss_fn, tx=tx, lr_schedule=lambda s: 0.05,
                                   grad_accum=1, spike_k=k))
  rng = np.random.default_rng(0)
  x = rng.standard_normal((16, 8, 3)).astype(np.float32)
  y = x @ np.array([1.0, -2.0, 0.5], np.float32)
  y[2] += 50.0    # a spike before the window is full: applied
  y[9] += 50.0    # spikes after it: skipped
  y[12] += 50.0
  y[14] = np.nan  # non-finite: skipped, counted apart
  applied_losses, spikes = [], 0
  for i in range(16):
    before = state
    state, m = step(state, {"x": x[i], "y": y[i]}, None)
    loss = float(m["loss"])
    recent = np.array(applied_losses[-window:])
    want_spike = len(applied_losses) >= window and np.isfinite(loss) and loss > recent.mean() + k * recent.std()
    assert bool(m["spike"]) == want_spike, (i, loss, recent)
    spikes += want_spike
    if want_spike or not np.isfinite(loss):
      jax.tree.map(np.testing.assert_array_equal, state.params, before.params)
      jax.tree.map(np.testing.assert_array_equal, state.opt_state, before.opt_state)
    else:
      applied_losses.append(loss)
      assert np.any(np.asarray(state.params["w"]) != np.asarray(before.params["w"]))
  assert spikes == 2 and int(state.spikes) == 2 and int(m["spike_steps"]) == 2 and int(state.skipped) == 1
  assert int(state.applied) == 13


def test_gradient_accumulation_equals_one_big_batch(corpus_dir):
  cfg = tiny_config(corpus_dir)
  model_cfg = config_lib.resolve_model(cfg, 320)
  loss_fn = tasks.make(cfg).loss_fn(model_cfg)
  tx = optim.optimizer(cfg.optimizer, cfg.train.steps)
  init_trainable = peft.make(cfg, model_cfg, needs_reference=False).init_trainable
  state = jax.jit(lambda r: nn.meta.unbox(step_lib.init_state(r, init_trainable=init_trainable,
                                                              tx=tx)))(jax.random.key(0))
  rng = np.random.default_rng(0)
  batch = {"inputs": rng.integers(0, 320, (8, 16)), "targets": rng.integers(0, 320, (8, 16)),
           "segment_ids": np.ones((8, 16), np.int32), "positions": np.tile(np.arange(16), (8, 1)),
           "loss_mask": (rng.random((8, 16)) > 0.4).astype(np.float32)}  # uneven weights per micro-batch
  step = lambda accum: jax.jit(functools.partial(
      step_lib.train_step, loss_fn=loss_fn, tx=tx, lr_schedule=optim.schedule(cfg.optimizer, 8),
      grad_accum=accum))(state, batch, None)
  (one, m1), (four, m4) = step(1), step(4)
  assert float(m1["loss"]) == pytest.approx(float(m4["loss"]), rel=1e-6)
  assert float(m1["grad_norm"]) == pytest.approx(float(m4["grad_norm"]), rel=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), one.params, four.params)


def test_sigterm_saves_the_current_step_and_the_same_command_resumes(corpus_dir, tmp_path):
  """Preemption: SIGTERM -> a checkpoint of the current step, exit code 75 within 60 s; rerun -> resumes."""
  import signal
  import subprocess
  import sys
  import time

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  workdir = str(tmp_path / "preempted")
  overrides = {"data.sources": str(corpus_dir / "*.txt"), "data.validation_fraction": 0.1,
               "data.tokenizer.vocab_size": 320, "model.d_model": 32, "model.num_layers": 2, "model.mlp_dim": 64,
               "model.num_heads": 2, "model.num_kv_heads": 1, "model.head_dim": 16, "train.batch_size": 4,
               "train.seq_len": 32, "train.log_every": 1, "train.eval_batches": 0, "train.num_samples": 0,
               "train.checkpoint_every": 100_000, "optimizer.warmup_steps": 2}
  command = lambda steps: [sys.executable, "-m", "jaxllm.train", "--config", "configs/pretrain_tiny.py",
                           "--workdir", workdir, f"--config.train.steps={steps}",
                           *(f"--config.{k}={v}" for k, v in overrides.items())]
  proc = subprocess.Popen(command(100_000), cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  for line in proc.stdout:  # wait until training is under way
    if line.startswith("step 5/"):
      break
  sent = time.time()
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == errors.PREEMPTED_EXIT_CODE, err[-2000:]
  assert time.time() - sent < 60 and "preempted: stopped by SIGTERM after step" in err
  saved = [int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()]
  assert len(saved) == 1 and saved[0] >= 5  # the step it was at, not a periodic checkpoint
  k = saved[0]
  assert max(r["step"] for r in metrics_lib.read_metrics(workdir)) == k
  done = subprocess.run(command(k + 2), cwd=root, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  assert f"resumed from {workdir}/checkpoints/{k}" in done.stdout
  assert [r["step"] for r in metrics_lib.read_metrics(workdir)][-3:] == [k, k + 1, k + 2]
