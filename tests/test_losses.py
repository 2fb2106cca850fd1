"""next_token_loss against a float64 numpy computation."""

import jax
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


@pytest.mark.parametrize("tie", [True, False])
def test_chunked_cross_entropy_equals_the_dense_loss_and_gradients(tie):
  """The chunked loss (no [B, T, V] logits; chunks of 5 over 2x7 tokens, the last padded) against the dense loss
  of model.forward, with z-loss and a mask: value and gradients of every parameter."""
  from jaxllm import model as model_lib
  from jaxllm.tasks import lm
  cfg = model_lib.ModelConfig(vocab_size=64, d_model=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8,
                              mlp_dim=32, tie_embeddings=tie)
  params = model_lib.init(cfg, jax.random.key(0))
  rng = np.random.default_rng(0)
  batch = {"inputs": rng.integers(0, 64, (2, 7)), "targets": rng.integers(0, 64, (2, 7)),
           "segment_ids": np.ones((2, 7), np.int32), "positions": np.tile(np.arange(7), (2, 1)),
           "loss_mask": (rng.random((2, 7)) > 0.3).astype(np.float32)}
  dense = lm.next_token_loss_fn(cfg, z_loss=1e-3)
  chunked = lm.next_token_loss_fn(cfg, z_loss=1e-3, chunk=5)
  loss = lambda fn: lambda p: fn(p, batch)[0]
  (want, want_grads), (got, got_grads) = (jax.jit(jax.value_and_grad(loss(f)))(params) for f in (dense, chunked))
  np.testing.assert_allclose(got, want, rtol=1e-6)
  for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(g, w, rtol=2e-5, atol=1e-7)


def test_loss_chunk_auto_and_its_refusal():
  from configs import pretrain
  from jaxllm import model as model_lib, tasks
  from jaxllm.errors import ConfigError
  c = pretrain.get_config("size=1b").unlock()  # vocabulary 128k: 8 x 2048 x 128256 float32 logits = 8 GiB
  cfg = model_lib.model_config("1b")
  c.train.batch_size, c.train.seq_len, c.train.grad_accum = 8, 2048, 1
  assert tasks.make(c).loss_chunk(cfg) == 4096
  c.train.batch_size = 1
  c.train.seq_len = 512
  assert tasks.make(c).loss_chunk(cfg) == 0  # 256 MiB of logits: dense
  c.train.loss_chunk, c.lora.enabled, c.lora.targets = 1024, True, "all"
  with pytest.raises(ConfigError, match="train.loss_chunk"):
    tasks.make(c).loss_chunk(cfg)
  c.lora.merged = True
  assert tasks.make(c).loss_chunk(cfg) == 1024
