"""Text generation with a KV cache, and a command line to sample from a run's checkpoint.

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

import argparse
import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

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
  positions_BxP = jnp.maximum(slots_P - pad_B[:, None], 0)
  cache = model_lib.init_cache(cfg, b, p + max_new_tokens - 1)  # the last new token is never fed back
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
                                                       positions_BxT=(lengths_B + i - 1)[:, None])
    rng, key = jax.random.split(rng)
    token_B = choose(logits_Bx1xV[:, 0], key)
    new_BxN = jax.lax.dynamic_update_slice_in_dim(new_BxN, token_B[:, None], i, axis=1)
    return i + 1, token_B, done_B | is_stop(token_B), new_BxN, cache, rng

  carry = (jnp.int32(1), token_B, is_stop(token_B), new_BxN, cache, rng)
  return jax.lax.while_loop(keep_going, decode_step, carry)[3]


def generate(cfg: model_lib.ModelConfig, params, prompts: list[list[int]], *, max_new_tokens: int, rng,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, stop_ids=(),
             vocab_limit: int | None = None) -> list[list[int]]:
  """Continues each prompt (token ids) by up to `max_new_tokens` tokens; returns the new tokens of each prompt,
  cut after its first id in `stop_ids` (kept). Temperature 0 is greedy; top_k / top_p filter the sampled
  distribution (see `choose_tokens`); ids >= vocab_limit are never produced. One compiled program per (batch,
  longest prompt, max_new_tokens): the sampling settings and up to 4 stop ids are traced."""
  if not prompts:
    return []
  lengths = np.array([len(p) for p in prompts], np.int32)
  if lengths.min() < 1:
    raise ValueError("every prompt needs at least one token")
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p={top_p} must be in (0, 1]")
  if max_new_tokens < 1:
    return [[] for _ in prompts]
  buf = np.zeros((len(prompts), int(lengths.max())), np.int32)  # left-padded with 0 (never attended to)
  for row, p in zip(buf, prompts):
    row[len(row) - len(p):] = p
  stop = np.full(max(4, len(stop_ids)), -1, np.int32)  # up to 4 stop ids share one compiled program
  stop[: len(stop_ids)] = list(stop_ids)
  out = np.asarray(_generate(cfg, params, jnp.asarray(buf), jnp.asarray(lengths), rng, jnp.asarray(stop),
                             jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p),
                             jnp.int32(vocab_limit or cfg.vocab_size), max_new_tokens=max_new_tokens))
  results = []
  for row in out.tolist():
    cut = next((i + 1 for i, t in enumerate(row) if t in stop_ids), len(row))
    results.append(row[:cut])
  return results


def sample(cfg: model_lib.ModelConfig, params, prompts: list[list[int]], *, max_new_tokens: int, rng,
           temperature: float = 1.0, top_k: int = 0, eos_id: int | None = None,
           vocab_limit: int | None = None) -> list[list[int]]:
  """`generate` stopping at `eos_id` (the signature train.py's end-of-run samples use)."""
  return generate(cfg, params, prompts, max_new_tokens=max_new_tokens, rng=rng, temperature=temperature,
                  top_k=top_k, stop_ids=() if eos_id is None else (eos_id,), vocab_limit=vocab_limit)


# --------------------------------------------------------------------------------------- a run's weights


def load_run(workdir: str, step: int | None = None):
  """(model config, params, tokenizer) of a training run: config.json, tokenizer.model and the params of
  checkpoint `step` (default: the newest) in workdir/checkpoints."""
  import orbax.checkpoint as ocp

  from jaxllm.data.tokenizer import Tokenizer

  with open(os.path.join(workdir, "config.json")) as f:
    config = json.load(f)
  model_fields = config["model"]
  names = {f.name for f in dataclasses.fields(model_lib.ModelConfig)}
  cfg = model_lib.ModelConfig(**{k: v for k, v in model_fields.items() if k in names})  # drops "size"
  tokenizer = Tokenizer.from_file(os.path.join(workdir, "tokenizer.model"))

  manager = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")))
  step = manager.latest_step() if step is None else step
  if step is None or step not in manager.all_steps():
    raise FileNotFoundError(f"{workdir}/checkpoints: no checkpoint {'saved' if step is None else step} "
                            f"(steps: {sorted(manager.all_steps())})")
  # Only the params (the optimizer state stays on disk), onto one device whatever mesh saved them.
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  lora_config = config.get("lora", {})
  if lora_config.get("enabled"):  # the checkpoint holds a LoRA delta: put it back on its base
    from jaxllm import checkpoint, lora
    abstract = jax.eval_shape(lambda: lora.init(
        model_lib.abstract_params(cfg), rank=lora_config["rank"], alpha=lora_config["alpha"],
        targets=lora_config["targets"], rng=jax.random.key(0), rslora=lora_config["rslora"]))
  else:
    abstract = model_lib.abstract_params(cfg)
  target = {"params": jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)}
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True)))
  manager.close()
  params = restored["state"]["params"]
  if lora_config.get("enabled"):
    params = lora.merge(checkpoint.load_params(*checkpoint.lora_base(workdir)), params)
  return cfg, params, tokenizer


# ------------------------------------------------------------------------------------------ command line


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m jaxllm.generate", description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="a training run's directory")
  parser.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for a batch")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
  parser.add_argument("--max_new_tokens", type=int, default=64)
  parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
  parser.add_argument("--top_k", type=int, default=40, help="0 = no top-k filter")
  parser.add_argument("--top_p", type=float, default=0.95, help="1 = no nucleus filter")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--chat", action="store_true", help="wrap each prompt as a user turn of the chat template")
  args = parser.parse_args(argv)

  cfg, params, tokenizer = load_run(args.workdir, args.step)
  stop_ids = [tokenizer.eos_id]
  if args.chat:
    from jaxllm.data import chat
    ids = [chat.render_prompt([{"role": "user", "content": p}], tokenizer) for p in args.prompt]
    stop_ids.append(tokenizer.token_id(chat.DEFAULT_TEMPLATE.end))
  else:
    ids = [tokenizer.encode(p) for p in args.prompt]
  outs = generate(cfg, params, ids, max_new_tokens=args.max_new_tokens, rng=jax.random.key(args.seed),
                  temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, stop_ids=stop_ids,
                  vocab_limit=tokenizer.vocab_size)
  for i, (prompt, out) in enumerate(zip(args.prompt, outs)):
    text = tokenizer.decode(out[:-1] if out and out[-1] in stop_ids else out)
    print(f"--- {i}: user ---\n{prompt}\n--- {i}: assistant ---\n{text}" if args.chat else f"--- {i} ---\n{prompt}{text}",
          flush=True)


if __name__ == "__main__":
  main()
