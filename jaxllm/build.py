"""From a config and a workdir to everything the training loop needs: `build(config, workdir) -> Setup`.

The order is that of a run's start: validate the config, read the data, choose the tokenizer and the model,
lay out the mesh, restore or initialise the train state, compile the steps. Nothing here trains.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable

import flax.linen as nn
import jax

from jaxllm import checkpoint, config as config_lib, metrics as metrics_lib, model as model_lib, optim, peft, runs
from jaxllm import distributed, sharding, step as step_lib, tasks
from jaxllm.data import pipeline
from jaxllm.errors import ConfigError, RunError
from jaxllm.tasks import Task


def log(message: str):
  if jax.process_index() == 0:
    print(message, flush=True)


@dataclasses.dataclass
class Setup:
  config: Any
  workdir: str
  task: Task
  tuning: peft.Full
  model_cfg: model_lib.ModelConfig
  tokenizer: Any
  state: step_lib.TrainState
  start_step: int                 # the step the state is at: 0, or the checkpoint resumed from
  frozen: dict                    # trees the step reads but never trains
  data_iter: Any                  # the training batches (host), checkpointed with the state
  eval_batches: list              # validation batches, on the devices
  train_step: Callable            # (state, batch, frozen) -> (state, metrics), jitted, state donated
  eval_step: Callable             # (params, batch, frozen) -> (loss_sum, weight, aux sums), jitted
  put_batch: Callable             # a host batch -> the step's device batch
  checkpointer: checkpoint.Checkpointer
  meta: dict                      # saved with every checkpoint: tokenizer hash, model, init_from fingerprint
  skipped: Any                    # sources.BadRecords of the records skipped (data.on_bad_record=skip), or None
  flops_per_token: float
  peak_flops: float               # FLOP/s of all devices (a GPU's datasheet, else measured): MFU's denominator
  source: tuple | None            # (run dir, step) of init_from

  def data_counters(self) -> dict:
    """Metrics of the data, as of the batches taken so far: bad records skipped, examples truncated/dropped."""
    row = {}
    if self.task.counts_examples:
      counts = pipeline.counters(self.data_iter.get_state())
      row.update({"data/truncated": counts["truncated"], "data/dropped": counts["dropped"]})
    if self.skipped is not None:
      row.update({f"data/bad_{k}": v for k, v in self.skipped.counts().items()})
    return row

  def samples(self, params) -> list[str]:
    model_params = self.tuning.model_params(params, self.frozen)
    return self.task.samples(self.model_cfg, model_params, self.tokenizer)


def build(config, workdir: str, devices=None) -> Setup:
  devices = jax.devices() if devices is None else list(devices)
  config_lib.validate(config, num_devices=len(devices))
  os.makedirs(workdir, exist_ok=True)
  t = config.train
  task = tasks.make(config)
  checkpoints = os.path.join(workdir, runs.CHECKPOINTS)
  resuming = os.path.isdir(checkpoints) and checkpoint.latest_step(checkpoints) is not None
  source = runs.resolve(config.init_from) if config.init_from else None  # (run dir, step)
  train_source, val_source, skipped = task.sources()
  if skipped is not None and skipped.bad:
    log(f"data: skipped {len(skipped.bad)} bad records {skipped.counts()} (data.on_bad_record=skip), e.g. "
        + "; ".join(f"{p}:{line}: {m}" for (p, line), (_, m) in list(skipped.bad.items())[:3]))
  log(f"data: {train_source.split_info}")
  tokenizer = runs.prepare_tokenizer(config, workdir, lambda: task.texts(train_source), check=task.check_tokenizer,
                                     init_from_dir=source and source[0], log=log)
  model_cfg = runs.model_for(config, source and source[0], tokenizer.vocab_size, resumed=resuming and workdir)
  axis_sizes = dict(zip(sharding.MESH_AXES, sharding.mesh_shape(config.mesh, len(devices))))
  if reason := sharding.indivisible(dataclasses.asdict(model_cfg), axis_sizes, sharding.rules_of(config)):
    raise ConfigError(reason)
  runs.accept_config(workdir, runs.resolved_config(config, model_cfg), resuming=resuming)

  mesh = sharding.make_mesh(config.mesh, devices, distributed.procs_per_node())
  rules = sharding.rules_of(config)
  tuning = peft.make(config, model_cfg, task.needs_reference, tokenizer)
  tx = optim.optimizer(config.optimizer, t.steps)
  init_boxed = functools.partial(step_lib.init_state, init_trainable=tuning.init_trainable, tx=tx,
                                 spike_window=t.spike_window)
  init = lambda rng: nn.meta.unbox(init_boxed(rng))
  rng = jax.random.key(config.seed)
  state_sharding = sharding.logical_to_sharding(nn.get_partition_spec(jax.eval_shape(init_boxed, rng)), mesh, rules)
  batch_sharding = sharding.batch_sharding(mesh, rules)

  data_iter = iter(task.dataset(train_source, tokenizer, train=True))
  eval_batches = [sharding.put_batch(b, batch_sharding) for b in task.eval_batches(val_source, tokenizer)]

  continue_delta = config.lora.enabled and config.lora.continue_delta
  base = runs.continued_base(config, source) if continue_delta else source
  # read once, if at all; in this run's layer layout (scan or loop), whichever the source has
  source_params = functools.cache(lambda: model_lib.relayout(runs.load_params(*base), model_cfg.scan_layers))
  source_saved = lambda: model_lib.relayout(runs.saved_params(*source), model_cfg.scan_layers)  # a LoRA delta
  frozen_host, frozen_axes = tuning.frozen(source_params) if source else ({}, {})
  frozen_sharding = sharding.logical_to_sharding(frozen_axes, mesh, rules) if frozen_host else {}
  frozen = jax.device_put(frozen_host, frozen_sharding) if frozen_host else {}
  meta = {"tokenizer_sha256": tokenizer.sha256, "model": dataclasses.asdict(model_cfg)}
  if source:
    meta["init_from"] = runs.fingerprint(*source)  # a LoRA checkpoint is only its delta: name its base

  checkpointer = checkpoint.Checkpointer(checkpoints, keep=t.keep_checkpoints)  # created once the run is accepted
  try:
    state, start_step = _restore_or_init(config, workdir, checkpointer, tuning, init, rng, state_sharding,
                                         data_iter, meta, frozen, source, base, source_params, source_saved)
    task.prepare(model_cfg, lambda: tuning.reference_params(frozen), train_source, tokenizer, workdir,
                 meta.get("init_from"), log=log)
  except BaseException:
    checkpointer.close_after_error()
    raise

  peak, how = metrics_lib.peak_flops(model_cfg.dtype)
  peak *= len(devices)
  n_trainable = sum(x.size for x in jax.tree.leaves(state.params))
  log(f"model {config.model.size}: {model_lib.num_params(model_cfg) / 1e6:.2f}M params ({n_trainable / 1e6:.3f}M "
      f"trained), vocab {model_cfg.vocab_size}; mesh {dict(mesh.shape)}; MFU against the {how} peak "
      f"{peak / 1e9:,.1f} GFLOP/s" + (f" ({model_cfg.dtype} matmul)" if how == "measured" else " (bf16 dense)"))

  lr_schedule = optim.schedule(config.optimizer, t.steps)
  train_step = sharding.with_rules(jax.jit(
      functools.partial(step_lib.train_step, loss_fn=tuning.wrap(task.loss_fn(model_cfg), train=True), tx=tx,
                        lr_schedule=lr_schedule, grad_accum=t.grad_accum, seed=config.seed, spike_k=t.spike_k),
      in_shardings=(state_sharding, None, frozen_sharding), out_shardings=(state_sharding, None),
      donate_argnums=0), mesh, rules)
  eval_step = sharding.with_rules(jax.jit(
      functools.partial(step_lib.eval_step, eval_fn=tuning.wrap(task.eval_fn(model_cfg), train=False)),
      in_shardings=(state_sharding.params, None, frozen_sharding)), mesh, rules)
  return Setup(config=config, workdir=workdir, task=task, tuning=tuning, model_cfg=model_cfg, tokenizer=tokenizer,
               state=state, start_step=start_step, frozen=frozen, data_iter=data_iter, eval_batches=eval_batches,
               train_step=train_step, eval_step=eval_step,
               put_batch=lambda b: sharding.put_batch(task.device_batch(b), batch_sharding),
               checkpointer=checkpointer, meta=meta, skipped=skipped,
               flops_per_token=model_lib.flops_per_token(model_cfg, t.seq_len, frozen_weights=bool(tuning.name),
                                                         reference=task.reference_in_step()),
               peak_flops=peak, source=source)


def _restore_or_init(config, workdir, checkpointer, tuning, init, rng, state_sharding, data_iter, meta, frozen,
                     source, base, source_params, source_saved):
  """(state, step): the newest checkpoint's state (the data iterator moved to its position) after checking that
  it was trained with this tokenizer and on this base; else a new state, starting from the init_from run's
  params (or delta) where the tuning says so. The pieces of build() a new or resumed state needs."""
  start_step = checkpointer.latest_step()
  if start_step is not None:
    saved = checkpointer.restore_meta(start_step)
    where = f"{workdir}/{runs.CHECKPOINTS}/{start_step}"
    if saved.get("tokenizer_sha256") != meta["tokenizer_sha256"]:
      raise RunError(f"{where}: its tokenizer (sha256 {saved.get('tokenizer_sha256')}) is not this run's "
                     f"({meta['tokenizer_sha256']})")
    if frozen and saved.get("init_from") != meta.get("init_from"):
      raise RunError(f"init_from: {where} was trained on top of {saved.get('init_from')}, not "
                     f"{meta.get('init_from')}")
    abstract = checkpoint.abstract_with_shardings(jax.eval_shape(init, rng), state_sharding)
    state, _ = checkpointer.restore(start_step, abstract, data_iter)
    log(f"resumed from {where}")
  else:
    start_step = 0
    state = jax.jit(init, out_shardings=state_sharding)(rng)
    if source:
      start = tuning.start(source_params, source_saved)
      if start is not None:  # the init_from run's params (or delta); a fresh optimizer state
        state = state.replace(params=jax.device_put(start, state_sharding.params))
      log(f"initialized from {runs.location(*source)}"
          + (f" (its LoRA delta, on its base {runs.location(*base)})" if base != source else
             f" (frozen base of a {tuning.name})" if tuning.name else ""))
  return state, start_step
