"""Train state, the jitted step, and the loop.

  python -m jaxllm.train --config configs/pretrain_tiny.py --workdir runs/pretrain_tiny [--config.a.b=value ...]

Running the same command again on the same workdir resumes from the newest checkpoint, data position included.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import signal
import sys
import threading
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from jaxllm import checkpoint as ckpt_lib
from jaxllm import distributed
from jaxllm import config as config_lib
from jaxllm import generate, lora, metrics as metrics_lib, model as model_lib, objectives, optim, reference, sharding
from jaxllm.data import chat, loaders, sources


@struct.dataclass
class TrainState:
  step: jax.Array       # optimizer steps taken (= batches consumed)
  params: Any           # the trainable tree
  opt_state: Any
  skipped: jax.Array    # steps whose update was dropped for a non-finite loss or gradient
  spikes: jax.Array     # steps whose update was dropped for a loss spike (train.spike_k)
  recent_losses: jax.Array  # [train.spike_window] losses of the last applied steps (a ring), for spike detection
  applied: jax.Array    # steps whose update was applied (the ring's write position)


def init_state(rng, *, init_trainable, tx, spike_window: int = 32) -> TrainState:
  """Boxed (logically partitioned) state: eval_shape of this gives the shardings, unboxing gives the state."""
  params = init_trainable(rng)
  zero = jnp.zeros((), jnp.int32)
  return TrainState(step=zero, params=params, opt_state=tx.init(params), skipped=zero, spikes=zero,
                    recent_losses=jnp.zeros((spike_window,), jnp.float32), applied=zero)


def train_step(state: TrainState, batch, frozen, *, loss_fn, tx, lr_schedule, grad_accum: int, seed: int = 0,
               spike_k: float = 0.0):
  """One optimizer step on `batch` ([batch_size, T] leaves), split into `grad_accum` micro-batches.

  Gradients are of the summed loss and divided by the summed weight of the whole batch, so accumulation and
  data parallelism give the same update as one big batch. A non-finite loss or gradient leaves params and
  optimizer state unchanged (the loop then aborts or skips, per train.nan_policy). With spike_k > 0, so does a
  loss above mean + spike_k·std of the last applied steps' losses (once the window is full): counted in
  `spikes`. The loss sees frozen["rng"], a key of (seed, step, micro-batch) for dropout: a resumed run draws
  the same keys.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  step_rng = jax.random.fold_in(jax.random.key(seed), state.step)

  def sums(micro_batch, index=0):
    frozen_and_rng = {**(frozen or {}), "rng": jax.random.fold_in(step_rng, index)}
    (loss_sum, (weight, aux)), grads = grad_fn(state.params, micro_batch, frozen_and_rng)
    return loss_sum, weight, aux, grads

  if grad_accum == 1:
    loss_sum, weight, aux, grads = sums(batch)
  else:
    # Micro-batch a takes rows a, a+A, a+2A, ...: every micro-batch spans every data-parallel shard.
    micro = jax.tree.map(lambda x: x.reshape(-1, grad_accum, *x.shape[1:]).swapaxes(0, 1), batch)
    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(sums, jax.tree.map(lambda x: x[0], micro)))
    add = lambda acc, mb_i: (jax.tree.map(jnp.add, acc, sums(*mb_i)), None)
    (loss_sum, weight, aux, grads), _ = jax.lax.scan(add, zeros, (micro, jnp.arange(grad_accum)))

  weight = jnp.maximum(weight, 1e-8)
  grads = jax.tree.map(lambda g: g / weight, grads)
  loss, grad_norm = loss_sum / weight, optax.tree.norm(grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)

  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  window = state.recent_losses.shape[0]
  threshold = jnp.mean(state.recent_losses) + spike_k * jnp.std(state.recent_losses)
  spike = finite & (spike_k > 0) & (state.applied >= window) & (loss > threshold)
  apply = finite & ~spike
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(apply, n, o), new, old)
  recent = jnp.where(apply, state.recent_losses.at[state.applied % window].set(loss), state.recent_losses)
  new_state = TrainState(step=state.step + 1, params=keep(params, state.params),
                         opt_state=keep(opt_state, state.opt_state), skipped=state.skipped + (~finite),
                         spikes=state.spikes + spike, recent_losses=recent, applied=state.applied + apply)
  metrics = {"loss": loss, "grad_norm": grad_norm, "learning_rate": lr_schedule(state.step),
             "finite": finite, "skipped_steps": new_state.skipped, **{k: v / weight for k, v in aux.items()}}
  if spike_k > 0:
    metrics.update(spike=spike, spike_steps=new_state.spikes)
  return new_state, metrics


def eval_step(params, batch, frozen, *, eval_fn):
  loss_sum, (weight, aux) = eval_fn(params, batch, frozen)
  return loss_sum, weight, aux


def frozen_trees(config, model_cfg, source_params, mesh, rules):
  """The trees the step reads but never trains, and their shardings: the LoRA base ("base", int8 if
  lora.quantize_base) or the DPO reference ("reference"), both the params of the run init_from names."""
  needs_base = config.lora.enabled
  needs_reference = config.stage == "dpo" and not config.lora.enabled and config.dpo.kind != "simpo"
  if not (needs_base or needs_reference):
    return {}, {}
  base_axes = model_lib.logical_axes(model_cfg)
  params = source_params()
  trees, axes = {}, {}
  if needs_base:
    trees["base"] = lora.quantize_int8(params, config.lora.targets) if config.lora.quantize_base else params
    axes["base"] = lora.logical_axes(trees["base"], base_axes)
  if needs_reference:
    trees["reference"], axes["reference"] = params, base_axes
  shardings = sharding.logical_to_sharding(axes, mesh, rules)
  return jax.device_put(trees, shardings), shardings


# ----------------------------------------------------------------------------------------------- setup


def resolved_config_dict(config, model_cfg: model_lib.ModelConfig) -> dict:
  """config.json: the config as run, with the model fields resolved from the preset and the tokenizer."""
  out = config.to_dict()
  out["model"].update(dataclasses.asdict(model_cfg))
  return out


def _log(message: str):
  if jax.process_index() == 0:
    print(message, flush=True)


def _continued_base(config, source_run) -> tuple[str, int]:
  """lora.continue_delta: the base of the LoRA run init_from names, after checking that its delta has this
  config's shape and scale."""
  run_dir = source_run[0]
  with open(os.path.join(run_dir, "config.json")) as f:
    source_lora = json.load(f).get("lora", {})
  if not source_lora.get("enabled"):
    raise config_lib.ConfigError(f"lora.continue_delta: init_from {run_dir} is not a LoRA run (no delta to "
                                 "continue); set lora.continue_delta=False to train a new delta on it")
  for key in ("rank", "alpha", "targets", "rslora"):
    if source_lora.get(key) != config.lora[key]:
      raise config_lib.ConfigError(f"lora.{key}: {config.lora[key]!r} differs from {source_lora.get(key)!r} of "
                                   f"the delta continued from {run_dir}")
  return ckpt_lib.lora_base(run_dir)


# ------------------------------------------------------------------------------------------------ loop


def run(config, workdir: str, *, stop_after: int | None = None, devices=None) -> dict:
  """Trains per `config` in `workdir` (resuming if it holds a checkpoint). Returns the last metrics.

  `stop_after=k` ends the process's work after step k as if it were killed there (for tests of resume);
  `devices` restricts the mesh to these devices (default: all). SIGTERM (preemption) raises Preempted: in the
  loop after saving the current step; while loading or compiling, before the first step, with nothing to save.
  """
  with _sigterm_flag() as preempted:  # from the start: a SIGTERM while loading data or compiling is caught too
    return _run(config, workdir, preempted, stop_after=stop_after, devices=devices)


def _run(config, workdir: str, preempted, *, stop_after: int | None, devices) -> dict:
  devices = jax.devices() if devices is None else list(devices)
  config_lib.validate(config, num_devices=len(devices))
  os.makedirs(workdir, exist_ok=True)
  t = config.train
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=t.keep_checkpoints)
  start_step = checkpointer.latest_step()
  source_run = ckpt_lib.resolve_run(config.init_from) if config.init_from else None  # (run dir, step)
  bad_records = sources.BadRecords()  # data.on_bad_record="skip": what was skipped, per category
  train_source, val_source = loaders.load_sources(config, bad_records)
  if bad_records.bad:
    _log(f"data: skipped {len(bad_records.bad)} bad records {bad_records.counts()} "
         f"(data.on_bad_record=skip), e.g. " + "; ".join(f"{p}:{line}: {m}" for (p, line), (_, m) in
                                                      list(bad_records.bad.items())[:3]))
  tokenizer = loaders.prepare_tokenizer(config, workdir, train_source, source_run and source_run[0])
  if source_run:
    model_cfg = config_lib.model_from_run(config, source_run[0])
  else:
    model_cfg = config_lib.resolve_model(config, tokenizer.vocab_size)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(resolved_config_dict(config, model_cfg), f, indent=2)

  mesh = sharding.make_mesh(config.mesh, devices)
  rules = sharding.rules_of(config)
  objective = objectives.make(model_cfg, config)
  tx = optim.optimizer(config.optimizer, t.steps)
  lr_schedule = optim.schedule(config.optimizer, t.steps)
  init_boxed = functools.partial(init_state, init_trainable=objective.init_trainable, tx=tx,
                                 spike_window=t.spike_window)
  rng = jax.random.key(config.seed)
  abstract_boxed = jax.eval_shape(init_boxed, rng)
  state_sharding = sharding.logical_to_sharding(nn.get_partition_spec(abstract_boxed), mesh, rules)
  batch_sharding = sharding.batch_sharding(mesh, rules)

  data_stats = []  # SFT: counts of truncated and dropped examples, per local data shard
  data_iter = iter(loaders.make_dataset(config, train_source, tokenizer, train=True, stats=data_stats))
  drop_index = lambda b: {k: v for k, v in b.items() if k != "pair_index"}
  eval_batches = [sharding.put_batch(drop_index(b), batch_sharding)
                  for b in loaders.eval_batches(config, val_source, tokenizer)]

  continue_delta = config.lora.enabled and config.lora.continue_delta
  base_run = _continued_base(config, source_run) if continue_delta else source_run
  source_params = functools.cache(lambda: ckpt_lib.load_params(*base_run))  # read once, if at all
  frozen, frozen_sharding = frozen_trees(config, model_cfg, source_params, mesh, rules)
  meta = {"tokenizer_sha256": tokenizer.sha256, "model": dataclasses.asdict(model_cfg)}
  if source_run:
    meta["init_from"] = ckpt_lib.identity(*source_run)  # a LoRA checkpoint is only its delta: name its base
  if start_step is not None:
    saved_meta = checkpointer.restore_meta(start_step)
    if saved_meta.get("tokenizer_sha256") != tokenizer.sha256:
      raise ValueError(f"{workdir}/checkpoints/{start_step}: its tokenizer (sha256 "
                       f"{saved_meta.get('tokenizer_sha256')}) is not this run's ({tokenizer.sha256})")
    if frozen and saved_meta.get("init_from") != meta.get("init_from"):
      raise ValueError(f"init_from: {workdir}/checkpoints/{start_step} was trained on top of "
                       f"{saved_meta.get('init_from')}, not {meta.get('init_from')}")
    abstract = ckpt_lib.abstract_with_shardings(jax.eval_shape(lambda r: nn.meta.unbox(init_boxed(r)), rng), state_sharding)
    state, _ = checkpointer.restore(start_step, abstract, data_iter)
    _log(f"resumed from {workdir}/checkpoints/{start_step}")
  else:
    start_step = 0
    state = jax.jit(lambda r: nn.meta.unbox(init_boxed(r)), out_shardings=state_sharding)(rng)
    if source_run and not config.lora.enabled:  # start from another run's params; fresh optimizer state
      # a copy: the trainable state is donated to the step, and a DPO reference must not share its buffers
      start = jax.tree.map(lambda x: np.array(x, copy=True), source_params())
      state = state.replace(params=jax.device_put(start, state_sharding.params))
    if continue_delta:  # the delta of the LoRA run init_from names, trained further; fresh optimizer state
      delta = lora.from_saved(ckpt_lib.restore_params(*source_run), config.lora)
      state = state.replace(params=jax.device_put(delta, state_sharding.params))
    if source_run:
      _log(f"initialized from {ckpt_lib.location(*source_run)}"
           + (f" (its LoRA delta, on its base {ckpt_lib.location(*base_run)})" if continue_delta else
              " (frozen base of a LoRA delta)" if config.lora.enabled else ""))

  cache = config.stage == "dpo" and config.dpo.get("cache_reference")
  if cache:
    ref_chosen, ref_rejected, path, computed = reference.load_or_compute(
        config, model_cfg, frozen, train_source, tokenizer, workdir, meta["init_from"])
    _log(f"reference log-probs of {len(ref_chosen)} pairs {'computed into' if computed else 'read from'} {path}")

  def host_batch(b):  # drop the pair index; with the cache, look up the reference log-probs of the batch's pairs
    if not cache:
      return drop_index(b)
    index = b["pair_index"]
    return {**drop_index(b), "ref_chosen_logps": ref_chosen[index], "ref_rejected_logps": ref_rejected[index]}

  n_params = model_lib.num_params(model_cfg)
  n_trainable = sum(x.size for x in jax.tree.leaves(state.params))
  flops_per_token = model_lib.flops_per_token(model_cfg, t.seq_len)
  peak = metrics_lib.measure_peak_flops(model_cfg.dtype) * len(devices)
  _log(f"model {config.model.size}: {n_params / 1e6:.2f}M params ({n_trainable / 1e6:.3f}M trained), "
       f"vocab {model_cfg.vocab_size}; "
       f"mesh {dict(mesh.shape)}; measured peak {peak / 1e9:.1f} GFLOP/s ({model_cfg.dtype})")

  step_fn = sharding.with_rules(jax.jit(
      functools.partial(train_step, loss_fn=objective.loss_fn, tx=tx, lr_schedule=lr_schedule,
                        grad_accum=t.grad_accum, seed=config.seed, spike_k=t.spike_k),
      in_shardings=(state_sharding, None, frozen_sharding), out_shardings=(state_sharding, None),
      donate_argnums=0), mesh, rules)
  eval_fn = sharding.with_rules(jax.jit(functools.partial(eval_step, eval_fn=objective.eval_fn),
                                        in_shardings=(state_sharding.params, None, frozen_sharding)),
                                mesh, rules)

  def evaluate(params) -> dict:
    sums = jax.device_get([eval_fn(params, b, frozen) for b in eval_batches])
    weight = sum(w for _, w, _ in sums)
    loss = float(sum(s for s, _, _ in sums) / weight)
    row = {"eval/loss": loss}
    if config.stage != "dpo":
      row["eval/perplexity"] = math.exp(min(loss, 50.0))
    for key in sums[0][2]:
      row[f"eval/{key}"] = float(sum(a[key] for _, _, a in sums) / weight)
    return row

  writer = metrics_lib.MetricsWriter(workdir, resume_step=start_step if start_step else None)
  progress = metrics_lib.Progress(t.steps, start_step)
  tokens_per_step = t.batch_size * t.seq_len * (2 if config.stage == "dpo" else 1)  # DPO: chosen + rejected
  last, window = {}, (None, 0)  # (time the window started, steps in it)

  def finish_step(step: int, m: dict):
    """Host side of step `step` (runs while step+1 computes): NaN policy, logging."""
    nonlocal window, last
    m = jax.device_get(m)
    now = time.time()
    if window[0] is None:
      window = (now, 0)  # the first step of a run includes compilation: time from its end
    else:
      window = (window[0], window[1] + 1)
    if not m["finite"] and t.nan_policy == "abort":
      if checkpointer.latest_step() != int(state.step):
        checkpointer.save(int(state.step), state, data_iter, meta)
      checkpointer.wait()
      raise FloatingPointError(f"non-finite loss ({m['loss']}) or gradient norm ({m['grad_norm']}) at step "
                               f"{step}; the update was not applied, and checkpoint {int(state.step)} holds the "
                               f"last good state (train.nan_policy=skip would skip such steps)")
    if m.get("spike"):
      _log(f"step {step}: loss {float(m['loss']):.4f} is above mean + {t.spike_k}·std of the last "
           f"{t.spike_window} steps: update skipped ({int(m['spike_steps'])} so far)")
    if step % t.log_every == 0 or step == t.steps:
      elapsed = now - window[0]
      tps = tokens_per_step * window[1] / elapsed if window[1] and elapsed > 0 else 0.0
      row = {k: float(v) for k, v in m.items() if k not in ("finite", "spike")}
      row.update(tokens_per_sec=tps, mfu=tps * flops_per_token / peak)
      if data_stats:
        row.update({"data/truncated": sum(s.truncated for s in data_stats),
                    "data/dropped": sum(s.dropped for s in data_stats)})
      if config.data.on_bad_record == "skip":
        row.update({f"data/bad_{k}": v for k, v in bad_records.counts().items()})
      writer.write(step, row)
      _log(progress.line(step, row))
      last = row
      window = (now, 0)

  if preempted(start_step):  # SIGTERM while loading data or compiling: stop before the first step
    checkpointer.close()
    writer.close()
    raise Preempted(f"stopped by SIGTERM before step {start_step + 1}, with nothing new to save; the same command "
                    + (f"resumes from checkpoint {start_step}" if start_step else "starts the run again"))
  if start_step == 0 and eval_batches:
    row = evaluate(state.params)  # the baseline every later validation loss is compared with
    writer.write(0, row)
    _log(f"step 0/{t.steps} | " + " | ".join(f"{k} {v:.4f}" for k, v in row.items()))
  if start_step == 0 and source_run:
    print_samples(config, model_cfg, state.params, tokenizer, frozen, when="before training")

  pending = None
  for step in range(start_step + 1, min(t.steps, stop_after or t.steps) + 1):
    batch = sharding.put_batch(host_batch(next(data_iter)), batch_sharding)
    state, m = step_fn(state, batch, frozen)
    if pending is not None:
      finish_step(*pending)
    pending = (step, m)
    stop = preempted(step)  # every step, on every process: multi-process runs agree on the step to stop at
    save = step % t.checkpoint_every == 0 or step == t.steps or stop
    evaluate_now = eval_batches and (step % t.eval_every == 0 or step == t.steps)
    if save or evaluate_now:  # a step's rows are written before its checkpoint: a resume from it lacks none
      finish_step(*pending)
      pending = None
    if evaluate_now:
      row = evaluate(state.params)
      writer.write(step, row)
      _log(f"step {step}/{t.steps} | " + " | ".join(f"{k} {v:.4f}" for k, v in row.items()))
      last.update(row)
    if save:
      checkpointer.save(step, state, data_iter, meta)
    if stop:  # SIGTERM (preemption): keep this step, stop, and let the same command resume
      checkpointer.close()
      writer.close()
      raise Preempted(f"stopped by SIGTERM after step {step}; checkpoint {step} is committed and the same "
                      "command resumes from it")
  if pending is not None:
    finish_step(*pending)
  checkpointer.close()
  writer.close()
  if stop_after is not None and stop_after < t.steps:
    return last

  if jax.process_index() == 0:
    plot = metrics_lib.plot_losses(workdir)
    if plot:
      _log(f"loss curve: {plot}")
  print_samples(config, model_cfg, state.params, tokenizer, frozen, when="after training")
  return last


PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped on purpose, resumable


class Preempted(Exception):
  """The run got SIGTERM, saved a checkpoint of its current step and stopped; the same command resumes."""


@contextlib.contextmanager
def _sigterm_flag():
  """A function of the step, called once per step, that is true once SIGTERM has arrived. Single-process: a
  Python handler (main thread only; the previous handler is restored on exit). Multi-process: jax's preemption
  sync point, true on every process at the same step once any of them got SIGTERM (jax.distributed catches it)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
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


def print_samples(config, model_cfg, params, tokenizer, frozen, *, when: str):
  """Pretraining: continuations of train.sample_prompts. SFT: answers to them as user turns (greedy)."""
  t = config.train
  if not t.num_samples:
    return
  stops = [tokenizer.eos_id]
  texts = list(t.sample_prompts)[: t.num_samples]
  if config.stage == "pretrain":
    prompts = [tokenizer.encode(p) for p in texts]
  else:
    prompts = [chat.render_prompt([{"role": "user", "content": p}], tokenizer) for p in texts]
    stops.append(tokenizer.token_id(chat.DEFAULT_TEMPLATE.end))
  if config.lora.enabled:
    params = lora.merge(lora.dequantize(frozen["base"]), params)
  outs = generate.generate(model_cfg, params, prompts, max_new_tokens=t.sample_tokens, rng=jax.random.key(config.seed),
                         temperature=0.0 if config.stage != "pretrain" else 0.8, top_k=40, stop_ids=stops,
                         vocab_limit=tokenizer.vocab_size)
  _log(f"--- samples {when} ---")
  for text, out in zip(texts, outs):
    answer = tokenizer.decode([i for i in out if i not in stops])
    _log(f"{text}{answer}" if config.stage == "pretrain" else f"Q: {text}\nA: {answer}")


def main(argv):
  del argv
  from absl import flags, logging
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  distributed.initialize()
  try:
    run(flags.FLAGS.config, flags.FLAGS.workdir)
  except Preempted as e:
    print(f"preempted: {e}", file=sys.stderr, flush=True)
    sys.exit(PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/pretrain_tiny.py[:arg]",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "run directory: metrics, checkpoints, tokenizer")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
