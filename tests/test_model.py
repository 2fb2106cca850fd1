"""The model against an independent numpy implementation, and its structural properties."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import model as model_lib

CFG = model_lib.ModelConfig(vocab_size=256, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                            mlp_dim=64, rope_theta=10_000.0)


@pytest.fixture(scope="module")
def params():
  return model_lib.init(CFG, jax.random.key(0))


@pytest.fixture(scope="module")
def fwd():
  return jax.jit(model_lib.forward, static_argnums=0)


def _tokens(seed, shape=(2, 12)):
  return jax.random.randint(jax.random.key(seed), shape, 0, CFG.vocab_size)


# ---- an independent numpy reference: per-head loops, complex-number RoPE, explicit masks ----

def _np_rope(x_TxE, pos_T, theta):
  e = x_TxE.shape[-1]
  freq = 1.0 / theta ** (np.arange(0, e, 2) / e)
  z = (x_TxE[:, : e // 2] + 1j * x_TxE[:, e // 2:]) * np.exp(1j * pos_T[:, None] * freq)
  return np.concatenate([z.real, z.imag], axis=-1)


def _np_rmsnorm(x, scale, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _np_forward(cfg, p, tokens_T, segments_T, positions_T, prefix=None):
  """Logits [T, V]. `prefix`: keys and values ([L, P, K, E] each) every token also attends to, used as given."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  x = p["embed"]["embedding"][tokens_T]
  t = len(tokens_T)
  group = cfg.num_heads // cfg.num_kv_heads
  for layer in range(cfg.num_layers):
    lp = jax.tree.map(lambda a: a[layer], p["layers"])
    h = _np_rmsnorm(x, lp["attn_norm"]["scale"], cfg.norm_eps)
    out = np.zeros((t, cfg.num_heads, cfg.head_dim))
    for head in range(cfg.num_heads):
      kv = head // group
      q = _np_rope(h @ lp["attn"]["q"]["kernel"][:, head], positions_T, cfg.rope_theta)
      k = _np_rope(h @ lp["attn"]["k"]["kernel"][:, kv], positions_T, cfg.rope_theta)
      v = h @ lp["attn"]["v"]["kernel"][:, kv]
      if prefix is not None:  # the prefix's keys and values first, seen by every token
        k = np.concatenate([np.asarray(prefix[0][layer][:, kv], np.float64), k])
        v = np.concatenate([np.asarray(prefix[1][layer][:, kv], np.float64), v])
      n = 0 if prefix is None else prefix[0].shape[1]
      for i in range(t):
        allowed = list(range(n)) + [n + j for j in range(i + 1) if segments_T[j] == segments_T[i]]
        s = np.array([q[i] @ k[j] for j in allowed]) / np.sqrt(cfg.head_dim)
        w = np.exp(s - s.max())
        out[i, head] = (w / w.sum()) @ v[allowed]
    x = x + np.einsum("the,hed->td", out, lp["attn"]["o"]["kernel"])
    h = _np_rmsnorm(x, lp["mlp_norm"]["scale"], cfg.norm_eps)
    gate = h @ lp["mlp"]["gate"]["kernel"]
    x = x + (gate / (1 + np.exp(-gate)) * (h @ lp["mlp"]["up"]["kernel"])) @ lp["mlp"]["down"]["kernel"]
  x = _np_rmsnorm(x, p["final_norm"]["scale"], cfg.norm_eps)
  head = p["embed"]["embedding"].T if cfg.tie_embeddings else p["lm_head"]["kernel"]
  return x @ head


@pytest.mark.parametrize("tie", [False, True])
def test_forward_matches_numpy_reference(tie):
  cfg = dataclasses.replace(CFG, tie_embeddings=tie)
  p = model_lib.init(cfg, jax.random.key(1))
  tokens = _tokens(1, (1, 10))
  segments = jnp.array([[1, 1, 1, 1, 2, 2, 2, 2, 2, 0]])
  positions = jnp.array([[0, 1, 2, 3, 0, 1, 2, 3, 4, 0]])
  got = jax.jit(model_lib.forward, static_argnums=0)(cfg, p, tokens, segments, positions)[0]
  want = _np_forward(cfg, p, np.asarray(tokens[0]), np.asarray(segments[0]), np.asarray(positions[0]))
  assert got.dtype == jnp.float32 and got.shape == (10, cfg.vocab_size)
  np.testing.assert_allclose(got, want, atol=2e-4, rtol=2e-4)


def test_causality(params, fwd):
  tokens = _tokens(2)
  base = fwd(CFG, params, tokens)
  j = 7
  changed = fwd(CFG, params, tokens.at[:, j].set((tokens[:, j] + 1) % CFG.vocab_size))
  np.testing.assert_array_equal(base[:, :j], changed[:, :j])  # nothing before j sees token j
  assert np.abs(base[:, j:] - changed[:, j:]).max() > 1e-3  # and j onwards does


def test_packed_documents_are_isolated(params, fwd):
  """A document packed after another gives the logits it has alone, and editing one never moves the other."""
  doc_a, doc_b = _tokens(3, (1, 5)), _tokens(4, (1, 7))
  packed = jnp.concatenate([doc_a, doc_b], axis=1)
  segments = jnp.array([[1] * 5 + [2] * 7])
  positions = jnp.array([list(range(5)) + list(range(7))])
  logits = fwd(CFG, params, packed, segments, positions)
  np.testing.assert_allclose(logits[:, :5], fwd(CFG, params, doc_a), atol=1e-5)
  np.testing.assert_allclose(logits[:, 5:], fwd(CFG, params, doc_b), atol=1e-5)
  other_a = packed.at[:, :5].set((packed[:, :5] + 3) % CFG.vocab_size)
  np.testing.assert_array_equal(fwd(CFG, params, other_a, segments, positions)[:, 5:], logits[:, 5:])


def test_rope_depends_only_on_relative_position():
  q, k = jax.random.normal(jax.random.key(5), (2, 1, 1, 1, 16))
  rope = jax.jit(model_lib.rope, static_argnums=2)

  def score(m, n):
    return float(jnp.sum(rope(q, jnp.array([[m]]), 10_000.0) * rope(k, jnp.array([[n]]), 10_000.0)))
  assert score(3, 1) == pytest.approx(score(103, 101), abs=1e-4)
  assert score(10, 4) == pytest.approx(score(6, 0), abs=1e-4)
  assert abs(score(3, 1) - score(4, 1)) > 1e-3
  # and against the complex-number form
  x = np.asarray(jax.random.normal(jax.random.key(6), (5, 16)))
  got = rope(jnp.asarray(x)[None, :, None], jnp.arange(5)[None], 500.0)[0, :, 0]
  np.testing.assert_allclose(got, _np_rope(x, np.arange(5), 500.0), atol=1e-5)


def test_rope_tables_give_the_direct_numbers_and_are_made_once_per_forward():
  """sin and cos looked up in tables of positions 0..P-1 (CPU) are bit-equal to computing them; a position outside
  the tables falls back to computing them; and the model makes them once, not in each layer."""
  scaling = (("factor", 8.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
             ("original_max_position_embeddings", 16), ("rope_type", "llama3"))
  both = jax.jit(lambda p: (model_lib.rope_sin_cos(p, 16, 500.0, scaling, table_len=8),
                            model_lib.rope_sin_cos(p, 16, 500.0, scaling)))
  positions = jnp.array([[0, 1, 2, 3], [5, 6, 7, 2]])
  for p in (positions, positions.at[1, 3].set(1000), positions.at[0, 0].set(-1)):
    looked_up, direct = both(p)
    for got, want in zip(looked_up, direct):
      np.testing.assert_array_equal(got, want)
  angle = 1000 * np.asarray(model_lib.rope_frequencies(16, 500.0, scaling))
  np.testing.assert_allclose(both(positions.at[1, 3].set(1000))[0][0][1, 3], np.sin(angle), atol=1e-4)

  def sines(num_layers):
    cfg = dataclasses.replace(CFG, num_layers=num_layers, scan_layers=False)
    params = model_lib.init(cfg, jax.random.key(0))
    loss = lambda params: jnp.sum(model_lib.forward(cfg, params, _tokens(1)) ** 2)
    return jax.jit(jax.grad(loss)).lower(params).compile().as_text().count(" sine(")
  assert sines(1) == sines(3) <= 2


def _unscan(p, num_layers):
  out = {k: v for k, v in p.items() if k != "layers"}
  for i in range(num_layers):
    out[f"layers_{i}"] = jax.tree.map(lambda a: a[i], p["layers"])
  return out


def test_scan_equals_loop_and_remat_equals_no_remat(params, fwd):
  tokens = _tokens(7)
  ref = fwd(CFG, params, tokens)
  loop_cfg = dataclasses.replace(CFG, scan_layers=False)
  np.testing.assert_allclose(fwd(loop_cfg, _unscan(params, CFG.num_layers), tokens), ref, atol=1e-5)
  assert jax.tree.structure(model_lib.abstract_params(loop_cfg)) == jax.tree.structure(
      _unscan(params, CFG.num_layers))

  def grads(cfg):
    return jax.jit(jax.grad(lambda p: jnp.mean(model_lib.forward(cfg, p, tokens) ** 2)))(params)
  remat = grads(dataclasses.replace(CFG, remat_policy="full"))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), remat, grads(CFG))


def test_relayout_converts_between_scanned_and_looped_layers(params):
  loop_cfg = dataclasses.replace(CFG, scan_layers=False)
  host = jax.tree.map(np.asarray, params)
  looped = model_lib.relayout(host, False)
  assert jax.tree.structure(looped) == jax.tree.structure(model_lib.abstract_params(loop_cfg))
  jax.tree.map(np.testing.assert_array_equal, looped, _unscan(host, CFG.num_layers))
  assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(looped))  # host arrays stay on the host
  back = model_lib.relayout(looped, True)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, back, host)
  assert model_lib.relayout(host, True) == host and model_lib.relayout(looped, False) == looped  # no-ops
  # any tree keyed like the params: a LoRA delta's {a, b} per weight, and the entries beside the layers
  delta = {"layers": {"attn": {"q": {"kernel": {"a": np.arange(12.).reshape(2, 3, 2), "b": np.ones((2, 2, 4))}}}},
           "prefix": {"k": np.zeros((2, 5, 1, 4))}}
  split = model_lib.relayout(delta, False)
  assert sorted(split) == ["layers_0", "layers_1", "prefix"] and split["prefix"]["k"] is delta["prefix"]["k"]
  a = lambda tree: tree["attn"]["q"]["kernel"]["a"]
  np.testing.assert_array_equal(a(split["layers_1"]), a(delta["layers"])[1])
  jax.tree.map(np.testing.assert_array_equal, model_lib.relayout(split, True), delta)
  # a seed gives the same model in either layout
  jax.tree.map(np.testing.assert_array_equal, model_lib.init(loop_cfg, jax.random.key(0)), looped)


def test_bfloat16_compute_keeps_float32_params_and_logits(params, fwd):
  cfg = dataclasses.replace(CFG, dtype="bfloat16")
  tokens = _tokens(8)
  logits = fwd(cfg, params, tokens)
  assert logits.dtype == jnp.float32
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(model_lib.abstract_params(cfg)))
  ref = fwd(CFG, params, tokens)
  assert float(jnp.max(jnp.abs(logits - ref))) < 0.1 * float(jnp.max(jnp.abs(ref)))


def _formula(c):
  """Parameter count from the architecture, written out independently of the module code."""
  attn = c.d_model * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
  mlp = 3 * c.d_model * c.mlp_dim
  per_layer = attn + mlp + 2 * c.d_model
  if c.qkv_bias:
    per_layer += c.head_dim * (c.num_heads + 2 * c.num_kv_heads)
  head = 0 if c.tie_embeddings else c.vocab_size * c.d_model
  return c.num_layers * per_layer + c.vocab_size * c.d_model + head + c.d_model


@pytest.mark.parametrize("size,published", [
    ("124m", None), ("1b", 1_235_814_400), ("7b", 6_738_415_616), ("70b", 68_976_648_192)])
def test_preset_parameter_counts(size, published):
  cfg = model_lib.model_config(size)
  n = model_lib.num_params(cfg)
  assert n == _formula(cfg)
  if published:
    assert n == published  # Llama-3.2-1B, Llama-2-7B, Llama-2-70B as published
  assert 1e6 <= model_lib.num_params(model_lib.model_config("tiny", vocab_size=2048)) <= 3e6
  assert 20e6 <= model_lib.num_params(model_lib.model_config("small", vocab_size=8192)) <= 30e6


def test_every_param_has_logical_axes():
  cfg = dataclasses.replace(CFG, qkv_bias=True)
  shapes = model_lib.abstract_params(cfg)
  axes = model_lib.logical_axes(cfg)
  flat_axes = dict(jax.tree_util.tree_leaves_with_path(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)))
  for path, leaf in jax.tree_util.tree_leaves_with_path(shapes):
    spec = flat_axes[path]
    assert len(spec) == leaf.ndim, jax.tree_util.keystr(path)
    assert all(name in model_lib.AXES for name in spec), (jax.tree_util.keystr(path), spec)
  assert flat_axes[next(p for p in flat_axes if "embedding" in jax.tree_util.keystr(p))] == \
      jax.sharding.PartitionSpec("vocab", "embed")


def test_flops_per_token_by_hand():
  """Matmul weights by hand; causal attention counted as half; a frozen base skips the weight gradients (a
  forward's worth); a reference adds a forward."""
  c, t = CFG, 64
  n = c.num_layers * (c.d_model * c.num_heads * c.head_dim * 2 + 2 * c.d_model * c.num_kv_heads * c.head_dim
                      + 3 * c.d_model * c.mlp_dim) + c.vocab_size * c.d_model  # q, o, k, v, gate/up/down, logits
  forward = 2 * n + 4 * c.num_layers * c.num_heads * c.head_dim * t / 2
  assert model_lib.flops_per_token(c, t) == pytest.approx(3 * forward)
  assert model_lib.flops_per_token(c, t, frozen_weights=True) == pytest.approx(3 * forward - 2 * n)
  assert model_lib.flops_per_token(c, t, reference=True) == pytest.approx(4 * forward)
  tied = dataclasses.replace(c, tie_embeddings=True)  # one matrix, still a logits matmul
  assert model_lib.flops_per_token(tied, t) == pytest.approx(3 * forward)


def test_mfu_peak_is_the_datasheet_on_known_gpus():
  from jaxllm import metrics
  assert metrics.datasheet_peak("NVIDIA H100 80GB HBM3") == 989e12
  assert metrics.datasheet_peak("NVIDIA H200") == 989e12 and metrics.datasheet_peak("NVIDIA A100-SXM4-80GB") == 312e12
  assert metrics.datasheet_peak("cpu") is None
  peak, how = metrics.peak_flops()  # this CPU: measured
  assert how == "measured" and peak > 0
  cache, kept = os.environ["JAXLLM_PEAK_FLOPS_CACHE"], metrics._measure_peak_flops.cache_info().currsize
  before = open(cache).read()
  fresh = metrics.measure_peak_flops("float32", n=64, seconds=0.01, trials=1, fresh=True)  # measured now, not kept
  assert fresh > 0 and open(cache).read() == before
  assert metrics._measure_peak_flops.cache_info().currsize == kept


def test_dot_product_attention_equals_the_einsums(params, fwd):
  """model.attention=dot_product (jax.nn.dot_product_attention) on a packed row with padding: logits and
  gradients of the einsum path."""
  cfg = dataclasses.replace(CFG, attention="dot_product")
  tokens = _tokens(5, (2, 10))
  segments = jnp.array([[1, 1, 1, 1, 2, 2, 2, 2, 2, 0], [1] * 10])
  positions = jnp.array([[0, 1, 2, 3, 0, 1, 2, 3, 4, 0], list(range(10))])
  np.testing.assert_allclose(fwd(cfg, params, tokens, segments, positions),
                             fwd(CFG, params, tokens, segments, positions), atol=1e-5, rtol=1e-5)
  loss = lambda c: lambda p: jnp.sum(model_lib.forward(c, p, tokens, segments, positions)[..., :3] ** 2)
  grads = [jax.tree.leaves(jax.jit(jax.grad(loss(c)))(params)) for c in (cfg, CFG)]
  for g, w in zip(*grads):
    np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)


def test_query_blocks_equal_one_block(params, fwd):
  """model.query_blocks: attention in n query blocks, each against the keys up to its end, on packed rows with
  padding: the logits and gradients of one block (itself checked against the numpy reference above); a length
  that n does not divide runs as one block."""
  tokens = _tokens(6, (2, 12))
  segments = jnp.array([[1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 0], [1] * 12])
  positions = jnp.array([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 0], list(range(12))])
  loss = lambda c: lambda p: jnp.sum(model_lib.forward(c, p, tokens, segments, positions)[..., :3] ** 2)
  want_logits = fwd(CFG, params, tokens, segments, positions)
  want_grads = jax.tree.leaves(jax.jit(jax.grad(loss(CFG)))(params))
  for n in (2, 3, 5):  # 5 does not divide 12: one block
    cfg = dataclasses.replace(CFG, query_blocks=n)
    np.testing.assert_allclose(fwd(cfg, params, tokens, segments, positions), want_logits, atol=1e-5, rtol=1e-5)
    for g, w in zip(jax.tree.leaves(jax.jit(jax.grad(loss(cfg)))(params)), want_grads):
      np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)
  hlo = lambda n: jax.jit(lambda p: model_lib.forward(dataclasses.replace(CFG, query_blocks=n), p, tokens)).lower(
      params).as_text()
  assert hlo(2).count("dot_general") > hlo(1).count("dot_general")  # the blocks are really there
  with pytest.raises(ValueError, match="query_blocks"):
    dataclasses.replace(CFG, query_blocks=0)


def test_cpu_matmul_makes_the_weight_gradient_with_its_shorter_side_as_rows():
  """model.matmul on CPU (_cpu_matmul): values and both gradients against numpy in float64, bit-equal to autodiff
  of the plain x @ w; and in the optimized step the weight gradient's dot computes [shorter, longer] whichever
  way the weight is laid out, the tied logits' [V, D] gradient included (the barrier keeps XLA from folding the
  transpose back: without it the dot computes [V, D] again)."""
  rng = np.random.default_rng(0)
  for batch, i, o in (((), 24, 8), ((), 24, 40), ((3,), 24, 8), ((3,), 24, 40)):  # (3,): attention's batch dims
    x, w, dy = (rng.normal(size=(*batch, *shape)).astype(np.float32) for shape in ((64, i), (i, o), (64, o)))
    loss = lambda mm: jax.jit(jax.grad(lambda x, w: jnp.sum(mm(x, w) * dy), argnums=(0, 1)))
    dx, dw = loss(model_lib.matmul)(x, w)
    x64, w64, dy64 = (a.astype(np.float64) for a in (x, w, dy))
    np.testing.assert_allclose(model_lib.matmul(x, w), x64 @ w64, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, dy64 @ np.swapaxes(w64, -1, -2), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, np.swapaxes(x64, -1, -2) @ dy64, rtol=1e-5, atol=1e-5)
    plain_dx, plain_dw = loss(lambda x, w: x @ w)(x, w)
    np.testing.assert_array_equal(dx, plain_dx)
    np.testing.assert_array_equal(dw, plain_dw)
    assert f"f32[{','.join(map(str, (*batch, min(i, o), max(i, o))))}]" in _dot_outputs(loss(model_lib.matmul), x, w)

  embed = model_lib.Embed(96, 24, dtype=jnp.float32)
  e = embed.init(jax.random.key(0), jnp.zeros((1,), jnp.int32))
  grad_e = jax.jit(jax.grad(lambda e, x: jnp.sum(embed.apply(e, x, method="attend") ** 2)))
  dots = _dot_outputs(grad_e, e, rng.normal(size=(64, 24)).astype(np.float32))
  assert "f32[24,96]" in dots and "f32[96,24]" not in dots, dots  # [D, V]: the shorter side as rows


def _dot_outputs(fn, *args) -> set[str]:
  """The result shapes of the dots in fn's optimized (compiled) HLO."""
  hlo = fn.lower(*args).compile().as_text()
  return {line.split("=")[1].split("{")[0].strip() for line in hlo.splitlines() if " dot(" in line}
