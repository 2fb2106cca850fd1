"""One small factory per stage: what the loss is, given (trainable params, batch, frozen trees).

A loss function returns `(loss_sum, (weight, aux_sums))`: sums over the batch, so that the step can divide by
the weight of the whole (accumulated, data-parallel) batch. The stage is chosen here, once.

`frozen` is a dict of trees that never train and are never donated: "base" (the LoRA base, possibly int8) and
"reference" (the DPO reference when there is no LoRA base to serve as one).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxllm import lora, losses, model as model_lib

LossFn = Callable[[Any, dict, Any], tuple]


@dataclasses.dataclass(frozen=True)
class Objective:
  loss_fn: LossFn          # (trainable, batch, frozen) -> (loss_sum, (weight, aux_sums)); differentiated
  eval_fn: LossFn          # same signature; validation metrics (aux sums become eval/<name>)
  init_trainable: Callable  # (rng) -> boxed trainable params (logical axes attached) for eval_shape/init


def _logits(model_cfg, params, batch, prefix=""):
  return model_lib.forward(model_cfg, params, batch[prefix + "inputs"], batch[prefix + "segment_ids"],
                           batch[prefix + "positions"])


def next_token(model_cfg: model_lib.ModelConfig, config) -> Objective:
  """Weighted next-token cross-entropy. The batch's loss_mask holds the weights: for pretraining 1 on every
  real token (0 on padding and across documents); for SFT 1 on answers, data.prompt_loss_weight elsewhere."""
  z_loss = config.train.z_loss

  def loss_fn(params, batch, frozen=None, z_loss=z_loss):
    del frozen
    total, weight = losses.next_token_loss_sum(_logits(model_cfg, params, batch), batch["targets"],
                                               batch["loss_mask"], z_loss=z_loss)
    return total, (weight, {})

  return Objective(loss_fn, functools.partial(loss_fn, z_loss=0.0),
                   functools.partial(model_lib.init_boxed, model_cfg))


def pair_logps(model_cfg: model_lib.ModelConfig, kind: str, params, batch):
  """([B] chosen, [B] rejected) answer log-probs of a preference batch, both sides in one forward pass; summed
  over answer tokens, or averaged for simpo."""
  both = {k: jnp.concatenate([batch["chosen_" + k], batch["rejected_" + k]])
          for k in ("inputs", "targets", "loss_mask", "segment_ids", "positions")}
  logits = _logits(model_cfg, params, both)
  per_seq = losses.mean_sequence_logprobs if kind == "simpo" else losses.sequence_logprobs
  out_2B = per_seq(logits, both["targets"], both["loss_mask"])
  b = batch["chosen_inputs"].shape[0]
  return out_2B[:b], out_2B[b:]


def reference_params(frozen, config):
  """The DPO reference among the frozen trees: the LoRA base (dequantised), or the frozen copy."""
  return lora.dequantize(frozen["base"]) if config.lora.enabled else frozen["reference"]


def dpo(model_cfg: model_lib.ModelConfig, config) -> Objective:
  """Preference loss (dpo.kind: sigmoid = DPO, with dpo.label_smoothing = cDPO; ipo; simpo) on answer tokens.
  Chosen and rejected rows go through the model in one forward pass (concatenated on the batch axis). The
  reference is frozen["reference"]; simpo needs none."""
  d = config.dpo
  logps = functools.partial(pair_logps, model_cfg, d.kind)

  def loss_fn(params, batch, frozen):
    chosen, rejected = logps(params, batch)
    ref_chosen = ref_rejected = None
    if "ref_chosen_logps" in batch:  # precomputed once over the dataset (jaxllm/reference.py)
      ref_chosen, ref_rejected = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
    elif d.kind != "simpo":
      ref_chosen, ref_rejected = jax.lax.stop_gradient(logps(frozen["reference"], batch))
    total, count, sums = losses.dpo_loss_sum(chosen, rejected, ref_chosen, ref_rejected, beta=d.beta, kind=d.kind,
                                             label_smoothing=d.label_smoothing, gamma=d.gamma)
    if ref_chosen is not None:  # Σ log π(c) − log π_ref(c) on the data's chosen answers (see losses.kl_estimate)
      sums["kl_estimate"] = jnp.sum(chosen - ref_chosen)
    return total, (count, sums)

  return Objective(loss_fn, loss_fn, functools.partial(model_lib.init_boxed, model_cfg))


def with_lora(objective: Objective, model_cfg: model_lib.ModelConfig, config) -> Objective:
  """The same objective trained through a LoRA delta: trainable = the delta, frozen["base"] = the base weights
  (float or int8). Each targeted module computes x·(W + s·A·B) without forming dL/dW (lora.apply), or
  x·W + s·(drop(x)·A)·B with lora.dropout while training (frozen["rng"]), or with lora.merged the model sees
  merge(base, delta). Under DPO the base itself is the reference."""
  lc = config.lora
  base_axes = model_lib.logical_axes(model_cfg)

  def through(fn, train: bool):
    def wrapped(delta, batch, frozen):
      base = lora.dequantize(frozen["base"])
      inner = dict(frozen, reference=base) if config.stage == "dpo" else frozen
      if lc.merged:
        return fn(lora.merge(base, delta), batch, inner)
      dropout = lc.dropout if train else 0.0
      return lora.apply(fn, base, delta, batch, inner, dropout=dropout, rng=frozen.get("rng"))
    return wrapped

  def init_trainable(rng):
    return lora.init_boxed(model_lib.abstract_params(model_cfg), base_axes, rank=lc.rank, alpha=lc.alpha,
                           targets=lc.targets, rng=rng, rslora=lc.rslora)

  return Objective(through(objective.loss_fn, True), through(objective.eval_fn, False), init_trainable)


def make(model_cfg: model_lib.ModelConfig, config) -> Objective:
  if config.stage in ("pretrain", "sft"):  # the same loss; the data pipelines differ in loss_mask
    objective = next_token(model_cfg, config)
  elif config.stage == "dpo":
    objective = dpo(model_cfg, config)
  else:
    raise ValueError(f"stage: {config.stage!r} has no objective")
  return with_lora(objective, model_cfg, config) if config.lora.enabled else objective
