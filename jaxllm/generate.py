"""Sampling from a trained model. B batch, L buffer length, V vocab.

This version recomputes the whole (fixed-length) buffer at each new token: simple and exact, O(L²) per token,
fine for the small models and short samples printed at the end of a run.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import model as model_lib


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "top_k", "vocab_limit"))
def _sample_buffer(cfg, params, buf_BxL, lengths_B, rng, temperature, *, max_new_tokens, top_k, vocab_limit):
  b = buf_BxL.shape[0]

  def body(i, carry):
    buf_BxL, rng = carry
    cur_B = lengths_B + i
    logits_BxLxV = model_lib.forward(cfg, params, buf_BxL)
    logits_BxV = jnp.take_along_axis(logits_BxLxV, (cur_B - 1)[:, None, None], axis=1)[:, 0]
    logits_BxV = jnp.where(jnp.arange(logits_BxV.shape[-1]) < vocab_limit, logits_BxV, -jnp.inf)
    if top_k:
      kth_B = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
      logits_BxV = jnp.where(logits_BxV >= kth_B, logits_BxV, -jnp.inf)
    rng, key = jax.random.split(rng)
    sampled_B = jax.random.categorical(key, logits_BxV / jnp.maximum(temperature, 1e-6))
    next_B = jnp.where(temperature > 0, sampled_B, jnp.argmax(logits_BxV, axis=-1))
    buf_BxL = buf_BxL.at[jnp.arange(b), cur_B].set(next_B.astype(buf_BxL.dtype))
    return buf_BxL, rng

  buf_BxL, _ = jax.lax.fori_loop(0, max_new_tokens, body, (buf_BxL, rng))
  return buf_BxL


def sample(cfg: model_lib.ModelConfig, params, prompts: list[list[int]], *, max_new_tokens: int, rng,
           temperature: float = 1.0, top_k: int = 0, eos_id: int | None = None,
           vocab_limit: int | None = None) -> list[list[int]]:
  """Continues each prompt (token ids) by `max_new_tokens` tokens; temperature 0 is greedy. Returns only the
  new tokens of each prompt, cut after the first `eos_id`. Ids >= vocab_limit are never sampled."""
  lengths = np.array([len(p) for p in prompts], np.int32)
  if lengths.min() < 1:
    raise ValueError("every prompt needs at least one token")
  buf = np.zeros((len(prompts), int(lengths.max()) + max_new_tokens), np.int32)
  for row, p in zip(buf, prompts):
    row[: len(p)] = p
  out = np.asarray(_sample_buffer(cfg, params, jnp.asarray(buf), jnp.asarray(lengths), rng,
                                  jnp.float32(temperature), max_new_tokens=max_new_tokens, top_k=top_k,
                                  vocab_limit=vocab_limit or cfg.vocab_size))
  results = []
  for row, n in zip(out, lengths):
    new = row[n: n + max_new_tokens].tolist()
    if eos_id is not None and eos_id in new:
      new = new[: new.index(eos_id) + 1]
    results.append(new)
  return results
