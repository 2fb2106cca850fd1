"""Losses. B batch, T length, V vocab.

Every loss here has a "sum" form (`(sum of weighted losses, sum of weights)`) so that gradient accumulation and
data-parallel reduction divide by the total weight of the whole batch, exactly as one big batch would.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_losses(logits_BxTxV, targets_BxT, *, z_loss: float = 0.0):
  """Per-token cross-entropy (+ z_loss·logsumexp² if z_loss > 0), float32 [B, T]."""
  logits_BxTxV = logits_BxTxV.astype(jnp.float32)
  lse_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1)
  target_logit_BxT = jnp.take_along_axis(logits_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
  loss_BxT = lse_BxT - target_logit_BxT
  if z_loss:
    loss_BxT = loss_BxT + z_loss * lse_BxT ** 2
  return loss_BxT


def next_token_loss_sum(logits_BxTxV, targets_BxT, mask_BxT, *, z_loss: float = 0.0):
  """(Σ mask·loss, Σ mask). `targets` are the inputs shifted by one (the data pipeline does the shift)."""
  mask_BxT = mask_BxT.astype(jnp.float32)
  loss_BxT = token_losses(logits_BxTxV, targets_BxT, z_loss=z_loss)
  return jnp.sum(jnp.where(mask_BxT > 0, loss_BxT, 0.0) * mask_BxT), jnp.sum(mask_BxT)


def next_token_loss(logits_BxTxV, targets_BxT, mask_BxT, *, z_loss: float = 0.0):
  """Mean cross-entropy over the tokens where mask > 0, weighted by mask (padding and cross-document
  targets have mask 0). Returns 0 when the mask is all zero."""
  total, weight = next_token_loss_sum(logits_BxTxV, targets_BxT, mask_BxT, z_loss=z_loss)
  return total / jnp.maximum(weight, 1e-8)


def sequence_logprobs(logits_BxTxV, targets_BxT, mask_BxT):
  """Σ over tokens of mask·log p(target): the log-probability of each row's masked tokens, [B]."""
  return -jnp.sum(token_losses(logits_BxTxV, targets_BxT) * mask_BxT, axis=-1)
