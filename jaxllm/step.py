"""The train state and the pure, jitted steps: `train_step(state, batch, frozen) -> (state, metrics)` and
`eval_step(params, batch, frozen) -> sums`. The loss functions come from a Task wrapped by a tuning (peft.py)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct


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
  `spikes`. The loss gets a key of (seed, step, micro-batch) for dropout: a resumed run draws the same keys.
  `frozen` holds the trees the loss reads but never trains (a LoRA base, a preference reference).
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  step_rng = jax.random.fold_in(jax.random.key(seed), state.step)

  def sums(micro_batch, index=0):
    rng = jax.random.fold_in(step_rng, index)
    (loss_sum, (weight, aux)), grads = grad_fn(state.params, micro_batch, frozen or {}, rng)
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
  """Sums over one validation batch: (loss_sum, weight, aux sums)."""
  loss_sum, (weight, aux) = eval_fn(params, batch, frozen)
  return loss_sum, weight, aux
