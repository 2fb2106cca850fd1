"""What trains and what stays frozen: the whole model, or a parameter-efficient tree beside a frozen base.

A Task's loss is written for full params, `(params, batch, frozen, rng)`. A tuning decides what the trainable
tree is, which frozen trees the step gets, and wraps the loss so that it sees full params:

  Full  trainable = the params; frozen = {"reference": the init_from params} when the task needs a reference.
  Lora  trainable = a LoRA delta; frozen = {"base": the init_from params (int8 with lora.quantize_base)}. Each
        targeted module computes x·(W + s·A·B) without forming dL/dW (lora.apply), or x·W + s·(drop(x)·A)·B
        with lora.dropout while training, or with lora.merged the model sees merge(base, delta). The base
        doubles as the reference: no second copy of the weights.

Frozen trees are separate step arguments: never donated, never in the optimizer state.
"""

from __future__ import annotations

import jax
import numpy as np

from jaxllm import lora, model as model_lib
from jaxllm.errors import ConfigError


def _check(cond: bool, key: str, message: str):
  if not cond:
    raise ConfigError(f"{key}: {message}")


class Full:
  """Every parameter trains; a run with init_from starts from its params with a fresh optimizer state."""

  def __init__(self, config, model_cfg: model_lib.ModelConfig, needs_reference: bool):
    self.config, self.model_cfg, self.needs_reference = config, model_cfg, needs_reference

  def init_trainable(self, rng):
    """Boxed (logical axes attached) trainable params, for eval_shape and init."""
    return model_lib.init_boxed(self.model_cfg, rng)

  def frozen(self, source_params) -> tuple[dict, dict]:
    """(trees, their logical axes): what the step reads but never trains."""
    if not self.needs_reference:
      return {}, {}
    return {"reference": source_params()}, {"reference": model_lib.logical_axes(self.model_cfg)}

  def wrap(self, loss_fn, *, train: bool):
    del train
    return loss_fn

  def start(self, source_params, source_saved):
    """The trainable tree a new run starts from (host arrays), or None for a fresh init. `source_params()`: the
    init_from run's params (merged); `source_saved()`: its checkpoint's params as saved (a LoRA run's delta)."""
    del source_saved
    # a copy: the trainable state is donated to the step, and a reference must not share its buffers
    return jax.tree.map(lambda x: np.array(x, copy=True), source_params())

  def model_params(self, trainable, frozen):
    """The full params the model runs with (for samples)."""
    del frozen
    return trainable

  def reference_params(self, frozen):
    return frozen["reference"]


class Lora(Full):
  """A LoRA delta trains on a frozen base, the params of the run init_from names."""

  def init_trainable(self, rng):
    lc = self.config.lora
    return lora.init_boxed(model_lib.abstract_params(self.model_cfg), model_lib.logical_axes(self.model_cfg),
                           rank=lc.rank, alpha=lc.alpha, targets=lc.targets, rng=rng, rslora=lc.rslora)

  def frozen(self, source_params):
    lc = self.config.lora
    params = source_params()
    base = lora.quantize_int8(params, lc.targets) if lc.quantize_base else params
    return {"base": base}, {"base": lora.logical_axes(base, model_lib.logical_axes(self.model_cfg))}

  def wrap(self, loss_fn, *, train: bool):
    lc = self.config.lora

    def wrapped(delta, batch, frozen, rng=None):
      base = lora.dequantize(frozen["base"])
      inner = dict(frozen, reference=base)
      if lc.merged:
        return loss_fn(lora.merge(base, delta), batch, inner, rng)
      return lora.apply(loss_fn, base, delta, batch, inner, rng, dropout=lc.dropout if train else 0.0, rng=rng)

    return wrapped

  def start(self, source_params, source_saved):
    """lora.continue_delta: the delta of the LoRA run init_from names, trained further; else a new delta."""
    del source_params
    if not self.config.lora.continue_delta:
      return None
    return lora.from_saved(source_saved(), self.config.lora)

  def model_params(self, delta, frozen):
    return lora.merge(lora.dequantize(frozen["base"]), delta)

  def reference_params(self, frozen):
    return lora.dequantize(frozen["base"])


def make(config, model_cfg: model_lib.ModelConfig, needs_reference: bool) -> Full:
  return (Lora if config.lora.enabled else Full)(config, model_cfg, needs_reference)


def validate(config, needs_reference: bool):
  """Raises ConfigError naming the key of a parameter-efficient setting that cannot work."""
  c = config.lora
  if not c.enabled:
    return
  _check(bool(config.init_from), "lora.enabled", "a LoRA delta needs a base: set init_from to a trained run")
  _check(c.rank > 0, "lora.rank", f"must be > 0, got {c.rank}")
  _check(c.alpha > 0, "lora.alpha", f"must be > 0, got {c.alpha}")
  _check(0 <= c.dropout < 1, "lora.dropout", f"must be in [0, 1), got {c.dropout}")
  _check(not (c.continue_delta and needs_reference), "lora.continue_delta",
         "the reference is the LoRA base without a delta, which a continued delta does not start from; start "
         "from the merged model instead (lora.continue_delta=False)")
  _check(not (c.merged and c.dropout), "lora.dropout",
         "dropout acts on the A·B path's input, which lora.merged=True does not compute; set lora.merged=False")
  try:
    lora.resolve_targets(c.targets)
  except ValueError as e:
    raise ConfigError(str(e)) from e
