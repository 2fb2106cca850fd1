"""One small factory per stage: what the loss is, given (trainable params, batch, frozen trees).

A loss function returns `(loss_sum, (weight, aux_sums))`: sums over the batch, so that the step can divide by
the weight of the whole (accumulated, data-parallel) batch. The stage is chosen here, once.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

from jaxllm import losses, model as model_lib

LossFn = Callable[[Any, dict, Any], tuple]


@dataclasses.dataclass(frozen=True)
class Objective:
  loss_fn: LossFn          # (trainable, batch, frozen) -> (loss_sum, (weight, aux_sums)); differentiated
  eval_fn: LossFn          # same signature; validation metrics
  init_trainable: Callable  # (rng) -> boxed trainable params (logical axes attached) for eval_shape/init


def next_token(model_cfg: model_lib.ModelConfig, config) -> Objective:
  """Weighted next-token cross-entropy. The batch's loss_mask holds the weights: for pretraining 1 on every
  real token (0 on padding and across documents); for SFT 1 on answers, data.prompt_loss_weight elsewhere."""
  z_loss = config.train.z_loss

  def loss_fn(params, batch, frozen=None):
    del frozen
    logits = model_lib.forward(model_cfg, params, batch["inputs"], batch["segment_ids"], batch["positions"])
    total, weight = losses.next_token_loss_sum(logits, batch["targets"], batch["loss_mask"], z_loss=z_loss)
    return total, (weight, {})

  def eval_fn(params, batch, frozen=None):
    del frozen
    logits = model_lib.forward(model_cfg, params, batch["inputs"], batch["segment_ids"], batch["positions"])
    total, weight = losses.next_token_loss_sum(logits, batch["targets"], batch["loss_mask"])
    return total, (weight, {})

  return Objective(loss_fn, eval_fn, functools.partial(model_lib.init_boxed, model_cfg))


def make(model_cfg: model_lib.ModelConfig, config) -> Objective:
  if config.stage in ("pretrain", "sft"):  # the same loss; the data pipelines differ in loss_mask
    return next_token(model_cfg, config)
  raise ValueError(f"stage: {config.stage!r} has no objective")
