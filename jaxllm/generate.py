"""Text generation with a KV cache (`jaxllm generate` samples from a run's checkpoint: jaxllm/cli.py).

  python -m jaxllm.generate --workdir runs/pretrain_tiny --prompt "def " --prompt "class " [--max_new_tokens 64
      --temperature 0.8 --top_k 40 --top_p 0.95 --seed 0 --step N --chat]

Prompts of different lengths are left-padded to the longest (P slots), so that every row writes its next token
at the same cache slot: one prefill of the padded prompts, then one compiled decode step per new token, the
whole generation one `lax.while_loop` that ends early once every row has produced a stop id. Padding has
segment id 0, which real tokens never attend to, and each row's RoPE positions are its own (0 at its first
real token), so a row's tokens are those it would get alone.

Shape letters: B batch, P prompt slots, N new tokens, V vocab.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxllm import model as model_lib


def choose_tokens(logits_BxV, rng, *, temperature, top_k=0, top_p=1.0, vocab_limit=None):
  """Next ids [B]: the argmax when temperature is 0, else a sample from softmax(logits / temperature) restricted
  to the `top_k` most likely ids (0 = all), then to the smallest set of those whose renormalized probability
  reaches `top_p` (the nucleus; 1 = all). Ids tied with the last one kept are kept too. Ids >= vocab_limit are
  never chosen. Every argument may be traced: one compiled program serves every setting, and runs only the
  work its setting needs (no sort when nothing is filtered, no sampling when greedy)."""
  v = logits_BxV.shape[-1]
  if vocab_limit is not None:
    logits_BxV = jnp.where(jnp.arange(v) < vocab_limit, logits_BxV, -jnp.inf)

  def keep_top_k_top_p(logits_BxV):
    rank_V = jnp.arange(v)
    sorted_BxV = jnp.flip(jnp.sort(logits_BxV, axis=-1), axis=-1)  # most likely first
    in_top_k_V = (top_k <= 0) | (rank_V < top_k)
    probs_BxV = jax.nn.softmax(jnp.where(in_top_k_V, sorted_BxV, -jnp.inf), axis=-1)
    before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV  # mass of the more likely ids: 0 for the first
    keep_BxV = in_top_k_V & ((top_p >= 1.0) | (before_BxV < top_p))
    cutoff_Bx1 = jnp.min(jnp.where(keep_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits_BxV >= cutoff_Bx1, logits_BxV, -jnp.inf)

  def draw(logits_BxV):
    logits_BxV = logits_BxV / temperature
    logits_BxV = jax.lax.cond((top_k > 0) | (top_p < 1.0), keep_top_k_top_p, lambda x: x, logits_BxV)
    return jax.random.categorical(rng, logits_BxV).astype(jnp.int32)

  greedy = lambda logits_BxV: jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  return jax.lax.cond(temperature > 0, draw, greedy, logits_BxV)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens"))
def _generate(cfg, params, prompt_BxP, lengths_B, rng, stop_ids, temperature, top_k, top_p, vocab_limit, *,
              max_new_tokens):
  """New ids [B, N] of left-padded prompts; a row's ids after its first stop id are unspecified."""
  b, p = prompt_BxP.shape
  pad_B = p - lengths_B
  slots_P = jnp.arange(p)
  segment_ids_BxP = (slots_P >= pad_B[:, None]).astype(jnp.int32)
  n = model_lib.prefix_length(params)  # a prompt-/prefix-tuned run's prefix: the first n slots, positions from n
  positions_BxP = jnp.maximum(slots_P - pad_B[:, None], 0) + n
  cache = model_lib.init_cache(cfg, b, n + p + max_new_tokens - 1)  # the last new token is never fed back
  cache = model_lib.write_prefix(cfg, params, cache)
  logits_BxPxV, cache = model_lib.forward_with_cache(cfg, params, prompt_BxP, cache, segment_ids_BxP, positions_BxP)

  choose = functools.partial(choose_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                             vocab_limit=vocab_limit)
  is_stop = lambda ids_B: jnp.any(ids_B[:, None] == stop_ids[None, :], axis=-1)
  rng, key = jax.random.split(rng)
  token_B = choose(logits_BxPxV[:, -1], key)
  new_BxN = jnp.zeros((b, max_new_tokens), jnp.int32).at[:, 0].set(token_B)

  def keep_going(carry):
    i, _, done_B, _, _, _ = carry
    return (i < max_new_tokens) & ~jnp.all(done_B)

  def decode_step(carry):
    """Feeds new token i-1 (at each row's position lengths + i-1) and chooses new token i."""
    i, token_B, done_B, new_BxN, cache, rng = carry
    logits_Bx1xV, cache = model_lib.forward_with_cache(cfg, params, token_B[:, None], cache,
                                                       positions_BxT=(n + lengths_B + i - 1)[:, None])
    rng, key = jax.random.split(rng)
    token_B = choose(logits_Bx1xV[:, 0], key)
    new_BxN = jax.lax.dynamic_update_slice_in_dim(new_BxN, token_B[:, None], i, axis=1)
    return i + 1, token_B, done_B | is_stop(token_B), new_BxN, cache, rng

  carry = (jnp.int32(1), token_B, is_stop(token_B), new_BxN, cache, rng)
  return jax.lax.while_loop(keep_going, decode_step, carry)[3]


def rows_mesh(devices=None) -> Mesh:
  """A one-axis ("data") mesh over `devices` (default: this process's): inference batches split by rows."""
  return Mesh(np.array(jax.local_devices() if devices is None else devices), ("data",))


def put_rows(arrays, mesh: Mesh | None):
  """Host arrays [rows, ...] on the mesh, their rows split over every mesh axis (as they are without a mesh)."""
  if mesh is None:
    return jax.tree.map(jnp.asarray, arrays)
  return jax.device_put(arrays, NamedSharding(mesh, P(mesh.axis_names)))


def replicate(params, mesh: Mesh | None):
  """Params on every device of the mesh (unchanged without one): for inference batches split by rows."""
  return params if mesh is None else jax.device_put(params, NamedSharding(mesh, P()))


def pad_rows(n: int, mesh: Mesh | None) -> int:
  """The smallest multiple of the mesh's size >= n: rows split evenly over its devices."""
  size = 1 if mesh is None else mesh.size
  return -(-n // size) * size


def generate(cfg: model_lib.ModelConfig, params, prompts: list[list[int]], *, max_new_tokens: int, rng,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, stop_ids=(),
             vocab_limit: int | None = None, prompt_slots: int = 0, mesh: Mesh | None = None) -> list[list[int]]:
  """Continues each prompt (token ids) by up to `max_new_tokens` tokens; returns the new tokens of each prompt,
  cut after its first id in `stop_ids` (kept). Temperature 0 is greedy; top_k / top_p filter the sampled
  distribution (see `choose_tokens`); ids >= vocab_limit are never produced. One compiled program per (batch,
  longest prompt, max_new_tokens): the sampling settings and up to 4 stop ids are traced. `prompt_slots` pads the
  prompts to at least that many slots, so that batches of different prompts share one program. With a `mesh`
  (params `replicate`d on it), the rows are split over its devices (padded to a multiple of its size); random
  draws do not depend on the split (jax's partitionable threefry), so the tokens are those of one device."""
  if not prompts:
    return []
  given = len(prompts)
  prompts = list(prompts) + [prompts[0]] * (pad_rows(given, mesh) - given)
  lengths = np.array([len(p) for p in prompts], np.int32)
  if lengths.min() < 1:
    raise ValueError("every prompt needs at least one token")
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p={top_p} must be in (0, 1]")
  if max_new_tokens < 1:
    return [[] for _ in prompts]
  buf = np.zeros((len(prompts), max(int(lengths.max()), prompt_slots)), np.int32)  # left-padded with 0 (never
  # attended to)
  for row, p in zip(buf, prompts):
    row[len(row) - len(p):] = p
  stop = np.full(max(4, len(stop_ids)), -1, np.int32)  # up to 4 stop ids share one compiled program
  stop[: len(stop_ids)] = list(stop_ids)
  buf, lengths = put_rows((buf, lengths), mesh)
  out = np.asarray(_generate(cfg, params, buf, lengths, rng, jnp.asarray(stop),
                             jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p),
                             jnp.int32(vocab_limit or cfg.vocab_size), max_new_tokens=max_new_tokens))
  results = []
  for row in out[:given].tolist():
    cut = next((i + 1 for i, t in enumerate(row) if t in stop_ids), len(row))
    results.append(row[:cut])
  return results


if __name__ == "__main__":  # python -m jaxllm.generate: the `jaxllm generate` command of jaxllm/cli.py
  import runpy
  import sys

  sys.argv[1:1] = ["generate"]
  runpy.run_module("jaxllm.cli", run_name="__main__")
