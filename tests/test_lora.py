"""LoRA deltas against independent numpy computations: merge, the merged forward, gradients, parameter counts,
combining deltas, the int8 base, and logical axes.

The numpy side reads each weight's (batch, in, out) split from the model's logical names, not from lora.py's
table: a matrix either reads the residual stream ("embed" first: one input dim) or writes it ("embed" last:
every other dim is an input).
"""

import dataclasses
import functools
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from jaxllm import lora, losses, model as model_lib, sharding

CFG = model_lib.ModelConfig(vocab_size=256, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                            mlp_dim=64)
RANK, ALPHA = 4, 8.0
fwd = jax.jit(model_lib.forward, static_argnums=0)
merge = jax.jit(lora.merge)


def _cfg(scan=True, tie=False):
  return dataclasses.replace(CFG, scan_layers=scan, tie_embeddings=tie)


@functools.cache
def _base(scan=True, tie=False):
  """Random float32 parameters of the model's shapes (drawn in numpy: nothing to compile)."""
  rng = np.random.default_rng(0)
  draw = lambda path, s: jnp.asarray(
      1 + 0.1 * rng.standard_normal(s.shape) if path[-1].key == "scale" else 0.2 * rng.standard_normal(s.shape),
      jnp.float32)
  return jax.tree_util.tree_map_with_path(draw, model_lib.abstract_params(_cfg(scan, tie)))


@functools.cache
def _names(scan=True, tie=False) -> dict[str, tuple]:
  axes = model_lib.logical_axes(_cfg(scan, tie))
  return {lora.path_str(k): tuple(s) for k, s in
          jax.tree_util.tree_leaves_with_path(axes, is_leaf=lambda x: isinstance(x, P))}


def _shapes(params, targets, rank=RANK, alpha=ALPHA, rslora=False):
  """The delta tree `lora.init` gives, as ShapeDtypeStructs (jax.eval_shape: nothing computed)."""
  return jax.eval_shape(
      lambda rng: lora.init(params, rank=rank, alpha=alpha, targets=targets, rng=rng, rslora=rslora),
      jax.random.key(0))


def _randomize(tree, seed, std=0.3, zero_b=False):
  """The same delta tree (arrays or shapes) with every a and b random: a nonzero ΔW."""
  rng = np.random.default_rng(seed)
  draw = lambda s: jnp.asarray(std * rng.standard_normal(s.shape), jnp.float32)
  return jax.tree.map(lambda lw: lora.LoraWeight(draw(lw.a), jnp.zeros(lw.b.shape) if zero_b else draw(lw.b),
                                                 lw.scale), tree, is_leaf=lambda x: isinstance(x, lora.LoraWeight))


def _tokens(seed, shape=(2, 12)):
  return jax.random.randint(jax.random.key(seed), shape, 0, CFG.vocab_size)


def _deltas(tree):
  """{path: LoraWeight} of a delta tree."""
  leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: isinstance(x, lora.LoraWeight))
  return {lora.path_str(k): lw for k, lw in leaves}


def _leaves(tree):
  return {lora.path_str(k): x for k, x in jax.tree_util.tree_leaves_with_path(tree)}


def _get(tree, path):
  for k in path.split("/"):
    tree = tree[k]
  return tree


def _split(names):
  """(batch dims, input dims) by the residual-stream rule."""
  nb = int(names[0] == "layers")
  rest = names[nb:]
  return nb, 1 if rest[0] == "embed" else len(rest) - 1


def _np_merged(w, lw, names):
  """W + scale·A·B in float64 numpy, with W reshaped to [*batch, in, out] by hand."""
  nb, ni = _split(names)
  w, a, b = (np.asarray(x, np.float64) for x in (w, lw.a, lw.b))
  batch = w.shape[:nb]
  a2 = a.reshape(*batch, math.prod(w.shape[nb:nb + ni]), a.shape[-1])
  b2 = b.reshape(*batch, b.shape[nb], math.prod(w.shape[nb + ni:]))
  return w + lw.scale * (a2 @ b2).reshape(w.shape)


# ------------------------------------------------------------------------------------------------ merge


def test_init_then_merge_is_the_identity():
  p = _base()
  delta = lora.init(p, rank=RANK, alpha=ALPHA, targets="mlp", rng=jax.random.key(1))
  assert set(_deltas(delta)) == {"layers/mlp/gate/kernel", "layers/mlp/up/kernel", "layers/mlp/down/kernel"}
  for path, lw in _deltas(delta).items():
    fan_in = _get(p, path).shape[1]
    assert lw.scale == ALPHA / RANK and lw.a.dtype == lw.b.dtype == jnp.float32
    assert not np.any(np.asarray(lw.b)) and np.std(lw.a) == pytest.approx(1 / math.sqrt(fan_in), rel=0.2)
  merged = lora.merge(p, delta)
  assert merged["final_norm"]["scale"] is p["final_norm"]["scale"]  # untargeted leaves pass through
  for path, w in _leaves(p).items():
    assert _get(merged, path).dtype == w.dtype and np.array_equal(_get(merged, path), w), path


@pytest.mark.parametrize("scan", [True, False])
def test_merge_with_b_zero_is_bit_exact(scan):
  p = _base(scan)
  delta = _randomize(_shapes(p, "all"), 1, zero_b=True)
  # q k v o gate up down (stacked when scanned, else per layer), embedding, lm_head
  assert len(_deltas(delta)) == 7 * (1 if scan else CFG.num_layers) + 2
  got = _leaves(merge(p, delta))
  assert got.keys() == _leaves(p).keys()
  for path, w in _leaves(p).items():
    assert got[path].dtype == w.dtype and np.array_equal(got[path], w), path


@pytest.mark.parametrize("scan", [True, False])
def test_merged_weights_match_numpy(scan):
  p, names = _base(scan), _names(scan)
  delta = _randomize(_shapes(p, "all"), 2)
  merged = merge(p, delta)
  for path, lw in _deltas(delta).items():
    assert lw.scale == ALPHA / RANK
    want = _np_merged(_get(p, path), lw, names[path])
    np.testing.assert_allclose(_get(merged, path), want, rtol=1e-5, atol=1e-6, err_msg=path)
  d, h, e, v, r, n = CFG.d_model, CFG.num_heads, CFG.head_dim, CFG.vocab_size, RANK, CFG.num_layers
  layer = lambda i: delta["layers"] if scan else delta[f"layers_{i}"]
  lead = (n,) if scan else ()
  q, o = layer(0)["attn"]["q"]["kernel"], layer(0)["attn"]["o"]["kernel"]
  assert q.a.shape == (*lead, d, r) and q.b.shape == (*lead, r, h, e)
  assert o.a.shape == (*lead, h, e, r) and o.b.shape == (*lead, r, d)
  assert delta["embed"]["embedding"].a.shape == (v, r) and delta["embed"]["embedding"].b.shape == (r, d)
  assert delta["lm_head"]["kernel"].a.shape == (d, r) and delta["lm_head"]["kernel"].b.shape == (r, v)


def test_unmerged_products_equal_the_merged_kernel():
  """x·W + s·(x·A)·B == x·merged(W), for q ([D | H, E]) and o ([H, E | D]) of layer 1, in numpy."""
  p = _base(True)
  delta = _randomize(_shapes(p, "attention"), 3)
  merged = merge(p, delta)
  inputs = {"q": (5, CFG.d_model), "o": (5, CFG.num_heads, CFG.head_dim)}
  for i, (name, shape) in enumerate(inputs.items()):
    x = np.random.default_rng(4 + i).standard_normal(shape).reshape(5, -1)
    lw = delta["layers"]["attn"][name]["kernel"]
    as_matrix = lambda t, rows: np.asarray(t[1], np.float64).reshape(rows, -1)  # layer 1, as [in, out]
    w, a, b = (as_matrix(t, rows) for t, rows in ((p["layers"]["attn"][name]["kernel"], x.shape[1]),
                                                   (lw.a, x.shape[1]), (lw.b, RANK)))
    unmerged = x @ w + lw.scale * (x @ a) @ b
    np.testing.assert_allclose(x @ as_matrix(merged["layers"]["attn"][name]["kernel"], x.shape[1]), unmerged,
                               rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("scan", [True, False])
def test_merged_forward_matches_a_numpy_merged_base(scan):
  cfg, p, names = _cfg(scan), _base(scan), _names(scan)
  delta = _randomize(_shapes(p, "all"), 2)
  by_hand = jax.tree_util.tree_map_with_path(
      lambda k, w: w if lora.path_str(k) not in _deltas(delta) else
      jnp.asarray(_np_merged(w, _deltas(delta)[lora.path_str(k)], names[lora.path_str(k)]), jnp.float32), p)
  tokens = _tokens(0)
  got = fwd(cfg, merge(p, delta), tokens)
  np.testing.assert_allclose(got, fwd(cfg, by_hand, tokens), rtol=1e-4, atol=1e-4)
  assert np.abs(got - fwd(cfg, p, tokens)).max() > 1e-2  # the delta does change the model


# ------------------------------------------------------------------------------------------ unmerged path


@functools.partial(jax.jit, static_argnums=(0, 5))
def _apply_fwd(cfg, base, delta, tokens, rng=None, dropout=0.0):
  return lora.apply(lambda q: model_lib.forward(cfg, q, tokens), base, delta, dropout=dropout, rng=rng)


@pytest.mark.parametrize("scan,tie", [(True, True), (False, False)])
def test_unmerged_forward_matches_a_numpy_merged_base(scan, tie):
  """x·W + s·(x·A)·B computed module by module (lora.apply) equals the model on W + s·A·B merged in numpy, for
  every target kind: multi-head q/k/v/o, mlp, the embedding (its lookup and, tied, the logits) and lm_head."""
  cfg, p, names = _cfg(scan, tie), _base(scan, tie), _names(scan, tie)
  delta = _randomize(_shapes(p, "all"), 3)
  by_hand = jax.tree_util.tree_map_with_path(
      lambda k, w: w if lora.path_str(k) not in _deltas(delta) else
      jnp.asarray(_np_merged(w, _deltas(delta)[lora.path_str(k)], names[lora.path_str(k)]), jnp.float32), p)
  tokens = _tokens(4)
  got = _apply_fwd(cfg, p, delta, tokens)
  np.testing.assert_allclose(got, fwd(cfg, by_hand, tokens), rtol=1e-4, atol=1e-4)
  assert np.abs(got - fwd(cfg, p, tokens)).max() > 1e-2


@pytest.mark.parametrize("tie", [False, True])
def test_unmerged_gradients_match_float64_and_skip_dW(tie):
  """The trainer's path: dL/dA, dL/dB equal to the merged path's computed in float64 (within float32's error,
  which the merged path's own float32 gradient shows too), with a backward pass that never forms dL/dW (XLA's
  FLOP count of the gradient is below the merged one by about the dW matmuls). Every target kind: q/k/v/o, mlp,
  the embedding's lookup and lm_head (untied), or the lookup and the tied logits."""
  cfg, p = _cfg(tie=tie), _base(tie=tie)
  tokens = jnp.asarray(np.random.default_rng(5).integers(0, CFG.vocab_size, (4, 49)), jnp.int32)
  n_tokens = 4 * 48  # a number no model dim equals
  delta = _randomize(_shapes(p, "all", rank=1), 6)  # rank 1: the low-rank products are thin

  def loss(delta, base, unmerged, cfg=cfg):
    run = lambda q: model_lib.forward(cfg, q, tokens[:, :-1])
    logits = lora.apply(run, base, delta) if unmerged else run(lora.merge(base, delta))
    return losses.next_token_loss(logits, tokens[:, 1:], jnp.ones_like(tokens[:, 1:]))

  grads = {u: jax.jit(jax.grad(functools.partial(loss, unmerged=u))) for u in (True, False)}
  got = {u: _deltas(grads[u](delta, p)) for u in (True, False)}
  with jax.enable_x64(True):
    to64 = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), tree)
    ref = jax.jit(jax.grad(functools.partial(loss, unmerged=False, cfg=dataclasses.replace(cfg, dtype="float64"))))(
        to64(delta), to64(p))
    ref = {path: {name: np.asarray(getattr(g, name)) for name in "ab"} for path, g in _deltas(ref).items()}
  for path in ref:
    for name, want in ref[path].items():
      for u in (True, False):  # float32's error here, of the largest entry: 9e-5 unmerged, 8e-4 merged
        np.testing.assert_allclose(getattr(got[u][path], name), want, rtol=0, atol=2e-3 * np.abs(want).max(),
                                   err_msg=f"{path} {name} unmerged={u}")
  # No matmul of the unmerged gradient that contracts the tokens has the shape of a targeted weight (of one
  # layer): dL/dW is never formed. The merged gradient has them (the check can fail), and costs more FLOPs.
  # A weight's gradient may come as the weight's shape or flattened to a matrix [prod(in), prod(out)].
  forms = lambda shape: {tuple(sorted(shape))} | {tuple(sorted((math.prod(shape[:k]), math.prod(shape[k:]))))
                                                  for k in range(1, len(shape))}
  weight_forms = {path: forms(w.shape[1:] if path.startswith("layers/") else w.shape)
                  for path, w in _leaves(p).items() if path in _deltas(delta)}
  dots = {u: _dot_shapes(jax.make_jaxpr(jax.grad(functools.partial(loss, unmerged=u)))(delta, p).jaxpr, n_tokens)
          for u in (True, False)}
  assert not set().union(*weight_forms.values()) & dots[True], set().union(*weight_forms.values()) & dots[True]
  # (an untied embedding's dL/dW is a scatter of rows, not a matmul)
  assert all(f & dots[False] for path, f in weight_forms.items() if tie or path != "embed/embedding")
  flops = {u: grads[u].lower(delta, p).compile().cost_analysis()["flops"] for u in (True, False)}
  assert flops[True] < flops[False], flops


def test_unmerged_bfloat16():
  """In bfloat16 compute (each module's merged kernel formed in float32, then cast, as the model casts a merged
  tree): logits and float32 factor gradients within bfloat16's error of the float32 computation's, which is
  what the bare base model and the merged path show too (here 2.5-3.7% of the largest logit, 1-7% of the
  largest gradient entry), well below the delta's own effect."""
  cfg16, cfg32 = dataclasses.replace(_cfg(tie=True), dtype="bfloat16"), _cfg(tie=True)
  p = _base(tie=True)
  delta = _randomize(_shapes(p, "all"), 9, std=0.1)
  tokens = _tokens(10, (2, 33))

  def loss(delta, cfg):
    logits = lora.apply(lambda q: model_lib.forward(cfg, q, tokens[:, :-1]), p, delta)
    return losses.next_token_loss(logits, tokens[:, 1:], jnp.ones_like(tokens[:, 1:]))

  want = np.asarray(_apply_fwd(cfg32, p, delta, tokens))
  got = np.asarray(_apply_fwd(cfg16, p, delta, tokens).astype(jnp.float32))
  np.testing.assert_allclose(got, want, rtol=0, atol=0.06 * np.abs(want).max())
  assert np.abs(want - fwd(cfg32, p, tokens)).max() > 0.5 * np.abs(want).max()  # the delta matters
  g16, g32 = (_deltas(jax.jit(jax.grad(loss), static_argnums=1)(delta, c)) for c in (cfg16, cfg32))
  for path, lw in g32.items():
    for name in "ab":
      assert getattr(g16[path], name).dtype == jnp.float32, path
      np.testing.assert_allclose(getattr(g16[path], name), getattr(lw, name), rtol=0,
                                 atol=0.1 * np.abs(getattr(lw, name)).max(), err_msg=f"{path} {name}")


def _dot_shapes(jaxpr, contracted: int) -> set:
  """Output shapes (dims sorted: any transposition) of every dot_general in a jaxpr and its sub-jaxprs (scan,
  remat, pjit, custom_vjp, ...) whose contracted dims have `contracted` elements."""
  shapes = set()
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (lhs_contract, _), _ = eqn.params["dimension_numbers"]
      if math.prod(eqn.invars[0].aval.shape[d] for d in lhs_contract) == contracted:
        shapes.add(tuple(sorted(eqn.outvars[0].aval.shape)))
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          shapes |= _dot_shapes(sub.jaxpr, contracted)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          shapes |= _dot_shapes(sub, contracted)
  return shapes


def test_lora_dropout():
  cfg, p = _cfg(), _base()
  tokens = _tokens(7)
  delta = _randomize(_shapes(p, "attention,mlp"), 8)
  plain = _apply_fwd(cfg, p, delta, tokens)
  key = jax.random.key(0)
  np.testing.assert_array_equal(_apply_fwd(cfg, p, delta, tokens, key, 0.0), plain)  # dropout 0: no effect
  dropped = _apply_fwd(cfg, p, delta, tokens, key, 0.5)
  assert np.abs(dropped - plain).max() > 1e-2
  np.testing.assert_array_equal(_apply_fwd(cfg, p, delta, tokens, key, 0.5), dropped)  # a key, a mask
  assert np.abs(_apply_fwd(cfg, p, delta, tokens, jax.random.key(1), 0.5) - dropped).max() > 1e-3
  # dropout acts on the A·B path only: with B = 0 the output is the base's, bit for bit
  at_init = _randomize(_shapes(p, "attention,mlp"), 8, zero_b=True)
  np.testing.assert_array_equal(_apply_fwd(cfg, p, at_init, tokens, key, 0.5), fwd(cfg, p, tokens))
  # a key per module and per layer: the masks of layer 0 and 1 (same module) differ
  params = lora.attach(p, delta, dropout_rng=key)
  keys = np.asarray(params["layers"]["attn"]["q"]["lora_rng"])
  assert keys.shape[0] == CFG.num_layers and np.any(keys[0] != keys[1])
  assert np.any(keys != np.asarray(params["layers"]["attn"]["k"]["lora_rng"]))


def test_lora_dropout_is_inverted_dropout_of_the_input():
  """On one module (applied outside any model), the dropped low-rank term averaged over masks is the undropped
  one: inverted dropout, x / keep where kept."""
  base = {"proj": {"kernel": jnp.asarray(np.random.default_rng(0).standard_normal((6, 5)), jnp.float32)}}
  delta = _randomize(lora.init(base, rank=3, alpha=3.0, targets="proj/kernel", rng=jax.random.key(0)), 9)
  x = jnp.asarray(np.random.default_rng(1).standard_normal((4000, 6)), jnp.float32)
  dense = lambda q: nn.Dense(5, use_bias=False, name="proj").apply({"params": q["proj"]}, x)
  f = jax.jit(lambda rng: lora.apply(dense, base, delta, dropout=0.25, rng=rng))
  lw = delta["proj"]["kernel"]
  low = lambda xx: lw.scale * (np.asarray(xx, np.float64) @ np.asarray(lw.a, np.float64)) @ np.asarray(lw.b)
  w = np.asarray(base["proj"]["kernel"], np.float64)
  mean = np.mean([np.asarray(f(jax.random.key(i)), np.float64) - np.asarray(x) @ w for i in range(20)], axis=0)
  np.testing.assert_allclose(mean.mean(0), low(x).mean(0), atol=0.05 * np.abs(low(x)).mean())


# -------------------------------------------------------------------------------------------- gradients


def test_gradients_are_of_the_delta_only():
  cfg, p = _cfg(), _base()
  tokens = _tokens(1, (2, 13))

  def loss(delta, base):
    logits = model_lib.forward(cfg, lora.merge(base, delta), tokens[:, :-1])
    return losses.next_token_loss(logits, tokens[:, 1:], jnp.ones_like(tokens[:, 1:]))

  # the trainer differentiates argument 0 only; argument 1's gradient is dL/dW of the merged weights, for the
  # chain rule below (one compile for both)
  grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
  delta = _randomize(_shapes(p, "attention,mlp"), 1, zero_b=True)  # as at init: A random, B zero
  grads, grad_w = grad(delta, p)
  assert jax.tree.structure(grads) == jax.tree.structure(delta)  # only delta leaves: a and b of each target
  for path, g in _deltas(grads).items():
    assert np.all(np.asarray(g.a) == 0), path  # dL/dA = s·dL/dW·Bᵀ = 0 while B = 0
    per_layer = np.abs(np.asarray(g.b)).reshape(CFG.num_layers, -1).max(axis=1)
    assert np.all(per_layer > 0), path
    # chain rule, in numpy: dL/dB = s·Aᵀ·dL/dW, with W as [layers, in, out]
    lw, gw = _deltas(delta)[path], np.asarray(_get(grad_w, path), np.float64)
    a = np.asarray(lw.a, np.float64).reshape(CFG.num_layers, -1, RANK)
    want = lw.scale * a.transpose(0, 2, 1) @ gw.reshape(CFG.num_layers, a.shape[1], -1)
    np.testing.assert_allclose(np.asarray(g.b).reshape(want.shape), want, rtol=1e-4, atol=1e-7, err_msg=path)
  # once B moves, A gets gradients too
  stepped = jax.tree.map(lambda x, g: x - 0.1 * g, delta, grads)
  assert all(np.any(np.asarray(g.a) != 0) for g in _deltas(grad(stepped, p)[0]).values())


# ----------------------------------------------------------------------------------------------- counts


def num_trainable_formula(cfg, *, rank: int, targets) -> int:
  """The independent count: r·(in + out) per targeted matrix, × num_layers for layer weights, from a
  model.ModelConfig, which `lora.num_trainable(lora.init(...))` must equal. Targets are matched against the
  scanned paths ("layers/...")."""
  d, h, k, e, f, v = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim, cfg.vocab_size
  layer = {"attn/q/kernel": (d, h * e), "attn/k/kernel": (d, k * e), "attn/v/kernel": (d, k * e),
           "attn/o/kernel": (h * e, d), "mlp/gate/kernel": (d, f), "mlp/up/kernel": (d, f),
           "mlp/down/kernel": (f, d)}
  matrices = {f"layers/{name}": (i, o, cfg.num_layers) for name, (i, o) in layer.items()}
  matrices["embed/embedding"] = (v, d, 1)
  if not cfg.tie_embeddings:
    matrices["lm_head/kernel"] = (d, v, 1)
  patterns = [p for _, ps in lora.resolve_targets(targets) for p in ps]
  return sum(rank * (i + o) * n for path, (i, o, n) in matrices.items() if any(re.search(p, path) for p in patterns))


@pytest.mark.parametrize("scan,tie,targets", [(True, False, "attention"), (False, False, "all"),
                                              (True, True, "mlp,embed"), (True, True, "all")])
def test_num_trainable_equals_the_formula(scan, tie, targets):
  cfg = _cfg(scan, tie)
  abstract = model_lib.abstract_params(cfg)
  delta = _shapes(abstract, targets)
  d, h, k, e, f, v, n, r = (cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim,
                            cfg.vocab_size, cfg.num_layers, RANK)
  per = {"attention": r * ((d + h * e) + 2 * (d + k * e) + (h * e + d)) * n, "mlp": r * 3 * (d + f) * n,
         "embed": r * (v + d), "lm_head": 0 if tie else r * (d + v)}
  names = list(per) if targets == "all" else targets.split(",")
  want = sum(per[t] for t in names)
  assert lora.num_trainable(delta) == want == num_trainable_formula(cfg, rank=RANK, targets=targets)


def test_a_small_preset_delta_is_under_5_percent_of_the_model():
  cfg = model_lib.model_config("small", vocab_size=8192)
  abstract = model_lib.abstract_params(cfg)
  delta = _shapes(abstract, "attention,mlp", rank=8, alpha=16.0)
  nbytes = lambda t: sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(t))
  assert nbytes(delta) < 0.05 * nbytes(abstract)  # 2.15%: 598,016 of 27.8M parameters
  assert lora.num_trainable(delta) == num_trainable_formula(cfg, rank=8, targets="attention,mlp")


def test_rslora_scale():
  delta = _shapes(_base(), "mlp", rank=16, alpha=8.0, rslora=True)
  assert all(lw.scale == 8.0 / 4.0 for lw in _deltas(delta).values())
  assert lora.scaling(16, 8.0) == 0.5 and lora.scaling(16, 8.0, rslora=True) == 2.0


# ---------------------------------------------------------------------------------------------- combine


def test_combine_is_the_weighted_sum_of_deltas():
  p, names = _base(), _names()
  d1 = _randomize(_shapes(p, "attention", rank=4, alpha=8.0), 5)
  d2 = _randomize(_shapes(p, "attention,mlp", rank=2, alpha=4.0, rslora=True), 6)
  w1, w2 = 0.7, -0.3
  combined = lora.combine([d1, d2], [w1, w2])
  q = combined["layers"]["attn"]["q"]["kernel"]
  assert q.scale == 1.0 and q.a.shape[-1] == q.b.shape[1] == 6
  merged = merge(p, combined)
  for path, w in _leaves(p).items():
    want = np.asarray(w, np.float64)
    for weight, tree in ((w1, _deltas(d1)), (w2, _deltas(d2))):
      if path in tree:
        want = want + weight * (_np_merged(w, tree[path], names[path]) - np.asarray(w, np.float64))
    np.testing.assert_allclose(_get(merged, path), want, rtol=1e-5, atol=1e-6, err_msg=path)


# ------------------------------------------------------------------------------------------------- int8


def test_int8_base():
  cfg, p = _cfg(), _base()
  q = jax.jit(lora.quantize_int8, static_argnums=1)(p, "all")
  qk = q["layers"]["attn"]["q"]["kernel"]
  assert isinstance(qk, lora.QuantizedWeight) and qk.values.dtype == jnp.int8 and qk.scale.dtype == jnp.float32
  assert qk.scale.shape == (CFG.num_layers, 1, CFG.num_heads, CFG.head_dim)       # per layer and output channel
  assert q["layers"]["attn"]["o"]["kernel"].scale.shape == (CFG.num_layers, 1, 1, CFG.d_model)
  assert lora.quantize_int8(p, "attention")["final_norm"]["scale"] is p["final_norm"]["scale"]
  deq = lora.dequantize(q)
  worst = 0.0
  for path, x in _leaves(q).items():
    if not path.endswith("/values"):
      continue
    path = path[:-len("/values")]
    qw, w = _get(q, path), np.asarray(_get(p, path))
    absmax = np.asarray(qw.scale) * 127  # broadcasts over the input dims
    rel = np.abs(np.asarray(_get(deq, path)) - w) / absmax
    assert rel.max() <= 0.5 / 127 + 1e-6, path  # round-to-nearest: half a step of absmax/127
    worst = max(worst, float(rel.max()))
  tokens = _tokens(2)
  logits, logits_q = np.asarray(fwd(cfg, p, tokens)), np.asarray(fwd(cfg, deq, tokens))
  ce = lambda z: float(np.mean(np.log(np.exp(z[:, :-1]).sum(-1)) - np.take_along_axis(
      z[:, :-1], np.asarray(tokens)[:, 1:, None], -1)[..., 0]))  # next-token cross-entropy
  ref, got, diff = ce(logits), ce(logits_q), np.abs(logits - logits_q)
  print(f"int8: max |W - deq(W)| / channel absmax = {worst:.5f}; loss {ref:.5f} -> {got:.5f} "
        f"(diff {abs(got - ref):.2e}); |logits diff| mean {diff.mean():.2e} max {diff.max():.2e} "
        f"(logits std {logits.std():.2f})")
  # measured on this random base: loss diff 1e-3, logits diff mean 0.03 / max 0.3 for logits of std 1.2
  assert abs(got - ref) < 1e-2 and diff.mean() < 0.05 * logits.std() and diff.max() < 0.5
  # LoRA on the int8 base inside jit: the quantized tree is a frozen argument of arrays
  delta = _randomize(_shapes(p, "attention"), 1)
  both = jax.jit(lambda d, qp: lora.merge(lora.dequantize(qp), d))(delta, q)
  for path, w in _leaves(merge(deq, delta)).items():
    np.testing.assert_allclose(_get(both, path), w, rtol=1e-6, atol=1e-6, err_msg=path)


# ---------------------------------------------------------------------------------------- logical axes


@pytest.mark.parametrize("scan", [True, False])
def test_logical_axes_follow_the_base(scan):
  cfg, names = _cfg(scan), _names(scan)
  base_axes = model_lib.logical_axes(cfg)
  abstract = model_lib.abstract_params(cfg)
  init_fn = functools.partial(lora.init_boxed, abstract, base_axes, rank=RANK, alpha=ALPHA, targets="all")
  boxed = jax.eval_shape(lambda rng: init_fn(rng=rng), jax.random.key(0))
  delta = nn.meta.unbox(boxed)
  specs = lora.logical_axes(delta, base_axes)
  assert nn.get_partition_spec(boxed) == specs
  for path, lw in _deltas(delta).items():
    spec = _deltas(specs)[path]
    nb, ni = _split(names[path])
    assert len(spec.a) == lw.a.ndim and len(spec.b) == lw.b.ndim, path
    assert tuple(spec.a) == (*names[path][:nb + ni], "lora_rank"), path
    assert tuple(spec.b) == (*names[path][:nb], "lora_rank", *names[path][nb + ni:]), path
  mesh_specs = sharding.logical_to_mesh(specs)
  q = _deltas(mesh_specs)["layers/attn/q/kernel" if scan else "layers_0/attn/q/kernel"]
  lead = (None,) if scan else ()
  assert q.a == P(*lead, "fsdp", None) and q.b == P(*lead, None, "tensor", None)  # shards like the base kernel
  # the quantized base too: int8 values like the base, scales replicated on the input dims
  qspecs = lora.logical_axes(jax.eval_shape(lora.quantize_int8, abstract), base_axes)
  qo = qspecs["layers"]["attn"]["o"]["kernel"] if scan else qspecs["layers_0"]["attn"]["o"]["kernel"]
  assert qo.values == P(*names["layers/attn/o/kernel" if scan else "layers_0/attn/o/kernel"])
  assert qo.scale == P(*(("layers",) if scan else ()), None, None, "embed")
  sharding.logical_to_mesh(qspecs)


def test_the_trainer_path_init_sharded_from_eval_shape():
  """As train.py does: shardings from eval_shape of the boxed init, then a jitted init with out_shardings."""
  cfg = _cfg()
  base_axes, abstract = model_lib.logical_axes(cfg), model_lib.abstract_params(cfg)
  targets = r"mlp/down/kernel$"
  init_fn = lambda rng: lora.init_boxed(abstract, base_axes, rank=RANK, alpha=ALPHA, targets=targets, rng=rng)
  mesh = Mesh(np.array(jax.devices()[:1]).reshape((1,) * len(sharding.MESH_AXES)), sharding.MESH_AXES)
  shardings = sharding.logical_to_sharding(nn.get_partition_spec(jax.eval_shape(init_fn, jax.random.key(0))), mesh)
  delta = jax.jit(lambda rng: nn.meta.unbox(init_fn(rng)), out_shardings=shardings)(jax.random.key(1))
  plain = lora.init(_base(), rank=RANK, alpha=ALPHA, targets=targets, rng=jax.random.key(1))
  assert jax.tree.structure(delta) == jax.tree.structure(plain)
  for got, want in zip(jax.tree.leaves(delta), jax.tree.leaves(plain)):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------------- errors


def test_targets_that_match_nothing_raise():
  p, tied = model_lib.abstract_params(CFG), model_lib.abstract_params(_cfg(tie=True))  # shapes are enough
  shapes = _shapes
  with pytest.raises(ValueError, match=r"'attn/qq' .* matches no parameter.*layers/attn/q/kernel"):
    shapes(p, "attention,attn/qq")
  with pytest.raises(ValueError, match="'lm_head'"):  # tied embeddings: there is no lm_head
    shapes(tied, "lm_head")
  assert "lm_head" not in shapes(tied, "all") and "lm_head" in shapes(p, "all")
  with pytest.raises(ValueError, match="not a matrix"):
    shapes(p, "final_norm")
  with pytest.raises(ValueError, match="not parameters of the base"):
    lora.merge(_base(scan=False), _shapes(p, "mlp"))
