"""The training loop: `run(config, workdir)` builds a run (jaxllm/build.py) and steps it to train.steps.

  python -m jaxllm.train --config configs/pretrain_tiny.py --workdir runs/pretrain_tiny [--config.a.b=value ...]

Running the same command again on the same workdir resumes from the newest checkpoint, data position included.
The loop dispatches step t before it pulls step t-1's metrics to the host, so the device never waits on logging.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time

import jax
from jax.experimental import multihost_utils

from jaxllm import evaluation, lock, metrics as metrics_lib
from jaxllm.build import Setup, build, log
from jaxllm.errors import Preempted


def run(config, workdir: str, *, stop_after: int | None = None, devices=None) -> dict:
  """Trains per `config` in `workdir` (resuming if it holds a checkpoint). Returns the last metrics.

  `stop_after=k` ends the process's work after step k as if it were killed there (for tests of resume);
  `devices` restricts the mesh to these devices (default: all). SIGTERM (preemption) raises Preempted: in the
  loop after saving the current step; while loading or compiling, before the first step, with nothing to save.
  """
  evaluation.DuringTraining.validate(config)  # eval.tasks: names checked before any data is read
  with _sigterm_flag() as preempted, _one_writer(workdir):  # from the start: SIGTERM while loading is caught too
    setup = build(config, workdir, devices)
    try:
      return loop(setup, preempted, stop_after=stop_after)
    except BaseException:
      setup.checkpointer.close_after_error()
      raise


@contextlib.contextmanager
def _one_writer(workdir: str):
  """The workdir's lock for the whole run (process 0 holds it for every process): a second run on the same
  workdir is refused, naming this one, before it writes anything."""
  if jax.process_index() != 0:
    yield
    return
  with lock.WorkdirLock(workdir) as held:
    if held.stale:
      log(held.stale_message())
    yield


class StepLog:
  """The host side of each step, run while the next step computes: the NaN policy, tokens/s over the steps since
  the last row, metrics rows and the progress line."""

  def __init__(self, s: Setup, writer: metrics_lib.MetricsWriter):
    self.s, self.writer = s, writer
    self.progress = metrics_lib.Progress(s.config.train.steps, s.start_step)
    self.window_start, self.window_steps = None, 0
    self.last = {}
    self.scoring = evaluation.DuringTraining(s.config, s.model_cfg, s.tokenizer) if s.config.eval.tasks else None

  def finish(self, step: int, m: dict, state):
    """`state` is the newest state: a non-finite step saves it (its update was not applied) and stops."""
    t, s = self.s.config.train, self.s
    m = jax.device_get(m)
    now = time.time()
    if self.window_start is None:  # the first step of a run includes compilation: time from its end
      self.window_start, self.window_steps = now, 0
    else:
      self.window_steps += 1
    if not m["finite"] and t.nan_policy == "abort":
      if s.checkpointer.latest_step() != int(state.step):
        s.checkpointer.save(int(state.step), state, s.data_iter, s.meta)
      s.checkpointer.wait()
      raise FloatingPointError(f"non-finite loss ({m['loss']}) or gradient norm ({m['grad_norm']}) at step "
                               f"{step}; the update was not applied, and checkpoint {int(state.step)} holds the "
                               f"last good state (train.nan_policy=skip would skip such steps)")
    if m.get("spike"):
      log(f"step {step}: loss {float(m['loss']):.4f} is above mean + {t.spike_k}·std of the last "
          f"{t.spike_window} steps: update skipped ({int(m['spike_steps'])} so far)")
    if step % t.log_every == 0 or step == t.steps:
      elapsed = now - self.window_start
      tps = s.task.tokens_per_step() * self.window_steps / elapsed if self.window_steps and elapsed > 0 else 0.0
      row = {k: float(v) for k, v in m.items() if k not in ("finite", "spike")}
      row.update(tokens_per_sec=tps, mfu=tps * s.flops_per_token / s.peak_flops, **s.data_counters())
      self.writer.write(step, row)
      log(self.progress.line(step, row))
      self.last = row
      self.window_start, self.window_steps = now, 0

  def evaluate(self, step: int, params):
    """Validation over the fixed eval batches: eval/loss (per token or pair), the task's metrics, aux means; and
    the eval.tasks metrics, eval/<task>/<metric>."""
    s, row = self.s, {}
    if s.eval_batches:
      sums = jax.device_get([s.eval_step(params, b, s.frozen) for b in s.eval_batches])
      weight = sum(w for _, w, _ in sums)
      loss = float(sum(x for x, _, _ in sums) / weight)
      row = {"eval/loss": loss, **s.task.eval_row(loss)}
      for key in sums[0][2]:
        row[f"eval/{key}"] = float(sum(a[key] for _, _, a in sums) / weight)
    if self.scoring:
      row.update(self.scoring.row(s.tuning.model_params(params, s.frozen)))
    self.writer.write(step, row)
    log(f"step {step}/{s.config.train.steps} | " + " | ".join(f"{k} {v:.4f}" for k, v in row.items()))
    return row


def loop(s: Setup, preempted, *, stop_after: int | None = None) -> dict:
  t = s.config.train
  writer = metrics_lib.MetricsWriter(s.workdir, resume_step=s.start_step or None)
  steps = StepLog(s, writer)
  state, pending = s.state, None

  def close():
    s.checkpointer.close()
    writer.close()

  if preempted(s.start_step):  # SIGTERM while loading data or compiling: stop before the first step
    close()
    raise Preempted(f"stopped by SIGTERM before step {s.start_step + 1}, with nothing new to save; the same "
                    + (f"command resumes from checkpoint {s.start_step}" if s.start_step else "command starts the run again"))
  if s.start_step == 0 and (s.eval_batches or steps.scoring):
    steps.evaluate(0, state.params)  # the baseline every later validation loss is compared with
  if s.start_step == 0 and s.source:
    _log_samples(s, state.params, "before training")

  for step in range(s.start_step + 1, min(t.steps, stop_after or t.steps) + 1):
    state, m = s.train_step(state, s.put_batch(next(s.data_iter)), s.frozen)
    if pending is not None:
      steps.finish(*pending, state)
    pending = (step, m)
    stop = preempted(step)  # every step, on every process: multi-process runs agree on the step to stop at
    save = step % t.checkpoint_every == 0 or step == t.steps or stop
    evaluate = (s.eval_batches or steps.scoring) and (step % t.eval_every == 0 or step == t.steps)
    if save or evaluate:  # a step's rows are written before its checkpoint: a resume from it lacks none
      steps.finish(*pending, state)
      pending = None
    if evaluate:
      steps.last.update(steps.evaluate(step, state.params))
    if save:
      s.checkpointer.save(step, state, s.data_iter, s.meta)
    if stop:  # SIGTERM (preemption): keep this step, stop, and let the same command resume
      close()
      raise Preempted(f"stopped by SIGTERM after step {step}; checkpoint {step} is committed and the same "
                      "command resumes from it")
  if pending is not None:
    steps.finish(*pending, state)
  close()
  if stop_after is not None and stop_after < t.steps:
    return steps.last
  if jax.process_index() == 0 and (plot := metrics_lib.plot_losses(s.workdir)):
    log(f"loss curve: {plot}")
  _log_samples(s, state.params, "after training")
  return steps.last


def _log_samples(s: Setup, params, when: str):
  if s.config.train.num_samples:
    lines = s.samples(params)
    log(f"--- samples {when} ---")
    for line in lines:
      log(line)


@contextlib.contextmanager
def _sigterm_flag():
  """A function of the step, called once per step, that is true once SIGTERM has arrived. Single-process: a
  Python handler (main thread only; the previous handler is restored on exit). Multi-process: jax's preemption
  sync point, true on every process at the same step once any of them got SIGTERM (jax.distributed catches it)."""
  if jax.process_count() > 1:
    yield multihost_utils.reached_preemption_sync_point if jax.config.jax_enable_preemption_service else (
        lambda step: False)  # the service off: SIGTERM keeps its default action
    return
  if threading.current_thread() is not threading.main_thread():
    yield lambda step: False
    return
  flag = []
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: flag.append(signum))
  try:
    yield lambda step: bool(flag)
  finally:
    signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":  # python -m jaxllm.train: the `jaxllm train` command of jaxllm/cli.py
  import runpy
  import sys

  sys.argv[1:1] = ["train"]
  runpy.run_module("jaxllm.cli", run_name="__main__")
