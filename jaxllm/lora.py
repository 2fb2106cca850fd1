"""LoRA as a function over parameter trees: a frozen base tree and a small trainable delta tree (as lorax).

  delta = lora.init(base, rank=8, alpha=16, targets="attention,mlp", rng=rng)
  loss = lambda delta, batch, base: next_token_loss(model.forward(cfg, lora.merge(base, delta), ...), ...)
  grads = jax.grad(loss)(delta, batch, base)      # only the delta is differentiated; the base is a constant

The model is never edited: `merge` returns ordinary parameters W + ΔW, ΔW = scale·A·B, scale = α/r (α/√r with
rsLoRA). A is Gaussian with std 1/√fan_in, B is zero, so merge(base, init(base, ...)) == base bit for bit.

Paths. A parameter's path is its dict keys joined by "/": "layers/attn/q/kernel" (scan_layers: a leading
"layers" axis), "layers_0/mlp/down/kernel" (a Python loop over layers), "embed/embedding", "lm_head/kernel".
A target is a regex *searched* in the path (re.search, so "attn/q/kernel$" matches every layer in both layouts)
or the name of a preset in TARGETS; a string of several is comma-separated ("attention,mlp").

Matrices. A targeted weight is seen as a matrix [in, out]: its leading "layers" axis (path "layers/...") is a
batch axis (one A, B pair per layer), then `in` input dims, then the output dims. Every kernel has one input dim
except the attention output o [H, E, D], which has two (_IN_DIMS): q/k/v [D | H, E], o [H, E | D],
gate/up [D | F], down [F | D], embedding [V | D] (ΔW of a lookup table: the token's row of A, times B),
lm_head [D | V]. In the model's logical names: a matrix reads the residual stream ("embed" first: in = embed)
or writes it ("embed" last: out = embed); tests/test_lora.py checks the table against that rule.

The delta tree mirrors the base's dicts, holding only the targeted paths, each a LoraWeight:
  a [*L, *in, r]   b [*L, r, *out]   scale: a static float (in the treedef: never trained, never an array)

Two ways to run the model on base + delta, equal in value (tests/test_lora.py checks them against each other):
  merged    model.forward(cfg, merge(base, delta), ...): the model sees W + s·A·B. Simple, and what generation,
            export and evaluation of a saved delta use. Its backward pass computes the full dL/dW of every
            targeted weight (then dA, dB from it): as costly as full fine-tuning's.
  unmerged  apply(fn, base, delta, ...): the trees stay apart and each targeted module computes its output from
            its W and its factors. The backward pass never forms dL/dW (only thin [tokens, r] products), so a
            step costs less than a full fine-tuning step (bench/lora.py measures how much). The model code is not edited: A and B ride in the
            params tree next to the weight ("lora_a" = A, "lora_b" = s·B: nn.scan slices them per layer like the
            weight) and a flax method interceptor (nn.intercept_methods) computes the output of each module that
            holds them: a Projection (and the tied logits) as x·(W + s·A·B), the kernel merged on the fly, with a
            backward pass written out (_adapted_matmul: dx through the merged kernel, dA and dB from thin
            products); with dropout, and for an embedding lookup, as the module's own x·W plus s·(x·A)·B. The
            merged kernel is cheaper than the added low-rank term: it reads and writes an [in, out] matrix
            rather than [tokens, ·] activations. This is the trainer's path.

Dropout (unmerged path only). LoRA dropout drops the *input activations* of the A·B path, per token and feature:
x·W + s·(drop(x)·A)·B, with an independent mask per module and per layer (a key per layer rides next to A and
B as "lora_rng"). Not applied to an embedding's lookup (its input is token ids).

Quantized base (QLoRA-style). `quantize_int8` stores frozen matrices as int8 with float32 per-output-channel
scales (symmetric absmax); inside the step, merge(dequantize(qbase), delta) gives float32 weights.

Shape letters: L layers, r rank; `in`/`out` stand for the input/output dims of a weight.
"""

from __future__ import annotations

import math
import re
import zlib
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import PartitionSpec as P

from jaxllm import model as model_lib

Params = Any

TARGETS: dict[str, tuple[str, ...]] = {
    "attention": (r"attn/(q|k|v|o)/kernel$",),
    "mlp": (r"mlp/(gate|up|down)/kernel$",),
    "embed": (r"^embed/embedding$",),
    "lm_head": (r"^lm_head/kernel$",),
}
TARGETS["all"] = TARGETS["attention"] + TARGETS["mlp"] + TARGETS["embed"] + TARGETS["lm_head"]

# Number of input dims of a kernel (after the "layers" axis), where it is not 1: first match wins.
_IN_DIMS = ((r"attn/o/kernel$", 2),)


@struct.dataclass
class LoraWeight:
  """ΔW = scale · A·B for one weight. `scale` is static: part of the tree structure, so gradients, optimizer
  states and checkpoints hold only a and b, and a jitted function specialises on it."""
  a: Any  # [*L, *in, r]
  b: Any  # [*L, r, *out]
  scale: float = struct.field(pytree_node=False)


@struct.dataclass
class QuantizedWeight:
  """W ≈ values · scale: int8 values in W's shape; float32 scales with W's shape, 1 on the input dims."""
  values: Any  # int8 [*L, *in, *out]
  scale: Any   # float32 [*L, 1.., *out]


def scaling(rank: int, alpha: float, rslora: bool = False) -> float:
  """α/r, or α/√r for rsLoRA (rank-stabilised: the delta's scale does not shrink as the rank grows)."""
  return float(alpha / math.sqrt(rank) if rslora else alpha / rank)  # a Python float: it lives in the treedef


# --------------------------------------------------------------------------------------------- paths


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_str(keypath) -> str:
  """A jax key path -> "layers/attn/q/kernel"."""
  return "/".join(_key_name(k) for k in keypath)


def _is_weight(x) -> bool:
  return isinstance(x, (LoraWeight, QuantizedWeight))


def _flat(tree, is_leaf=_is_weight) -> list[tuple[tuple, Any]]:
  """[(tuple of key names, leaf)] in tree order."""
  leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_leaf)
  return [(tuple(_key_name(k) for k in path), leaf) for path, leaf in leaves]


def _set(tree: dict, keys: tuple, value):
  for k in keys[:-1]:
    tree = tree.setdefault(k, {})
  tree[keys[-1]] = value


def resolve_targets(targets) -> list[tuple[str, tuple[str, ...]]]:
  """[(name, regexes)]: one group per preset name or regex in `targets` (a comma-separated string or a
  sequence; a sequence's items are not split)."""
  items = targets.split(",") if isinstance(targets, str) else list(targets)
  groups = []
  for item in (i.strip() for i in items):
    patterns = TARGETS.get(item, (item,))
    for p in patterns:
      try:
        re.compile(p)
      except re.error as e:
        raise ValueError(f"lora.targets: {p!r} is not a preset ({sorted(TARGETS)}) nor a valid regex: {e}")
    groups.append((item, patterns))
  if not groups or not all(name for name, _ in groups):
    raise ValueError(f"lora.targets: {targets!r} names no target; give presets {sorted(TARGETS)} or regexes")
  return groups


def _match(params, targets) -> list[tuple[tuple, Any]]:
  """The (keys, leaf) of every parameter some target matches. A preset or regex that matches nothing raises."""
  groups = resolve_targets(targets)
  leaves = _flat(params, is_leaf=None)
  paths = ["/".join(keys) for keys, _ in leaves]
  for name, patterns in groups:
    if not any(re.search(p, path) for p in patterns for path in paths):
      shown = ", ".join(dict.fromkeys(re.sub(r"^layers_\d+/", "layers_N/", p) for p in paths))
      raise ValueError(f"lora.targets: {name!r} (regexes {list(patterns)}, searched in each path) matches no "
                       f"parameter; the parameters are: {shown}")
  every = [p for _, patterns in groups for p in patterns]
  return [(keys, leaf) for (keys, leaf), path in zip(leaves, paths) if any(re.search(p, path) for p in every)]


def _batch_dims(path: str) -> int:
  """1 for a scanned layer weight ("layers/...": a leading layers axis), else 0."""
  return 1 if path.split("/", 1)[0] == "layers" else 0


def _layout(path: str, shape) -> tuple[int, int, int]:
  """(batch dims, input dims, output dims) of the weight at `path`."""
  nb = _batch_dims(path)
  ni = next((n for pattern, n in _IN_DIMS if re.search(pattern, path)), 1)
  if len(shape) - nb - ni < 1:
    raise ValueError(f"lora: {path} of shape {tuple(shape)} is not a matrix ({nb} layers axis, {ni} input "
                     f"dims, no output dim); target kernels and embeddings only")
  return nb, ni, len(shape) - nb - ni


def _split(lw: LoraWeight, ndim: int) -> tuple[int, int]:
  """(batch dims, input dims) of the base weight (of `ndim` dims) under a LoraWeight, from its shapes alone:
  a has nb + ni + 1 dims, b has nb + 1 + no, and nb + ni + no = ndim."""
  nb = lw.a.ndim + lw.b.ndim - 2 - ndim
  return nb, lw.a.ndim - 1 - nb


# ---------------------------------------------------------------------------------------------- init / merge


def init(params, *, rank: int, alpha: float, targets, rng, rslora: bool = False) -> Params:
  """A delta tree for the targeted weights of `params` (arrays or ShapeDtypeStructs: only shapes are read).

  a ~ N(0, 1/fan_in) with fan_in = prod(in dims), float32; b = 0, so ΔW = 0 at init.
  """
  if rank < 1:
    raise ValueError(f"lora.rank={rank} must be >= 1")
  matched = _match(params, targets)
  scale = scaling(rank, alpha, rslora)
  out: dict = {}
  for key, (keys, w) in zip(jax.random.split(rng, len(matched)), matched):
    nb, ni, _ = _layout("/".join(keys), w.shape)
    batch, fan_in, fan_out = w.shape[:nb], w.shape[nb:nb + ni], w.shape[nb + ni:]
    a = jax.random.normal(key, (*batch, *fan_in, rank), jnp.float32) / math.sqrt(math.prod(fan_in))
    b = jnp.zeros((*batch, rank, *fan_out), jnp.float32)
    _set(out, keys, LoraWeight(a, b, scale))
  return out


def delta(w, lw: LoraWeight):
  """scale · A·B in W's shape, float32 (the products at full float32 precision)."""
  nb, ni = _split(lw, w.ndim)
  batch, fan_in, fan_out = w.shape[:nb], w.shape[nb:nb + ni], w.shape[nb + ni:]
  if lw.a.shape[:-1] != (*batch, *fan_in) or lw.b.shape[:nb] != batch or lw.b.shape[nb + 1:] != fan_out \
      or lw.a.shape[-1] != lw.b.shape[nb]:
    raise ValueError(f"lora: a {lw.a.shape} and b {lw.b.shape} do not fit a weight of shape {w.shape}")
  a = lw.a.astype(jnp.float32).reshape(*batch, math.prod(fan_in), -1)
  b = lw.b.astype(jnp.float32).reshape(*batch, -1, math.prod(fan_out))
  ab = jnp.einsum("...ir,...ro->...io", a, b, precision=jax.lax.Precision.HIGHEST)
  return lw.scale * ab.reshape(w.shape)


def merge(params, lora_params) -> Params:
  """params with W + scale·A·B on the delta tree's paths (float32 math, W's dtype); every other leaf is passed
  through as is (the same object). Jit-friendly: shapes and scales are static."""
  deltas = {"/".join(keys): lw for keys, lw in _flat(lora_params)}
  seen = set()

  def one(keypath, w):
    path = path_str(keypath)
    if path not in deltas:
      return w
    seen.add(path)
    return (w.astype(jnp.float32) + delta(w, deltas[path])).astype(w.dtype)

  out = jax.tree_util.tree_map_with_path(one, params)
  if missing := sorted(set(deltas) - seen):
    raise ValueError(f"lora: the delta tree has paths that are not parameters of the base: {missing} "
                     f"(a quantized base must be dequantize()d first)")
  return out


def combine(lora_trees: Sequence[Params], weights: Sequence[float]) -> Params:
  """Σ_i w_i·ΔW_i as one delta tree, exactly: the ranks concatenate. Per path, A = [w_1·s_1·A_1 | w_2·s_2·A_2
  | ...] along the rank axis, B = [B_1; B_2; ...], scale 1, so scale·A·B = Σ_i w_i·s_i·A_i·B_i. (Summing As and
  Bs would not be exact: A·B is bilinear.) A path absent from a tree is a zero delta there. The rank of the
  result is Σ r_i: it is for merging and serving, not for more training with the same hyperparameters."""
  if not lora_trees or len(lora_trees) != len(weights):
    raise ValueError(f"lora.combine: {len(lora_trees)} trees and {len(weights)} weights")
  parts: dict[tuple, list] = {}
  for tree, weight in zip(lora_trees, weights):
    for keys, lw in _flat(tree):
      parts.setdefault(keys, []).append((weight, lw))
  out: dict = {}
  for keys, pieces in parts.items():
    first, nb = pieces[0][1], _batch_dims("/".join(keys))  # b's rank axis follows the layers axis
    if any(lw.a.shape[:-1] != first.a.shape[:-1] or lw.b.shape[nb + 1:] != first.b.shape[nb + 1:]
           for _, lw in pieces):
      raise ValueError(f"lora.combine: the deltas of {'/'.join(keys)} are of different weights")
    a = jnp.concatenate([(w * lw.scale) * lw.a.astype(jnp.float32) for w, lw in pieces], axis=-1)
    b = jnp.concatenate([lw.b.astype(jnp.float32) for _, lw in pieces], axis=nb)
    _set(out, keys, LoraWeight(a, b, 1.0))
  return out


# ------------------------------------------------------------------------------------- sharding and counts


def logical_axes(tree, base_logical_axes) -> Params:
  """Logical PartitionSpecs for a tree derived from the base, shaped like `tree` (arrays or ShapeDtypeStructs),
  from the base's names (`model.logical_axes(cfg)`), so that it shards like the base on any mesh:
    LoraWeight:      a (*batch, *in names, "lora_rank"), b (*batch, "lora_rank", *out names)
    QuantizedWeight: values the base's names; scale the same, None on its size-1 input dims
    other leaves:    the base's names."""
  base = {"/".join(keys): tuple(spec)
          for keys, spec in _flat(base_logical_axes, is_leaf=lambda x: isinstance(x, P))}

  def one(keypath, x):
    path = path_str(keypath)
    if path not in base:
      raise ValueError(f"lora.logical_axes: {path} is not in the base's logical axes")
    names = base[path]
    if isinstance(x, LoraWeight):
      nb, ni = _split(x, len(names))
      return LoraWeight(P(*names[:nb + ni], "lora_rank"), P(*names[:nb], "lora_rank", *names[nb + ni:]), x.scale)
    if isinstance(x, QuantizedWeight):
      reduced = [s != v for s, v in zip(x.scale.shape, x.values.shape)]
      return QuantizedWeight(P(*names), P(*(None if r else n for n, r in zip(names, reduced))))
    return P(*names)

  return jax.tree_util.tree_map_with_path(one, tree, is_leaf=_is_weight)


def init_boxed(params, base_logical_axes, *, rank: int, alpha: float, targets, rng, rslora: bool = False):
  """`init` with nn.LogicallyPartitioned leaves (names from `logical_axes`): for jax.eval_shape +
  nn.get_partition_spec, and nn.meta.unbox to get the plain tree."""
  delta_tree = init(params, rank=rank, alpha=alpha, targets=targets, rng=rng, rslora=rslora)
  specs = logical_axes(delta_tree, base_logical_axes)
  return jax.tree.map(lambda x, spec: nn.LogicallyPartitioned(x, tuple(spec)), delta_tree, specs)


def num_trainable(lora_params) -> int:
  """Number of trained scalars: the sizes of every a and b."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(lora_params))


# ---------------------------------------------------------------------------------------------- int8 base


def quantize_int8(params, targets="all") -> Params:
  """The targeted matrices as QuantizedWeight(int8 values, float32 scales), one scale per output channel (per
  layer): scale = absmax over the input dims / 127, values = round(W / scale). Other leaves unchanged. The
  rounding error is at most scale/2 = absmax/254 per channel. A pytree of arrays: pass it to jit as a frozen
  argument."""
  matched = {keys for keys, _ in _match(params, targets)}

  def one(keypath, w):
    keys = tuple(_key_name(k) for k in keypath)
    if keys not in matched:
      return w
    nb, ni, _ = _layout("/".join(keys), w.shape)
    w = w.astype(jnp.float32)
    scale = jnp.max(jnp.abs(w), axis=tuple(range(nb, nb + ni)), keepdims=True) / 127.0
    values = jnp.clip(jnp.round(w / jnp.where(scale == 0, 1.0, scale)), -127, 127).astype(jnp.int8)
    return QuantizedWeight(values, scale)

  return jax.tree_util.tree_map_with_path(one, params)


def dequantize(params) -> Params:
  """QuantizedWeight leaves -> float32 values·scale; every other leaf as is."""
  return jax.tree.map(lambda x: x.values.astype(jnp.float32) * x.scale if isinstance(x, QuantizedWeight) else x,
                      params, is_leaf=lambda x: isinstance(x, QuantizedWeight))


def from_saved(tree, lora_config) -> Params:
  """A delta restored without a target ({"a", "b"} dicts) -> LoraWeight leaves with the scale of `lora_config`
  (the run's config.json "lora" section, or a ConfigDict)."""
  scale = scaling(lora_config["rank"], lora_config["alpha"], lora_config.get("rslora", False))
  is_pair = lambda x: isinstance(x, dict) and set(x) == {"a", "b"}
  return jax.tree.map(lambda x: LoraWeight(x["a"], x["b"], scale) if is_pair(x) else x, tree, is_leaf=is_pair)


# ------------------------------------------------------------------------------------------ unmerged path

_FACTORS = ("lora_a", "lora_b", "lora_rng")


def _module_keys(keys: tuple) -> tuple:
  """Keys of the module holding a weight: the path without the weight's own name ("kernel", "embedding")."""
  return keys[:-1]


def attach(base, lora_params, *, dropout_rng=None) -> Params:
  """`base` with each targeted module's factors next to its weight: "lora_a" = A and "lora_b" = scale·B (the
  scale folded into B, so no module needs to know it). With `dropout_rng`, each targeted module also gets
  "lora_rng": one key per layer (raw key data, uint32)."""
  params = jax.tree.map(lambda x: x, base, is_leaf=_is_weight)  # fresh dicts: the base is not modified
  for keys, lw in _flat(lora_params):
    module = _module_keys(keys)
    node = params
    for k in module:
      node = node[k]
    if keys[-1] not in node:
      raise ValueError(f"lora: the delta tree has a path that is not a parameter of the base: {'/'.join(keys)}")
    node["lora_a"], node["lora_b"] = lw.a, lw.scale * lw.b
    if dropout_rng is not None:
      nb = _split(lw, node[keys[-1]].ndim)[0]
      key = jax.random.fold_in(dropout_rng, zlib.crc32("/".join(keys).encode()))
      keys_per_layer = jax.random.split(key, lw.a.shape[:nb]) if nb else key
      node["lora_rng"] = jax.random.key_data(keys_per_layer)
  return params


@jax.custom_vjp
def _adapted_matmul(x, w, a, b):
  """x·(W + A·B) for x [T, in] and w [in, out], a [in, r], b [r, out] (the scale in b), with a backward pass that
  never forms dL/dW: dx = g·(W + A·B)ᵀ, dA = xᵀ·(g·Bᵀ), dB = (x·A)ᵀ·g, only thin [T, r] products beside dx. W is
  frozen: its cotangent is zero (and, being unused, never computed). The merge is done in w's dtype (float32
  parameters), then cast to x's (the compute dtype), like the model's own cast of a merged weight."""
  return x @ (w + a @ b).astype(x.dtype)


def _adapted_matmul_fwd(x, w, a, b):
  return _adapted_matmul(x, w, a, b), (x, w, a, b)


def _adapted_matmul_bwd(residuals, g):
  x, w, a, b = residuals
  dt = x.dtype
  dx = g @ (w + a @ b).astype(dt).T  # the merge is recomputed: [in, out] from [in, r]·[r, out], cheap beside [T, ·]
  da = x.T @ (g @ b.astype(dt).T)
  db = (x @ a.astype(dt)).T @ g
  return dx, jnp.zeros_like(w), da.astype(a.dtype), db.astype(b.dtype)


_adapted_matmul.defvjp(_adapted_matmul_fwd, _adapted_matmul_bwd)


def _low_rank(dropout: float):
  """The nn.intercept_methods interceptor, for the modules holding "lora_a"/"lora_b": a Projection or the tied
  logits (Embed.attend) computes x·(W + A·(s·B)) through _adapted_matmul; with dropout, and for an embedding
  lookup, the module's own output plus the low-rank term, y + (drop(x)·A)·(s·B)."""

  def interceptor(next_fun, args, kwargs, context):
    module, method = context.module, context.method_name
    if method not in ("__call__", "attend") or not module.has_variable("params", "lora_a"):
      return next_fun(*args, **kwargs)
    a, b = module.get_variable("params", "lora_a"), module.get_variable("params", "lora_b")
    if not dropout and isinstance(module, model_lib.Projection):
      w, dt = module.get_variable("params", "kernel"), module.dtype
      n = a.ndim - 1  # x's last n dims contract with the kernel's (and A's) first n
      x = args[0].astype(dt)
      fan_in = math.prod(w.shape[:n])
      y = _adapted_matmul(x.reshape(-1, fan_in), w.reshape(fan_in, -1), a.reshape(fan_in, -1),
                          b.reshape(b.shape[0], -1)).reshape(*x.shape[:x.ndim - n], *w.shape[n:])
      return y + module.get_variable("params", "bias").astype(dt) if module.bias_dims else y
    if not dropout and isinstance(module, nn.Embed) and method == "attend":  # x·(E + A·B)ᵀ = x·(Eᵀ + Bᵀ·Aᵀ)
      x = args[0].astype(module.dtype)
      e = module.get_variable("params", "embedding")
      return _adapted_matmul(x.reshape(-1, x.shape[-1]), e.T, b.T, a.T).reshape(*x.shape[:-1], e.shape[0])
    y = next_fun(*args, **kwargs)
    a, b, x = a.astype(y.dtype), b.astype(y.dtype), args[0]
    if isinstance(module, nn.Embed):
      if method == "__call__":   # rows of ΔW = s·A·B for the tokens: A's rows times B
        return y + model_lib.flat_matmul(jnp.take(a, x, axis=0), b, 1)
      # attend (tied logits): x·ΔWᵀ = s·(x·Bᵀ)·Aᵀ
      return y + model_lib.flat_matmul(model_lib.flat_matmul(x.astype(y.dtype), b.T, 1), a.T, 1)
    x = x.astype(y.dtype)
    if dropout and module.has_variable("params", "lora_rng"):
      key = jax.random.wrap_key_data(module.get_variable("params", "lora_rng"))
      keep = jax.random.bernoulli(key, 1.0 - dropout, x.shape)
      x = jnp.where(keep, x / (1.0 - dropout), 0).astype(x.dtype)
    # x contracts with A's input dims (the layer axis is already sliced off by nn.scan); B maps r to the output.
    # 2-D matmuls: the factors' gradients contract tokens only (see model.flat_matmul).
    return y + model_lib.flat_matmul(model_lib.flat_matmul(x, a, a.ndim - 1), b, 1)

  return interceptor


def apply(fn, base, lora_params, *args, dropout: float = 0.0, rng=None, **kwargs):
  """fn(params, *args, **kwargs) with params = base + delta on the unmerged path (see the module docstring):
  each targeted module computes x·(W + s·A·B), or x·W + s·(drop(x)·A)·B with dropout. `fn` calls the model
  (model.forward) on its params; it may also call it on other trees (a DPO reference): modules without factors
  run unchanged. Dropout needs `rng` (a new key per step); without one, or with dropout 0, the path is
  deterministic."""
  use_dropout = dropout > 0 and rng is not None
  params = attach(base, lora_params, dropout_rng=rng if use_dropout else None)
  with nn.intercept_methods(_low_rank(dropout if use_dropout else 0.0)):
    return fn(params, *args, **kwargs)
