"""next_token_loss against a float64 numpy computation."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import losses


def _np_loss(logits, targets, mask, z_loss=0.0):
  logits = logits.astype(np.float64)
  m = logits.max(-1, keepdims=True)
  lse = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
  total, weight = 0.0, 0.0
  for b in range(targets.shape[0]):
    for t in range(targets.shape[1]):
      if mask[b, t] > 0:
        total += mask[b, t] * (lse[b, t] - logits[b, t, targets[b, t]] + z_loss * lse[b, t] ** 2)
        weight += mask[b, t]
  return total / weight


@pytest.mark.parametrize("z_loss", [0.0, 1e-3])
def test_next_token_loss_matches_numpy(z_loss):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 7, 11)).astype(np.float32) * 3
  targets = rng.integers(0, 11, size=(3, 7))
  mask = (rng.random((3, 7)) > 0.3).astype(np.float32)
  mask[1, 2] = 0.5  # fractional weights (SFT prompt-loss weights) are weights, not booleans
  got = losses.next_token_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask), z_loss=z_loss)
  np.testing.assert_allclose(float(got), _np_loss(logits, targets, mask, z_loss), rtol=1e-5)


def test_masked_positions_do_not_matter():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 5, 9)).astype(np.float32)
  targets = rng.integers(0, 9, size=(2, 5))
  mask = np.array([[1, 1, 0, 0, 1], [0, 1, 1, 1, 0]], np.float32)
  poisoned = logits.copy()
  poisoned[mask == 0] = np.nan  # e.g. padding rows that overflowed
  a = losses.next_token_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
  b = losses.next_token_loss(jnp.asarray(poisoned), jnp.asarray(targets), jnp.asarray(mask))
  assert float(a) == pytest.approx(float(b)) and np.isfinite(float(b))
  assert float(losses.next_token_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.zeros((2, 5)))) == 0.0


def test_sequence_logprobs_matches_numpy():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(2, 4, 6)).astype(np.float32)
  targets = rng.integers(0, 6, size=(2, 4))
  mask = np.array([[0, 1, 1, 0], [1, 1, 1, 1]], np.float32)
  logp = logits - np.log(np.exp(logits.astype(np.float64)).sum(-1, keepdims=True))
  want = [sum(logp[b, t, targets[b, t]] * mask[b, t] for t in range(4)) for b in range(2)]
  got = losses.sequence_logprobs(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)
