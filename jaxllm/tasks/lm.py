"""Language modelling: pretraining on raw text, and masked SFT on conversations. One loss, weighted next-token
cross-entropy; the data pipelines differ in the batch's loss_mask: for pretraining 1 on every real token (0 on
padding and across documents), for SFT 1 on answers and data.prompt_loss_weight elsewhere."""

from __future__ import annotations

import jax.numpy as jnp

from jaxllm import losses, model as model_lib
from jaxllm.data import chat, pipeline, sft, sources
from jaxllm.tasks.base import Task, check, perplexity


def logits(model_cfg: model_lib.ModelConfig, params, batch: dict, prefix: str = ""):
  return model_lib.forward(model_cfg, params, batch[prefix + "inputs"], batch[prefix + "segment_ids"],
                           batch[prefix + "positions"])


def chunked_token_losses(model_cfg: model_lib.ModelConfig, params, batch: dict, chunk: int, prefix: str = "",
                         z_loss: float = 0.0):
  """[B, T] next-token losses of a batch's rows without their [B, T, V] logits (losses.chunked_token_losses)."""
  hidden_BxTxD = model_lib.hidden(model_cfg, params, batch[prefix + "inputs"], batch[prefix + "segment_ids"],
                                  batch[prefix + "positions"])
  return losses.chunked_token_losses(hidden_BxTxD, model_lib.output_matrix(model_cfg, params),
                                     batch[prefix + "targets"], chunk=chunk, z_loss=z_loss)


def next_token_loss_fn(model_cfg: model_lib.ModelConfig, z_loss: float = 0.0, chunk: int = 0):
  """(params, batch, frozen, rng) -> (Σ weighted token losses, (Σ weights, {})), weights from batch["loss_mask"];
  with `chunk`, the chunked cross-entropy (no [B, T, V] logits)."""

  def loss_fn(params, batch, frozen=None, rng=None):
    del frozen, rng
    if not chunk:
      total, weight = losses.next_token_loss_sum(logits(model_cfg, params, batch), batch["targets"],
                                                 batch["loss_mask"], z_loss=z_loss)
      return total, (weight, {})
    mask_BxT = batch["loss_mask"].astype(jnp.float32)
    loss_BxT = chunked_token_losses(model_cfg, params, batch, chunk, z_loss=z_loss)
    return jnp.sum(jnp.where(mask_BxT > 0, loss_BxT, 0.0) * mask_BxT), (jnp.sum(mask_BxT), {})

  return loss_fn


class Pretrain(Task):
  stage = "pretrain"

  def load(self, split, bad):
    d = self.config.data
    return sources.documents(d.sources, split, validation_fraction=d.validation_fraction, bad=bad)

  def texts(self, source):
    return (source[i] for i in range(len(source)))

  def shard(self, source, tokenizer, *, train, **common):
    return pipeline.pretrain_dataset(source, tokenizer, **common)

  def loss_fn(self, model_cfg):
    return next_token_loss_fn(model_cfg, self.config.train.z_loss, self.loss_chunk(model_cfg))

  def eval_fn(self, model_cfg):
    return next_token_loss_fn(model_cfg, chunk=self.loss_chunk(model_cfg))  # the plain cross-entropy, no z-loss

  def eval_row(self, loss):
    return {"eval/perplexity": perplexity(loss)}


class SFT(Pretrain):
  """Masked SFT: validation measures the answer-only loss whatever the training weight of prompts."""
  stage = "sft"
  chat = True
  counts_examples = True

  @staticmethod
  def validate(config):
    d = config.data
    check("prompt_loss_weight" in d and 0 <= d.prompt_loss_weight <= 1, "data.prompt_loss_weight",
          "must be in [0, 1] (0 = loss on answers only, 1 = on every token)")
    check(d.get("overlong") in sft.OVERLONG_POLICIES, "data.overlong",
          f"{d.get('overlong')!r} is not one of {sft.OVERLONG_POLICIES}")

  def load(self, split, bad):
    d = self.config.data
    return sft.conversations(d.sources, split, validation_fraction=d.validation_fraction, bad=bad)

  def texts(self, source):
    return (chat.render_text(source[i]) for i in range(len(source)))

  def shard(self, source, tokenizer, *, train, **common):
    d = self.config.data
    return sft.sft_dataset(source, tokenizer, prompt_loss_weight=d.prompt_loss_weight if train else 0.0,
                           overlong=d.overlong, **common)

