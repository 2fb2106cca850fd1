"""Config helpers: `parse_arg` for `get_config(arg)`, and `validate`, which checks a resolved config before
anything is compiled and names the offending key."""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import difflib
import importlib.util
import os

import jax
import ml_collections

from jaxllm import model as model_lib, peft, sharding, tasks
from jaxllm.errors import ConfigError

SCHEDULES = ("cosine", "wsd", "constant")
NAN_POLICIES = ("abort", "skip")


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses 'size=tiny,lora=True' into a ConfigDict; keys must be among `defaults`, values take their types."""
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if not sep:
      raise ConfigError(f"config arg {item!r} is not of the form key=value")
    if key not in defaults:
      raise ConfigError(f"config arg {key!r} is unknown; known: {sorted(defaults)}")
    default = defaults[key]
    if isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ConfigError(f"config arg {key}={value!r} is not a bool")
      out[key] = value.lower() in ("true", "1")
    elif isinstance(default, (int, float)):
      try:
        out[key] = type(default)(ast.literal_eval(value))
      except (ValueError, SyntaxError) as e:
        raise ConfigError(f"config arg {key}={value!r} is not a {type(default).__name__}") from e
    else:
      out[key] = value
  return out


def load_module(spec: str):
  """The Python module of a config file named as `FILE[:arg]` (the arg is ignored here)."""
  path = spec.partition(":")[0]
  if not os.path.isfile(path):
    raise ConfigError(f"--config: no file {path!r}")
  module_spec = importlib.util.spec_from_file_location(f"jaxllm_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


def load(spec: str) -> ml_collections.ConfigDict:
  """The config of `FILE[:arg]`: the file's get_config(arg) (get_config() without an arg)."""
  _, _, arg = spec.partition(":")
  module = load_module(spec)
  return module.get_config(arg) if arg else module.get_config()


def check_key(config, key: str) -> None:
  """Raises ConfigError naming a dotted key the config does not have (with the nearest known name)."""
  node, parts = config, key.split(".")
  for depth, part in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      near = difflib.get_close_matches(part, known, n=1)
      raise ConfigError(f"{'.'.join(parts[:depth + 1])}: no such config key"
                        + (f"; did you mean {near[0]!r}?" if near else f"; known: {', '.join(known)}" if known else ""))
    node = node[part]


def literal(value: str):
  """A command-line value as Python reads it (3, 1e-4, False, (2, 4)), else the string itself."""
  try:
    return ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return value


def override(config, key: str, value) -> None:
  """Sets a dotted key as `--config.key=value` would, with the field's type checked (an int field takes an int,
  a float field an int or a float); raises ConfigError naming the key."""
  check_key(config, key)
  *parents, leaf = key.split(".")
  node = config
  for part in parents:
    node = node[part]
  try:
    with node.unlocked() if node.is_locked else contextlib.nullcontext():
      node[leaf] = value
  except (TypeError, ValueError) as e:
    raise ConfigError(f"{key}: {value!r} does not fit the field ({' '.join(str(e).split())})") from e


def _check(cond: bool, key: str, message: str):
  if not cond:
    raise ConfigError(f"{key}: {message}")


def model_overrides(config) -> dict:
  """The config.model fields that override the preset (all but `size`), None where unset; query_blocks unset is 1
  under mesh.context != 1, whose split of the sequence the blocks would cut across."""
  out = {k: v for k, v in config.model.items() if k != "size"}
  if out.get("query_blocks") is None and config.mesh.context != 1:
    out["query_blocks"] = 1
  return out


def resolve_model(config, vocab_size: int) -> model_lib.ModelConfig:
  """The frozen ModelConfig the model sees, built in this one place. `vocab_size` is the tokenizer's."""
  overrides = model_overrides(config)
  preset_vocab = model_lib.PRESETS[config.model.size]["vocab_size"]
  vocab = overrides.pop("vocab_size") or preset_vocab or vocab_size
  if vocab < vocab_size:
    raise ConfigError(f"model.vocab_size: {vocab} is smaller than the tokenizer's vocabulary ({vocab_size}); "
                      "the embedding cannot hold every token id")
  try:
    return model_lib.model_config(config.model.size, vocab_size=vocab, **overrides)
  except (ValueError, TypeError) as e:
    raise ConfigError(str(e)) from e


def validate(config, num_devices: int | None = None):
  """Checks a resolved config; raises ConfigError naming the key. Cheap: compiles nothing."""
  c = config
  _check(c.stage in tasks.STAGES, "stage", f"{c.stage!r} is not one of {tasks.STAGES}")
  _check(c.model.size in model_lib.PRESETS, "model.size",
         f"{c.model.size!r} is not a preset; choose from {sorted(model_lib.PRESETS)}")
  fields = {f.name for f in dataclasses.fields(model_lib.ModelConfig)}
  for key in model_overrides(c):
    _check(key in fields, f"model.{key}", "is not a ModelConfig field")
  _check(c.model.remat_policy in model_lib.REMAT_POLICIES, "model.remat_policy",
         f"{c.model.remat_policy!r} is not one of {sorted(model_lib.REMAT_POLICIES)}")
  _check(c.model.dtype in ("float32", "bfloat16", "float16"), "model.dtype", f"{c.model.dtype!r} is not a dtype")
  t = c.train
  _check(t.steps > 0, "train.steps", f"must be > 0, got {t.steps}")
  _check(t.seq_len > 0, "train.seq_len", f"must be > 0, got {t.seq_len}")
  _check(t.batch_size > 0, "train.batch_size", f"must be > 0, got {t.batch_size}")
  _check(t.grad_accum > 0, "train.grad_accum", f"must be > 0, got {t.grad_accum}")
  _check(t.batch_size % t.grad_accum == 0, "train.batch_size",
         f"{t.batch_size} is not divisible by train.grad_accum={t.grad_accum}")
  for key in ("log_every", "eval_every", "checkpoint_every"):
    _check(t[key] > 0, f"train.{key}", f"must be > 0, got {t[key]}")
  _check(t.eval_batches >= 0, "train.eval_batches", f"must be >= 0, got {t.eval_batches}")
  _check(t.keep_checkpoints > 0, "train.keep_checkpoints", f"must be > 0, got {t.keep_checkpoints}")
  _check(t.nan_policy in NAN_POLICIES, "train.nan_policy", f"{t.nan_policy!r} is not one of {NAN_POLICIES}")
  _check(t.z_loss >= 0, "train.z_loss", f"must be >= 0, got {t.z_loss}")
  _check(t.spike_k >= 0, "train.spike_k", f"must be >= 0 (0 = off), got {t.spike_k}")
  _check(t.spike_window >= 2, "train.spike_window", f"must be >= 2, got {t.spike_window}")
  o = c.optimizer
  _check(o.learning_rate > 0, "optimizer.learning_rate", f"must be > 0, got {o.learning_rate}")
  _check(o.schedule in SCHEDULES, "optimizer.schedule", f"{o.schedule!r} is not one of {SCHEDULES}")
  _check(0 <= o.warmup_steps <= t.steps, "optimizer.warmup_steps",
         f"{o.warmup_steps} must be in [0, train.steps={t.steps}]")
  _check(0 <= o.decay_fraction <= 1, "optimizer.decay_fraction", f"{o.decay_fraction} must be in [0, 1]")
  _check(0 <= o.min_lr_ratio <= 1, "optimizer.min_lr_ratio", f"{o.min_lr_ratio} must be in [0, 1]")
  _check(o.grad_clip >= 0, "optimizer.grad_clip", f"must be >= 0 (0 = off), got {o.grad_clip}")
  _check(c.data.tokenizer.path or c.data.tokenizer.vocab_size >= 260, "data.tokenizer.vocab_size",
         f"{c.data.tokenizer.vocab_size} is too small for byte fallback (needs >= 260)")
  _check(c.data.on_bad_record in ("error", "skip"), "data.on_bad_record",
         f"{c.data.on_bad_record!r} is not one of ('error', 'skip')")
  _check(0 <= c.data.max_bad_fraction <= 1, "data.max_bad_fraction", f"{c.data.max_bad_fraction} must be in [0, 1]")
  _check(0 <= c.data.validation_fraction < 1, "data.validation_fraction",
         f"{c.data.validation_fraction} must be in [0, 1) (0 = no validation)")
  if c.init_from:
    _check(os.path.exists(c.init_from), "init_from", f"no such run or checkpoint: {c.init_from!r}")
  task = tasks.TASKS[c.stage]
  task.validate(c)
  peft.validate(c, needs_reference=task(c).needs_reference)
  validate_mesh(c, num_devices)


def validate_mesh(config, num_devices: int | None):
  """Mesh axes must multiply to the device count, the batch must divide over the data-parallel axes, and the
  sequence over mesh.context with one row per device."""
  m = config.mesh
  n = num_devices or jax.device_count()
  sizes = {f"mesh.{axis}": v for axis, v in sharding.axis_sizes(m).items()}
  for key, v in sizes.items():
    _check(v == -1 or v >= 1, key, f"must be >= 1 or -1 (fill), got {v}")
  _check(list(sizes.values()).count(-1) <= 1, "mesh", "at most one of mesh.data/fsdp/context/tensor may be -1")
  known = 1
  for v in sizes.values():
    known *= v if v > 0 else 1
  _check(n % known == 0, "mesh", f"data*fsdp*context*tensor={known} does not divide the {n} devices")
  if -1 not in sizes.values():
    _check(known == n, "mesh", f"data*fsdp*context*tensor={known} != the {n} available devices")
  axis_sizes = dict(zip(sharding.MESH_AXES, sharding.mesh_shape(m, n)))
  if axis_sizes["context"] > 1:
    length = dict(sharding.rules_of(config)).get("length")
    _check(length == "context" or "context" in (length or ()), "mesh.rules",
           f"mesh.context={axis_sizes['context']} but the rules split the 'length' axis over {length!r}: map "
           "'length' to 'context' (as sharding.RULES does)")
    _check((config.model.get("query_blocks") or 1) == 1, "model.query_blocks",
           f"{config.model.query_blocks} query blocks would slice the sequence that mesh.context="
           f"{axis_sizes['context']} shards; use 1 (unset is 1 under context parallelism)")
    _check(config.train.seq_len % axis_sizes["context"] == 0, "train.seq_len",
           f"{config.train.seq_len} is not divisible by mesh.context={axis_sizes['context']}")
  if not config.init_from:  # the model's dims from its preset (an init_from run's are checked once resolved)
    dims = {**model_lib.PRESETS[config.model.size], **{k: v for k, v in model_overrides(config).items() if v}}
    if reason := sharding.indivisible(dims, axis_sizes, sharding.rules_of(config)):
      raise ConfigError(reason)
  data_parallel = (m.data if m.data > 0 else n // known) * (m.fsdp if m.fsdp > 0 else n // known)
  micro = config.train.batch_size // config.train.grad_accum
  _check(micro % data_parallel == 0, "train.batch_size",
         f"the micro-batch batch_size/grad_accum={micro} is not divisible by the data-parallel size "
         f"mesh.data*mesh.fsdp={data_parallel}")
  # The model's projections run on [rows * tokens, D] (model.flat_matmul): that dim stays split over context only
  # while each device holds one row; with more, every device would compute the whole sequence's projections.
  _check(axis_sizes["context"] == 1 or micro == data_parallel, "train.grad_accum",
         f"mesh.context={axis_sizes['context']} needs one row per device in each micro-batch: batch_size/grad_accum="
         f"{micro} must equal mesh.data*mesh.fsdp={data_parallel} (grad_accum="
         f"{config.train.batch_size // data_parallel})")
