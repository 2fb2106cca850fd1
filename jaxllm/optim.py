"""Optimizer and learning-rate schedules from `config.optimizer` (all optax)."""

from __future__ import annotations

import jax
import optax


def schedule(opt_config, steps: int) -> optax.Schedule:
  """warmup + cosine, warmup-stable-decay (linear decay over the last decay_fraction), or warmup + constant."""
  o = opt_config
  peak, floor, warmup = o.learning_rate, o.learning_rate * o.min_lr_ratio, o.warmup_steps
  if o.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(steps, warmup + 1), end_value=floor)
  warm = optax.linear_schedule(0.0, peak, warmup)
  if o.schedule == "constant":
    return optax.join_schedules([warm, optax.constant_schedule(peak)], [warmup])
  if o.schedule == "wsd":
    decay_steps = int(round(steps * o.decay_fraction))
    stable_steps = max(steps - warmup - decay_steps, 0)
    return optax.join_schedules(
        [warm, optax.constant_schedule(peak), optax.linear_schedule(peak, floor, max(decay_steps, 1))],
        [warmup, warmup + stable_steps])
  raise ValueError(f"optimizer.schedule: unknown {o.schedule!r}")


def _decay_mask(params):
  """Weight decay on matrices (ndim >= 2), not on norm scales or biases."""
  return jax.tree.map(lambda x: x.ndim >= 2, params)


def optimizer(opt_config, steps: int) -> optax.GradientTransformation:
  o = opt_config
  adamw = optax.adamw(schedule(o, steps), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                      mask=_decay_mask)
  return optax.chain(optax.clip_by_global_norm(o.grad_clip), adamw) if o.grad_clip > 0 else adamw
