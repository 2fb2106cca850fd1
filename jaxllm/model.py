"""A decoder-only transformer in Flax linen (Llama-style): RMSNorm, RoPE, GQA, SwiGLU.

Parameters are a plain pytree (no boxes); their logical axis names come from `logical_axes(cfg)`.

Shape letters used in tensor names:
  B batch, T query length, S key length (cache slots when decoding), D d_model, V vocab, H query heads,
  K kv heads, G query heads per kv head (H = K*G), E head_dim, F mlp hidden, L layers.

Decoding keeps a KVCache: keys and values at num_kv_heads in a fixed number of slots, with a leading layers axis
(scan_layers or not). `forward_with_cache` runs T new tokens (a prompt, or one token) through the model: their
queries attend to the cache's filled slots and to each other (same segment, causal), then their keys and values
are written at slot `cache.index` onwards, once, after the last layer (the layers only read the cache, so inside
a decoding loop the write is in place).

A prefix (prompt tuning, prefix tuning: jaxllm/peft.py) rides in the params tree beside the model's own entries:
params["prompt"] [P, D], virtual-token embeddings run through the frozen model ahead of every sequence, or
params["prefix"] {"k", "v"} [L, P, K, E], keys and values read by every layer's attention. Either way each layer
sees P extra keys and values (a prompt's are those the model computes on it: `split_prefix`), ahead of every
document of a packed row, and the tokens' RoPE positions start at P, as Hugging Face PEFT runs them. In a KV
cache the prefix fills the first P slots (`write_prefix`), with segment id PREFIX_SEGMENT, which every token sees.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.ad_checkpoint import checkpoint_name

Params = Any

# Every parameter and the main activations carry these logical names; sharding.py maps them to mesh axes.
AXES = ("vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "layers", "batch", "length")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  rope_theta: float = 10_000.0
  rope_scaling: tuple = ()         # () = none; else sorted (key, value) pairs, rope_type linear | llama3 (as HF)
  norm_eps: float = 1e-5
  tie_embeddings: bool = False
  qkv_bias: bool = False           # Qwen2-style biases on q/k/v
  dtype: str = "float32"           # compute dtype; params are always float32
  scan_layers: bool = True         # nn.scan over layers (one compiled layer) or a Python loop (the params'
                                   # layout follows: "layers" stacked, or "layers_i"; `relayout` converts)
  remat_policy: str = "none"       # none | full | dots | dots_no_batch | save_attn_out
  attention: str = "einsum"        # einsum (XLA einsums, explicit mask) | dot_product (jax.nn.dot_product_attention:
                                   # cuDNN's fused attention on GPU where it applies, XLA elsewhere)
  query_blocks: int = 1            # einsum attention in this many query blocks, block i against only the keys up
                                   # to its end: the causal mask's hidden corner is not computed ((n-1)/2n of the
                                   # work). The same numbers up to float32 summation order; one block where the
                                   # length does not divide, or with a cache or prefix

  def __post_init__(self):
    # a dict or a JSON list of pairs -> sorted pairs: hashable, so the config stays a jit static argument
    items = self.rope_scaling.items() if isinstance(self.rope_scaling, dict) else self.rope_scaling
    object.__setattr__(self, "rope_scaling", tuple(sorted((str(k), v) for k, v in items)))
    if self.rope_scaling:
      kind = dict(self.rope_scaling).get("rope_type")
      if kind not in ROPE_SCALINGS:
        raise ValueError(f"model.rope_scaling: rope_type {kind!r} is not one of {ROPE_SCALINGS}")
      if missing := [k for k in ROPE_SCALING_KEYS[kind] if k not in dict(self.rope_scaling)]:
        raise ValueError(f"model.rope_scaling: {kind} needs {missing}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"model.num_heads={self.num_heads} is not a multiple of "
                       f"model.num_kv_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"model.head_dim={self.head_dim} must be even for RoPE")
    if self.attention not in ATTENTIONS:
      raise ValueError(f"model.attention={self.attention!r}; choose from {ATTENTIONS}")
    if self.query_blocks < 1:
      raise ValueError(f"model.query_blocks={self.query_blocks} must be >= 1")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"model.remat_policy={self.remat_policy!r}; choose from {sorted(REMAT_POLICIES)}")


# Size presets. vocab_size None means "the tokenizer's size", resolved by the trainer.
PRESETS: dict[str, dict[str, Any]] = {
    # tiny and small run their layers as a Python loop: on CPU 7-14% faster than the scan, and as fast to compile;
    # and their attention in two query blocks: 5-10% faster on CPU (bench/RESULTS.md). The larger presets scan
    # (one compiled layer: compile time stays flat in depth) and attend in one block (on GPU, dot_product).
    "tiny": dict(vocab_size=None, d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32,
                 mlp_dim=384, tie_embeddings=True, scan_layers=False, query_blocks=2),
    "small": dict(vocab_size=None, d_model=512, num_layers=8, num_heads=8, num_kv_heads=4, head_dim=64,
                  mlp_dim=1408, tie_embeddings=True, scan_layers=False, query_blocks=2),
    "124m": dict(vocab_size=50304, d_model=768, num_layers=12, num_heads=12, num_kv_heads=12, head_dim=64,
                 mlp_dim=2048, tie_embeddings=True),
    # Llama-3.2-1B shapes.
    "1b": dict(vocab_size=128256, d_model=2048, num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64,
               mlp_dim=8192, tie_embeddings=True, rope_theta=500_000.0),
    # Llama-2-7B shapes.
    "7b": dict(vocab_size=32000, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128,
               mlp_dim=11008),
    # Llama-2-70B shapes.
    "70b": dict(vocab_size=32000, d_model=8192, num_layers=80, num_heads=64, num_kv_heads=8, head_dim=128,
                mlp_dim=28672),
}


def model_config(size: str, **overrides) -> ModelConfig:
  """The preset `size` with `overrides` (None values are ignored)."""
  if size not in PRESETS:
    raise ValueError(f"model.size={size!r} is not a preset; choose from {sorted(PRESETS)}")
  fields = dict(PRESETS[size])
  fields.update({k: v for k, v in overrides.items() if v is not None})
  if fields["vocab_size"] is None:
    raise ValueError(f"model.size={size!r} takes its vocab_size from the tokenizer; pass vocab_size=")
  return ModelConfig(**fields)


# RoPE frequency scalings (Hugging Face's rope_type) and the keys each one reads.
ROPE_SCALINGS = ("linear", "llama3")
ROPE_SCALING_KEYS = {"linear": ("factor",),
                     "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}

ATTENTIONS = ("einsum", "dot_product")

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "save_attn_out": jax.checkpoint_policies.save_only_these_names("attn_out"),
}


def _param(init, axes):
  return nn.with_logical_partitioning(init, axes)


def _dense_init(fan_in: int):
  return nn.initializers.normal(stddev=1.0 / math.sqrt(fan_in))


class RMSNorm(nn.Module):
  eps: float
  dtype: Any

  @nn.compact
  def __call__(self, x_BxTxD):
    scale_D = self.param("scale", _param(nn.initializers.ones, ("embed",)), (x_BxTxD.shape[-1],))
    x = x_BxTxD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return (x * scale_D).astype(self.dtype)


def rope_frequencies(e: int, theta: float, scaling: tuple = ()):
  """The E/2 inverse frequencies of RoPE, float32, with an optional scaling (ModelConfig.rope_scaling):
  linear divides them all by `factor`; llama3 (Llama 3.1) divides the low ones by `factor`, keeps the high ones
  and interpolates between, as Hugging Face's `_compute_llama3_parameters`."""
  inv_freq_E2 = 1.0 / theta ** (jnp.arange(0, e, 2, dtype=jnp.float32) / e)
  s = dict(scaling)
  if s.get("rope_type") == "linear":
    return inv_freq_E2 / s["factor"]
  if s.get("rope_type") == "llama3":
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen_E2 = 2 * math.pi / inv_freq_E2
    scaled_E2 = jnp.where(wavelen_E2 > old_len / low, inv_freq_E2 / factor, inv_freq_E2)
    smooth_E2 = (old_len / wavelen_E2 - low) / (high - low)
    smoothed_E2 = (1 - smooth_E2) * scaled_E2 / factor + smooth_E2 * scaled_E2
    medium_E2 = ~(wavelen_E2 < old_len / high) & ~(wavelen_E2 > old_len / low)
    return jnp.where(medium_E2, smoothed_E2, scaled_E2)
  return inv_freq_E2


def rope_sin_cos(positions_BxT, e: int, theta: float, scaling: tuple = (), table_len: int = 0):
  """sin and cos of RoPE's angles at these positions, [B, T, E/2] each, float32. With `table_len` P on a CPU
  backend: looked up in tables of positions 0..P-1 when all positions fall there, else computed directly; the same
  numbers either way.

  Why tables on CPU: XLA:CPU counts sin and cos as cheap elementwise ops, so its fuser computes them again inside
  every fusion that reads them, once per element of each layer's queries and keys, forward and backward (scalar
  libm calls: 73 ms of the small step's ~1,100). A lookup (a gather) and a conditional it keeps apart: the tables
  are made once per forward, P x E/2 values, and the layers read them; the tiny and small steps run ~6% faster
  (bench/RESULTS.md, #19)."""
  inv_freq_E2 = rope_frequencies(e, theta, scaling)

  def direct(p_BxT):
    angle_BxTxE2 = p_BxT[..., None].astype(jnp.float32) * inv_freq_E2
    return jnp.sin(angle_BxTxE2), jnp.cos(angle_BxTxE2)

  if not table_len or jax.default_backend() != "cpu":
    return direct(positions_BxT)
  sin_PxE2, cos_PxE2 = direct(jnp.arange(table_len))
  in_tables = jnp.all((positions_BxT >= 0) & (positions_BxT < table_len))
  return jax.lax.cond(in_tables, lambda p_BxT: (sin_PxE2[p_BxT], cos_PxE2[p_BxT]), direct, positions_BxT)


def rotate(x_BxTxNxE, sin_BxTxE2, cos_BxTxE2):
  """The rotary embedding of x by angles given as their sin and cos (rope_sin_cos), rotate-half convention (as
  Llama / Hugging Face), computed in float32."""
  e = x_BxTxNxE.shape[-1]
  sin, cos = sin_BxTxE2[:, :, None, :], cos_BxTxE2[:, :, None, :]
  x = x_BxTxNxE.astype(jnp.float32)
  x1, x2 = x[..., : e // 2], x[..., e // 2:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxNxE.dtype)


def rope(x_BxTxNxE, positions_BxT, theta: float, scaling: tuple = ()):
  """Rotary embedding of x [B, T, N, E] at these positions."""
  return rotate(x_BxTxNxE, *rope_sin_cos(positions_BxT, x_BxTxNxE.shape[-1], theta, scaling))


PREFIX_SEGMENT = -1  # the segment id of prefix slots in a cache: seen by every token


def attention_mask(segment_ids_BxT):
  """Causal, and a token sees only tokens of its own segment (document). [B, 1, 1, T, S] for GQA."""
  t = segment_ids_BxT.shape[1]
  causal_TxS = jnp.tril(jnp.ones((t, t), dtype=bool))
  same_BxTxS = segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]
  return (causal_TxS & same_BxTxS)[:, None, None]


@struct.dataclass
class KVCache:
  """Keys and values of every token run so far, in S slots. Slot s holds the s-th token of the (padded) batch;
  the slots are shared by the rows, so every row writes at the same `index`."""
  k_LxBxSxKxE: jax.Array
  v_LxBxSxKxE: jax.Array
  segment_ids_BxS: jax.Array   # as in forward: 0 = padding (and empty slots); a token sees only its own segment
  index: jax.Array             # int32 scalar: the next slot to write


def init_cache(cfg: "ModelConfig", batch: int, max_len: int) -> KVCache:
  """An empty cache of `max_len` slots, keys and values in the compute dtype."""
  shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
  return KVCache(k_LxBxSxKxE=jnp.zeros(shape, cfg.dtype), v_LxBxSxKxE=jnp.zeros(shape, cfg.dtype),
                 segment_ids_BxS=jnp.zeros((batch, max_len), jnp.int32), index=jnp.zeros((), jnp.int32))


def cached_attention_mask(segment_ids_BxT, cache: KVCache):
  """attention_mask of T new tokens over the keys [the S cache slots, then the T new tokens]: [B, 1, 1, T, S+T].
  A cache slot is seen if it is filled (before cache.index) and of the query's segment, or a prefix slot."""
  filled_S = jnp.arange(cache.segment_ids_BxS.shape[1]) < cache.index
  same_BxTxS = ((segment_ids_BxT[:, :, None] == cache.segment_ids_BxS[:, None, :])
                | (cache.segment_ids_BxS[:, None, :] == PREFIX_SEGMENT))
  return jnp.concatenate([(filled_S & same_BxTxS)[:, None, None], attention_mask(segment_ids_BxT)], axis=-1)


def matmul(x_NxI, w_IxO, preferred_element_type=None):
  """x · w over the last two dims; leading dims, the same in both, are batch. On CPU through _cpu_matmul, whose
  backward pass makes the gradient of w in the orientation XLA:CPU runs fastest. Elsewhere, and when the product is
  wanted in another dtype than the operands' (float32 scores of bfloat16 queries), the plain matmul: GPU libraries
  take any orientation at full speed."""
  same = preferred_element_type in (None, x_NxI.dtype) and x_NxI.dtype == w_IxO.dtype
  if jax.default_backend() == "cpu" and same:
    return _cpu_matmul(x_NxI, w_IxO)
  return jnp.matmul(x_NxI, w_IxO, preferred_element_type=preferred_element_type)


def _transposed(a):
  return jnp.swapaxes(a, -1, -2)


@jax.custom_vjp
def _cpu_matmul(x_NxI, w_IxO):
  """x · w with the gradient of w, xᵀ·dy, made with its shorter side as rows: [I, O], or [O, I] then transposed.
  XLA:CPU runs such a dot (it contracts the operands' rows: a weight's tokens, a key's queries) 1.2-3x faster with
  the shorter side as rows: the tied logits' [V, D] = [2048, 128] gradient of the tiny preset at 160 GFLOP/s as
  itself, 390 as [D, V] transposed; attention's key and value gradients [S, E] at 64-153 against 120-239
  (bench/RESULTS.md, #19). The optimization barrier keeps XLA from folding the transpose back into the dot, here
  and in a caller's (Embed.attend's Eᵀ, attention's kᵀ). The same numbers: the dot sums over the rows in the same
  order either way."""
  return x_NxI @ w_IxO


def _cpu_matmul_fwd(x_NxI, w_IxO):
  return x_NxI @ w_IxO, (x_NxI, w_IxO)


def _cpu_matmul_bwd(residuals, dy_NxO):
  x_NxI, w_IxO = residuals
  i, o = w_IxO.shape[-2:]
  if i > o:
    dw_IxO = _transposed(jax.lax.optimization_barrier(_transposed(dy_NxO) @ x_NxI))
  else:
    dw_IxO = jax.lax.optimization_barrier(_transposed(x_NxI) @ dy_NxO)
  return dy_NxO @ _transposed(w_IxO), dw_IxO


_cpu_matmul.defvjp(_cpu_matmul_fwd, _cpu_matmul_bwd)


class Embed(nn.Embed):
  """nn.Embed whose attend (the tied logits x · Eᵀ) goes through matmul: on CPU its gradient [V, D] is made as
  [D, V] and transposed (_cpu_matmul). The same parameters and lookups; LoRA intercepts attend as before."""

  def attend(self, query):
    query, embedding = self.promote_dtype(query, self.embedding, dtype=self.dtype)
    return matmul(query, embedding.T)


def flat_matmul(x, w, n: int = 1):
  """x · w contracting x's last `n` dims with w's first `n`, computed as one 2-D matmul [tokens, fan_in] @
  [fan_in, fan_out]. The same numbers as the einsum; but the weight gradient then contracts one dim (tokens)
  rather than several (batch, length), which XLA:CPU runs through a full transpose of the output gradient
  (bench/train_step.py measures the step). On GPU the reshapes are free bitcasts."""
  fan_in = math.prod(w.shape[:n])
  y = matmul(x.reshape(-1, fan_in), w.reshape(fan_in, -1))
  return y.reshape(*x.shape[:x.ndim - n], *w.shape[n:])


class Projection(nn.Module):
  """x · kernel over named axes, with an optional bias. kernel_shape and kernel_axes line up. `spec` names the
  contraction as an einsum whose x's trailing dims meet the kernel's leading ones ("btd,dhe->bthe")."""
  spec: str
  kernel_shape: tuple[int, ...]
  kernel_axes: tuple[str, ...]
  fan_in: int
  dtype: Any
  bias_dims: int = 0  # 0 = no bias; else the bias is the kernel's last `bias_dims` dims

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", _param(_dense_init(self.fan_in), self.kernel_axes), self.kernel_shape)
    xs, ks = self.spec.split("->")[0].split(",")
    n = len(set(xs) & set(ks))  # contracted dims: x's last n, the kernel's first n
    if xs[len(xs) - n:] != ks[:n]:
      raise ValueError(f"Projection {self.spec!r}: x's trailing dims must be the kernel's leading ones")
    y = flat_matmul(x.astype(self.dtype), kernel.astype(self.dtype), n)
    if self.bias_dims:
      bias = self.param("bias", _param(nn.initializers.zeros, self.kernel_axes[-self.bias_dims:]),
                        self.kernel_shape[-self.bias_dims:])
      y = y + bias.astype(self.dtype)
    return y


class Attention(nn.Module):
  """Grouped-query attention; returns (output, kv). With `kv`, this layer's cache (keys and values [B, S, K, E]),
  the queries attend to the S cache slots and then to the T new tokens (the mask covers S+T keys), and kv
  returned is the new tokens' keys and values [B, T, K, E], for the caller to write into the cache."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD, mask_Bx1x1xTxS, rotary, kv=None):
    c, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    d, h, k, e = c.d_model, c.num_heads, c.num_kv_heads, c.head_dim
    bias = 2 if c.qkv_bias else 0
    q_BxTxHxE = Projection("btd,dhe->bthe", (d, h, e), ("embed", "heads", "head_dim"), d, dt, bias, name="q")(x_BxTxD)
    proj_kv = functools.partial(Projection, "btd,dke->btke", (d, k, e), ("embed", "kv_heads", "head_dim"), d, dt,
                                bias)
    k_BxSxKxE, v_BxSxKxE = proj_kv(name="k")(x_BxTxD), proj_kv(name="v")(x_BxTxD)
    q_BxTxHxE, k_BxSxKxE = rotate(q_BxTxHxE, *rotary), rotate(k_BxSxKxE, *rotary)
    # Keys and values whole along the sequence: with the queries split over mesh.context, each device gathers
    # the row's keys and values (this layer's, K/t heads) and its queries see all of them, exactly.
    k_BxSxKxE, v_BxSxKxE = (nn.with_logical_constraint(x, ("batch", None, "kv_heads", "head_dim"))
                            for x in (k_BxSxKxE, v_BxSxKxE))

    b, t = q_BxTxHxE.shape[:2]

    def output(out_BxTxHxE):
      out_BxTxHxE = checkpoint_name(out_BxTxHxE, "attn_out")
      out_BxTxHxE = nn.with_logical_constraint(out_BxTxHxE, ("batch", "length", "heads", "head_dim"))
      return Projection("bthe,hed->btd", (h, e, d), ("heads", "head_dim", "embed"), h * e, dt, name="o")(out_BxTxHxE)

    if c.attention == "dot_product" and kv is None:  # the fused op (no cache, no prefix): the same mask, GQA
      out_BxTxHxE = jax.nn.dot_product_attention(q_BxTxHxE, k_BxSxKxE.astype(dt), v_BxSxKxE,
                                                 mask=mask_Bx1x1xTxS[:, 0])
      return output(out_BxTxHxE), kv
    q_BxTxKxGxE = q_BxTxHxE.reshape(b, t, k, h // k, e)
    n = c.query_blocks if kv is None and t % c.query_blocks == 0 else 1
    keys_BxSxKxE, values_BxSxKxE = k_BxSxKxE, v_BxSxKxE
    if kv is not None:  # the cache's keys and values first, as in the mask
      keys_BxSxKxE, values_BxSxKxE = (jnp.concatenate([cached.astype(dt), new], axis=1)
                                      for cached, new in zip(kv, (k_BxSxKxE, v_BxSxKxE)))
    out_BxTxKxGxE = einsum_attention(q_BxTxKxGxE, keys_BxSxKxE, values_BxSxKxE, mask_Bx1x1xTxS, dt, n)
    if kv is not None:
      kv = (k_BxSxKxE, v_BxSxKxE)
    return output(out_BxTxKxGxE.reshape(b, t, h, e)), kv


def einsum_attention(q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE, mask_Bx1x1xTxS, dtype, blocks: int = 1):
  """Softmax attention of grouped queries over keys and values [B, S, K, E], as matmuls batched over (batch, kv head):
  the G queries of each position that share a kv head are rows (t, g) of one [T·G, E] x [E, S] matmul, on operands
  transposed once to [B, K, ...]. XLA:CPU runs this fastest: per layer, forward and backward, small preset, 12 ms
  against 19-21 ms for einsums straight on [B, T, K, G, E], whose key gradient contracts two dims
  (bench/RESULTS.md). The rows are t-major, so that a sequence sharded over mesh.context stays contiguous. With
  `blocks` n > 1 (S = T, n divides T): causal attention in n query blocks, block i against the keys up to its last
  query only, so the corner the mask hides is not computed. Scores and softmax in float32."""
  b, t, k, g, e = q_BxTxKxGxE.shape
  s = k_BxSxKxE.shape[1]
  q_BxKxTxGxE = q_BxTxKxGxE.transpose(0, 2, 1, 3, 4)
  k_BxKxSxE, v_BxKxSxE = (x.astype(dtype).transpose(0, 2, 1, 3) for x in (k_BxSxKxE, v_BxSxKxE))
  outs = []
  for i in range(blocks):
    start, end = i * t // blocks, (i + 1) * t // blocks  # this block's queries; its keys: 0 .. end (one block: S)
    keys, rows = s if blocks == 1 else end, (end - start) * g
    q_BxKxMxE = q_BxKxTxGxE[:, :, start:end].reshape(b, k, rows, e)
    logits_BxKxMxS = matmul(q_BxKxMxE, _transposed(k_BxKxSxE[:, :, :keys]),
                            preferred_element_type=jnp.float32) / math.sqrt(e)
    mask_Bx1xMxS = jnp.broadcast_to(mask_Bx1x1xTxS[:, :, 0, start:end, None, :keys],
                                    (b, 1, end - start, g, keys)).reshape(b, 1, rows, keys)
    logits_BxKxMxS = jnp.where(mask_Bx1xMxS, logits_BxKxMxS, jnp.finfo(jnp.float32).min)
    probs_BxKxMxS = jax.nn.softmax(logits_BxKxMxS, axis=-1).astype(dtype)
    out_BxKxMxE = matmul(probs_BxKxMxS, v_BxKxSxE[:, :, :keys])
    outs.append(out_BxKxMxE.reshape(b, k, end - start, g, e))
  return jnp.concatenate(outs, axis=2).transpose(0, 2, 1, 3, 4)


class MLP(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD):
    c, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    d, f = c.d_model, c.mlp_dim
    up = functools.partial(Projection, "btd,df->btf", (d, f), ("embed", "mlp"), d, dt)
    h_BxTxF = nn.silu(up(name="gate")(x_BxTxD)) * up(name="up")(x_BxTxD)
    h_BxTxF = nn.with_logical_constraint(h_BxTxF, ("batch", "length", "mlp"))
    return Projection("btf,fd->btd", (f, d), ("mlp", "embed"), f, dt, name="down")(h_BxTxF)


class Block(nn.Module):
  """(x, ...) -> (x, kv): the (carry, x) -> (carry, y) signature nn.scan wants; kv as in Attention."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD, mask_Bx1x1xTxS, rotary, kv=None):
    c, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    h = RMSNorm(c.norm_eps, dt, name="attn_norm")(x_BxTxD)
    attn_BxTxD, kv = Attention(c, name="attn")(h, mask_Bx1x1xTxS, rotary, kv)
    x_BxTxD = x_BxTxD + attn_BxTxD
    h = RMSNorm(c.norm_eps, dt, name="mlp_norm")(x_BxTxD)
    x_BxTxD = x_BxTxD + MLP(c, name="mlp")(h)
    return nn.with_logical_constraint(x_BxTxD, ("batch", "length", "embed")), kv


class Transformer(nn.Module):
  """Logits [B, T, V]; with a `cache`, (logits, updated cache). `prefix` (no cache): keys and values [L, P, K, E]
  every token also attends to, its positions then starting at P. `embeddings_BxTxD` replace the token lookup."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxT, segment_ids_BxT=None, positions_BxT=None, cache: KVCache | None = None,
               prefix=None, embeddings_BxTxD=None, hidden_only: bool = False):
    c, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    b, t = tokens_BxT.shape if embeddings_BxTxD is None else embeddings_BxTxD.shape[:2]
    start = 0 if cache is None else cache.index
    if segment_ids_BxT is None:
      segment_ids_BxT = jnp.ones((b, t), jnp.int32)
    if positions_BxT is None:
      positions_BxT = jnp.broadcast_to(start + jnp.arange(t), (b, t))
    if cache is not None:
      mask_Bx1x1xTxS, kv = cached_attention_mask(segment_ids_BxT, cache), (cache.k_LxBxSxKxE, cache.v_LxBxSxKxE)
    elif prefix is not None:  # as a cache holding only the prefix: every token sees its P slots
      p = prefix[0].shape[1]
      positions_BxT = positions_BxT + p
      seen_Bx1x1xTxP = jnp.ones((b, 1, 1, t, p), bool)
      mask_Bx1x1xTxS = jnp.concatenate([seen_Bx1x1xTxP, attention_mask(segment_ids_BxT)], axis=-1)
      kv = tuple(jnp.broadcast_to(x_LxPxKxE[:, None], (c.num_layers, b, *x_LxPxKxE.shape[1:])) for x_LxPxKxE in prefix)
    else:
      mask_Bx1x1xTxS, kv = attention_mask(segment_ids_BxT), None

    embed = Embed(c.vocab_size, c.d_model, dtype=dt, param_dtype=jnp.float32, name="embed",
                  embedding_init=_param(_dense_init(c.d_model), ("vocab", "embed")))
    x_BxTxD = embed(tokens_BxT) if embeddings_BxTxD is None else embeddings_BxTxD.astype(dt)
    x_BxTxD = nn.with_logical_constraint(x_BxTxD, ("batch", "length", "embed"))
    # RoPE's sin and cos once for all layers; positions index the keys: cache or prefix slots, then the new tokens
    keys = t + (0 if kv is None else kv[0].shape[2])
    rotary = rope_sin_cos(positions_BxT, c.head_dim, c.rope_theta, c.rope_scaling, table_len=keys)

    policy = REMAT_POLICIES[c.remat_policy]
    if c.scan_layers:
      block = Block if c.remat_policy == "none" else nn.remat(Block, policy=policy, prevent_cse=False)
      layers = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                       in_axes=(nn.broadcast, nn.broadcast, 0), length=c.num_layers,
                       metadata_params={nn.PARTITION_NAME: "layers"})
      x_BxTxD, kv = layers(c, name="layers")(x_BxTxD, mask_Bx1x1xTxS, rotary, kv)
    else:
      block = Block if c.remat_policy == "none" else nn.remat(Block, policy=policy)
      new_kv = []
      for i in range(c.num_layers):
        layer_kv = None if kv is None else (kv[0][i], kv[1][i])
        x_BxTxD, layer_kv = block(c, name=f"layers_{i}")(x_BxTxD, mask_Bx1x1xTxS, rotary, layer_kv)
        new_kv.append(layer_kv)
      if kv is not None:
        kv = tuple(jnp.stack([layer_kv[j] for layer_kv in new_kv]) for j in range(2))

    x_BxTxD = RMSNorm(c.norm_eps, dt, name="final_norm")(x_BxTxD)
    if hidden_only:  # the final hidden states; the caller applies output_matrix (losses.chunked_token_losses)
      return x_BxTxD
    if c.tie_embeddings:
      # on [tokens, D]: a 2-D matmul, as in flat_matmul
      logits_BxTxV = embed.attend(x_BxTxD.reshape(b * t, -1).astype(dt)).reshape(b, t, -1)
    else:
      logits_BxTxV = Projection("btd,dv->btv", (c.d_model, c.vocab_size), ("embed", "vocab"), c.d_model, dt,
                                name="lm_head")(x_BxTxD)
    logits_BxTxV = nn.with_logical_constraint(logits_BxTxV.astype(jnp.float32), ("batch", "length", "vocab"))
    if cache is None:
      return logits_BxTxV
    return logits_BxTxV, _write(cache, *kv, segment_ids_BxT)


def _write(cache: KVCache, k_LxBxTxKxE, v_LxBxTxKxE, segment_ids_BxT) -> KVCache:
  """The cache with T new tokens in slots index..index+T-1: an in-place update inside a decoding loop."""
  i, dtype = cache.index, cache.k_LxBxSxKxE.dtype
  k = jax.lax.dynamic_update_slice(cache.k_LxBxSxKxE, k_LxBxTxKxE.astype(dtype), (0, 0, i, 0, 0))
  v = jax.lax.dynamic_update_slice(cache.v_LxBxSxKxE, v_LxBxTxKxE.astype(dtype), (0, 0, i, 0, 0))
  segment_ids = jax.lax.dynamic_update_slice(cache.segment_ids_BxS, segment_ids_BxT.astype(jnp.int32), (0, i))
  return KVCache(k_LxBxSxKxE=k, v_LxBxSxKxE=v, segment_ids_BxS=segment_ids, index=i + k_LxBxTxKxE.shape[2])


def _example_tokens():
  return jnp.zeros((1, 8), jnp.int32)


def init_boxed(cfg: ModelConfig, rng) -> Params:
  """Fresh parameters with their logical axes attached (nn.LogicallyPartitioned leaves). The same numbers for
  either layer layout: a Python loop's layers get the values nn.scan draws, so a seed gives one model."""
  boxed = Transformer(cfg).init(rng, _example_tokens())["params"]
  if cfg.scan_layers:
    return boxed
  scanned = Transformer(dataclasses.replace(cfg, scan_layers=True)).init(rng, _example_tokens())["params"]
  values = relayout(nn.meta.unbox(scanned), False)
  return jax.tree.map(lambda box, value: box.replace_boxed(value), boxed, values,
                      is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def init(cfg: ModelConfig, rng) -> Params:
  """Fresh float32 parameters as a plain pytree."""
  return _init_jit(cfg, rng)


@functools.partial(jax.jit, static_argnums=0)
def _init_jit(cfg: ModelConfig, rng) -> Params:
  return nn.meta.unbox(init_boxed(cfg, rng))


def abstract_params(cfg: ModelConfig):
  """Shapes and dtypes of the parameters (ShapeDtypeStructs), without allocating."""
  return jax.eval_shape(functools.partial(init, cfg), jax.random.key(0))


def logical_axes(cfg: ModelConfig):
  """The logical axis names of every parameter, as a pytree of PartitionSpecs shaped like the params."""
  return nn.get_partition_spec(jax.eval_shape(functools.partial(init_boxed, cfg), jax.random.key(0)))


def forward(cfg: ModelConfig, params: Params, tokens_BxT, segment_ids_BxT=None, positions_BxT=None):
  """Float32 logits [B, T, V]. Packed rows pass segment ids (0 = padding) and per-document positions. With a
  prompt or prefix in `params`, every document sees it, and positions start at its length P."""
  params, prefix = split_prefix(cfg, params)
  return Transformer(cfg).apply({"params": params}, tokens_BxT, segment_ids_BxT, positions_BxT, prefix=prefix)


def hidden(cfg: ModelConfig, params: Params, tokens_BxT, segment_ids_BxT=None, positions_BxT=None):
  """The final (normed) hidden states [B, T, D] in the compute dtype: forward's logits are
  hidden · output_matrix(cfg, params), cast to float32."""
  params, prefix = split_prefix(cfg, params)
  return Transformer(cfg).apply({"params": params}, tokens_BxT, segment_ids_BxT, positions_BxT, prefix=prefix,
                                hidden_only=True)


def output_matrix(cfg: ModelConfig, params: Params):
  """The [D, V] matrix of the logits: the embedding's transpose when tied, else lm_head's kernel."""
  return params["embed"]["embedding"].T if cfg.tie_embeddings else params["lm_head"]["kernel"]


def forward_with_cache(cfg: ModelConfig, params: Params, tokens_BxT, cache: KVCache, segment_ids_BxT=None,
                       positions_BxT=None):
  """(float32 logits [B, T, V], cache with the T tokens added at slots cache.index..). A prompt (prefill) or one
  new token per row (a decode step). Positions default to the slots: pass each row's true positions when rows are
  padded differently. Tokens of segment 0 (padding) are never seen by tokens of other segments. A prompt or
  prefix in `params` is ignored here: `write_prefix` puts it in the cache first."""
  params = {k: v for k, v in params.items() if k not in PREFIX_KEYS}
  return Transformer(cfg).apply({"params": params}, tokens_BxT, segment_ids_BxT, positions_BxT, cache)


PREFIX_KEYS = ("prompt", "prefix")


def split_prefix(cfg: ModelConfig, params: Params):
  """(the model's own params, the prefix's keys and values ([L, P, K, E] each), or None without one). A prompt's
  keys and values are those the model computes on its virtual tokens at positions 0..P-1, which see only each
  other: a prefix that every document of a row can share, exactly as if each were preceded by the prompt."""
  if not any(k in params for k in PREFIX_KEYS):
    return params, None
  own = {k: v for k, v in params.items() if k not in PREFIX_KEYS}
  if "prefix" in params:
    return own, (params["prefix"]["k"], params["prefix"]["v"])
  prompt_PxD = params["prompt"]
  cache = init_cache(cfg, 1, prompt_PxD.shape[0])
  _, cache = Transformer(cfg).apply({"params": own}, None, cache=cache, embeddings_BxTxD=prompt_PxD[None])
  return own, (cache.k_LxBxSxKxE[:, 0], cache.v_LxBxSxKxE[:, 0])


def prefix_length(params: Params) -> int:
  """P, the slots a prompt or prefix in `params` takes (0 without one)."""
  if "prefix" in params:
    return params["prefix"]["k"].shape[1]
  return params["prompt"].shape[0] if "prompt" in params else 0


def write_prefix(cfg: ModelConfig, params: Params, cache: KVCache) -> KVCache:
  """The cache with the prompt's or prefix's keys and values in slots 0..P-1 (segment PREFIX_SEGMENT, seen by
  every row), its index at P; unchanged without one."""
  _, prefix = split_prefix(cfg, params)
  if prefix is None:
    return cache
  b, p = cache.segment_ids_BxS.shape[0], prefix[0].shape[1]
  k, v = (jnp.broadcast_to(x_LxPxKxE[:, None], (cfg.num_layers, b, *x_LxPxKxE.shape[1:])) for x_LxPxKxE in prefix)
  return _write(cache, k, v, jnp.full((b, p), PREFIX_SEGMENT, jnp.int32))


def relayout(tree, scan_layers: bool):
  """`tree` (params, or a tree keyed like them: a LoRA delta) with its layers as `scan_layers` lays them out:
  stacked along a leading axis under "layers" (True) or one entry per layer, "layers_0".."layers_{L-1}" (False).
  The same numbers either way: a checkpoint of one layout initializes a run of the other. Host arrays stay on
  the host."""
  if not isinstance(tree, dict):
    return tree
  tree = {k: relayout(v, scan_layers) for k, v in tree.items()}
  if scan_layers and "layers_0" in tree:
    n = sum(1 for k in tree if re.fullmatch(r"layers_\d+", k))
    per_layer = [tree.pop(f"layers_{i}") for i in range(n)]
    stack = lambda *xs: (np if all(isinstance(x, np.ndarray) for x in xs) else jnp).stack(xs)
    tree["layers"] = jax.tree.map(stack, *per_layer)
  elif not scan_layers and "layers" in tree:
    stacked = tree.pop("layers")
    n = jax.tree.leaves(stacked)[0].shape[0]
    tree.update({f"layers_{i}": jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(n)})
  return tree


def num_params(cfg: ModelConfig) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params(cfg)))


def flops_per_token(cfg: ModelConfig, seq_len: int, *, frozen_weights: bool = False,
                    reference: bool = False) -> float:
  """Model FLOPs per token of a training step (remat's recomputation not counted, as MFU counts them), PaLM
  appendix B with causal attention counted as half (as MaxText and torchtitan count it):

    forward    2·N + 2·L·H·E·T     (N: the matmul weights, logits included, the embedding lookup excluded;
                                    attention's q·k and p·v over the T/2 earlier keys a token sees on average)
    full       3 × forward         (the backward pass: activation and weight gradients, each a forward's worth)
    frozen_weights  forward + 2·N + 2·(2·L·H·E·T)  (a frozen base, LoRA / prompt / prefix: no weight gradient;
                                    the adapters' own few FLOPs are left out)
    reference  + forward           (a preference step that runs the frozen reference on the same tokens)
  """
  c = cfg
  per_layer = 2 * c.d_model * c.num_heads * c.head_dim + 2 * c.d_model * c.num_kv_heads * c.head_dim \
      + 3 * c.d_model * c.mlp_dim  # q and o, k and v, gate, up and down (norms and biases are not matmuls)
  n = c.num_layers * per_layer + c.vocab_size * c.d_model
  attention = 2 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len  # 4·L·H·E·T halved: causal
  forward = 2 * n + attention
  train = forward + 2 * n + 2 * attention if frozen_weights else 3 * forward
  return train + (forward if reference else 0)
