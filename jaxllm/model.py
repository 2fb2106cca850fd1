"""A decoder-only transformer in Flax linen (Llama-style): RMSNorm, RoPE, GQA, SwiGLU.

Parameters are a plain pytree (no boxes); their logical axis names come from `logical_axes(cfg)`.

Shape letters used in tensor names:
  B batch, T query length, S key length, D d_model, V vocab, H query heads, K kv heads,
  G query heads per kv head (H = K*G), E head_dim, F mlp hidden.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
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
  norm_eps: float = 1e-5
  tie_embeddings: bool = False
  qkv_bias: bool = False           # Qwen2-style biases on q/k/v
  dtype: str = "float32"           # compute dtype; params are always float32
  scan_layers: bool = True         # nn.scan over layers (one compiled layer) or a Python loop
  remat_policy: str = "none"       # none | full | dots | dots_no_batch | save_attn_out

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"model.num_heads={self.num_heads} is not a multiple of "
                       f"model.num_kv_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"model.head_dim={self.head_dim} must be even for RoPE")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"model.remat_policy={self.remat_policy!r}; choose from {sorted(REMAT_POLICIES)}")


# Size presets. vocab_size None means "the tokenizer's size", resolved by the trainer.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=None, d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32,
                 mlp_dim=384, tie_embeddings=True),
    "small": dict(vocab_size=None, d_model=512, num_layers=8, num_heads=8, num_kv_heads=4, head_dim=64,
                  mlp_dim=1408, tie_embeddings=True),
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


def rope(x_BxTxNxE, positions_BxT, theta: float):
  """Rotary embedding, rotate-half convention (as Llama / Hugging Face), computed in float32."""
  e = x_BxTxNxE.shape[-1]
  inv_freq_E2 = 1.0 / theta ** (jnp.arange(0, e, 2, dtype=jnp.float32) / e)
  angle_BxTxE2 = positions_BxT[..., None].astype(jnp.float32) * inv_freq_E2
  sin, cos = jnp.sin(angle_BxTxE2)[:, :, None, :], jnp.cos(angle_BxTxE2)[:, :, None, :]
  x = x_BxTxNxE.astype(jnp.float32)
  x1, x2 = x[..., : e // 2], x[..., e // 2:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxNxE.dtype)


def attention_mask(segment_ids_BxT):
  """Causal, and a token sees only tokens of its own segment (document). [B, 1, 1, T, S] for GQA."""
  t = segment_ids_BxT.shape[1]
  causal_TxS = jnp.tril(jnp.ones((t, t), dtype=bool))
  same_BxTxS = segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]
  return (causal_TxS & same_BxTxS)[:, None, None]


class Attention(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD, segment_ids_BxT, positions_BxT):
    c, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    dense = functools.partial(nn.DenseGeneral, dtype=dt, param_dtype=jnp.float32)
    q_BxTxHxE = dense((c.num_heads, c.head_dim), use_bias=c.qkv_bias, name="q",
                      kernel_init=_param(_dense_init(c.d_model), ("embed", "heads", "head_dim")),
                      bias_init=_param(nn.initializers.zeros, ("heads", "head_dim")))(x_BxTxD)
    kv = functools.partial(dense, (c.num_kv_heads, c.head_dim), use_bias=c.qkv_bias,
                           kernel_init=_param(_dense_init(c.d_model), ("embed", "kv_heads", "head_dim")),
                           bias_init=_param(nn.initializers.zeros, ("kv_heads", "head_dim")))
    k_BxSxKxE, v_BxSxKxE = kv(name="k")(x_BxTxD), kv(name="v")(x_BxTxD)
    q_BxTxHxE = rope(q_BxTxHxE, positions_BxT, c.rope_theta)
    k_BxSxKxE = rope(k_BxSxKxE, positions_BxT, c.rope_theta)

    b, t, _, e = q_BxTxHxE.shape
    g = c.num_heads // c.num_kv_heads
    q_BxTxKxGxE = q_BxTxHxE.reshape(b, t, c.num_kv_heads, g, e)
    logits_BxKxGxTxS = jnp.einsum("btkge,bske->bkgts", q_BxTxKxGxE, k_BxSxKxE,
                                  preferred_element_type=jnp.float32) / math.sqrt(e)
    mask = attention_mask(segment_ids_BxT)
    logits_BxKxGxTxS = jnp.where(mask, logits_BxKxGxTxS, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits_BxKxGxTxS, axis=-1).astype(dt)
    out_BxTxKxGxE = jnp.einsum("bkgts,bske->btkge", probs, v_BxSxKxE)
    out_BxTxHxE = out_BxTxKxGxE.reshape(b, t, c.num_heads, e)
    out_BxTxHxE = checkpoint_name(out_BxTxHxE, "attn_out")
    return dense(c.d_model, axis=(-2, -1), use_bias=False, name="o",
                 kernel_init=_param(_dense_init(c.num_heads * e), ("heads", "head_dim", "embed")))(out_BxTxHxE)


class MLP(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD):
    c, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    dense = functools.partial(nn.Dense, use_bias=False, dtype=dt, param_dtype=jnp.float32)
    up = functools.partial(dense, c.mlp_dim, kernel_init=_param(_dense_init(c.d_model), ("embed", "mlp")))
    h_BxTxF = nn.silu(up(name="gate")(x_BxTxD)) * up(name="up")(x_BxTxD)
    h_BxTxF = nn.with_logical_constraint(h_BxTxF, ("batch", "length", "mlp"))
    return dense(c.d_model, name="down", kernel_init=_param(_dense_init(c.mlp_dim), ("mlp", "embed")))(h_BxTxF)


class Block(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD, segment_ids_BxT, positions_BxT):
    c, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    h = RMSNorm(c.norm_eps, dt, name="attn_norm")(x_BxTxD)
    x_BxTxD = x_BxTxD + Attention(c, name="attn")(h, segment_ids_BxT, positions_BxT)
    h = RMSNorm(c.norm_eps, dt, name="mlp_norm")(x_BxTxD)
    x_BxTxD = x_BxTxD + MLP(c, name="mlp")(h)
    return nn.with_logical_constraint(x_BxTxD, ("batch", "length", "embed"))


class ScanBlock(Block):
  """Block with the (carry, x) -> (carry, y) signature nn.scan wants."""

  def __call__(self, x_BxTxD, segment_ids_BxT, positions_BxT):
    return super().__call__(x_BxTxD, segment_ids_BxT, positions_BxT), None


class Transformer(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxT, segment_ids_BxT=None, positions_BxT=None):
    c, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    if segment_ids_BxT is None:
      segment_ids_BxT = jnp.ones_like(tokens_BxT)
    if positions_BxT is None:
      positions_BxT = jnp.broadcast_to(jnp.arange(tokens_BxT.shape[1]), tokens_BxT.shape)

    embed = nn.Embed(c.vocab_size, c.d_model, dtype=dt, param_dtype=jnp.float32, name="embed",
                     embedding_init=_param(_dense_init(c.d_model), ("vocab", "embed")))
    x_BxTxD = embed(tokens_BxT)
    x_BxTxD = nn.with_logical_constraint(x_BxTxD, ("batch", "length", "embed"))

    policy = REMAT_POLICIES[c.remat_policy]
    if c.scan_layers:
      block = ScanBlock if c.remat_policy == "none" else nn.remat(ScanBlock, policy=policy, prevent_cse=False)
      layers = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                       in_axes=(nn.broadcast, nn.broadcast), length=c.num_layers,
                       metadata_params={nn.PARTITION_NAME: "layers"})
      x_BxTxD, _ = layers(c, name="layers")(x_BxTxD, segment_ids_BxT, positions_BxT)
    else:
      block = Block if c.remat_policy == "none" else nn.remat(Block, policy=policy)
      for i in range(c.num_layers):
        x_BxTxD = block(c, name=f"layers_{i}")(x_BxTxD, segment_ids_BxT, positions_BxT)

    x_BxTxD = RMSNorm(c.norm_eps, dt, name="final_norm")(x_BxTxD)
    if c.tie_embeddings:
      logits_BxTxV = embed.attend(x_BxTxD.astype(dt))
    else:
      logits_BxTxV = nn.Dense(c.vocab_size, use_bias=False, dtype=dt, param_dtype=jnp.float32, name="lm_head",
                              kernel_init=_param(_dense_init(c.d_model), ("embed", "vocab")))(x_BxTxD)
    logits_BxTxV = logits_BxTxV.astype(jnp.float32)
    return nn.with_logical_constraint(logits_BxTxV, ("batch", "length", "vocab"))


def _example_tokens():
  return jnp.zeros((1, 8), jnp.int32)


def init_boxed(cfg: ModelConfig, rng) -> Params:
  """Fresh parameters with their logical axes attached (nn.LogicallyPartitioned leaves)."""
  return Transformer(cfg).init(rng, _example_tokens())["params"]


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
  """Float32 logits [B, T, V]. Packed rows pass segment ids (0 = padding) and per-document positions."""
  return Transformer(cfg).apply({"params": params}, tokens_BxT, segment_ids_BxT, positions_BxT)


def num_params(cfg: ModelConfig) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params(cfg)))


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token (forward + backward), PaLM appendix B: 6·N + 12·L·H·E·T.

  N counts every matmul weight, the logits projection included and the embedding lookup excluded.
  """
  embeddings = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
  n = num_params(cfg) - embeddings + cfg.vocab_size * cfg.d_model
  return 6 * n + 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len
