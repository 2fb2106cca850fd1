"""Context parallelism on 8 emulated CPU devices: the sequence split over mesh.context gives the loss and gradients
of one device, on packed rows whose documents cross the devices' slices; the one-device loss is checked against the
numpy reference model (tests/test_model.py) and its gradient against a numpy finite difference."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxllm import model as model_lib, sharding
from jaxllm.tasks import lm
from tests.test_model import _np_forward

# 4 heads and 2 KV heads split over tensor=2; T=32 gives each of 8 devices 4 tokens. One (scanned) layer: the
# sharding of every layer is the same, and each compile here costs seconds.
CFG = model_lib.ModelConfig(vocab_size=256, d_model=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8,
                            mlp_dim=64, scan_layers=True)
B, T = 4, 32
# (data, fsdp, context, tensor)
LAYOUTS = {"context=2,fsdp=4": (1, 4, 2, 1), "context=4,tensor=2": (1, 1, 4, 2), "context=8": (1, 1, 8, 1)}


def random_params():
  """Params drawn in numpy (model.init's compile alone costs seconds here), norm scales around 1."""
  rng = np.random.default_rng(2)
  draw = lambda path, a: ((1 + 0.1 * rng.standard_normal(a.shape)) if "scale" in jax.tree_util.keystr(path)
                          else 0.2 * rng.standard_normal(a.shape)).astype(np.float32)
  return jax.tree_util.tree_map_with_path(draw, model_lib.abstract_params(CFG))


def packed_batch():
  """4 rows of 2-4 documents each, of lengths that are not multiples of a device's slice (so documents start and
  end inside slices and span up to all 8 of them), the last row ending in padding (segment 0, no loss)."""
  docs = [[5, 13, 15], [9, 9, 7, 8], [3, 30], [20, 6]]  # T+1 tokens per row, then padding
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, CFG.vocab_size, (B, T + 1))
  segments, positions = np.zeros((B, T + 1), np.int32), np.zeros((B, T + 1), np.int32)
  for row, lengths in enumerate(docs):
    start = 0
    for i, n in enumerate(lengths):
      n = min(n, T + 1 - start)
      segments[row, start:start + n], positions[row, start:start + n] = i + 1, np.arange(n)
      start += n
  # a token's target is the next token of its own document: the loss skips document ends and padding
  mask = ((segments[:, 1:] == segments[:, :-1]) & (segments[:, :-1] > 0)).astype(np.float32)
  return {"inputs": tokens[:, :-1].astype(np.int32), "targets": tokens[:, 1:].astype(np.int32),
          "segment_ids": segments[:, :-1], "positions": positions[:, :-1], "loss_mask": mask}


def np_loss(params, batch):
  """Mean next-token cross-entropy over the masked tokens, the forward pass in float64 numpy, row by row."""
  total = 0.0
  for r in range(B):
    logits = _np_forward(CFG, params, batch["inputs"][r], batch["segment_ids"][r], batch["positions"][r])
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    total += np.sum((logz - logits[np.arange(T), batch["targets"][r]]) * batch["loss_mask"][r])
  return total / batch["loss_mask"].sum()


def mesh_of(layout, devices):
  m = ml_collections.ConfigDict(dict(zip(sharding.MESH_AXES, layout)) | {"dcn_fsdp": 1})
  return sharding.make_mesh(m, devices)


def compiled_sums(mesh, params, rows: int):
  """(the real loss (tasks.lm) and its gradient as sums over a batch of `rows` rows, compiled on `mesh`; the params
  placed there by the rules). As in the trainer (validate_mesh), each micro-batch holds one row per data-parallel
  shard: the layouts without data or fsdp take one row at a time and add up, as gradient accumulation does."""
  loss_fn = lm.next_token_loss_fn(CFG)

  def f(params, batch):
    (total, (weight, _)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
    return total, weight, grads

  params = jax.device_put(params, sharding.logical_to_sharding(model_lib.logical_axes(CFG), mesh))
  example = {k: jax.ShapeDtypeStruct((rows, T), v.dtype, sharding=sharding.batch_sharding(mesh))
             for k, v in packed_batch().items()}
  # LLVM's cheaper pipeline: the same HLO and arithmetic, a third less compile time on the CI's 2 cores
  fast = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
    return params, jax.jit(f, compiler_options=fast).lower(params, example).compile()


def mean_loss_and_grads(mesh, params, batch, rows: int):
  """(loss, grads, per-device FLOPs of one call, the first placed micro-batch) over `batch`, `rows` at a time."""
  params, sums = compiled_sums(mesh, params, rows)
  total, weight, grads, placed = 0.0, 0.0, None, []
  for start in range(0, B, rows):
    placed.append(sharding.put_batch({k: v[start:start + rows] for k, v in batch.items()},
                                     sharding.batch_sharding(mesh)))
    t, w, g = sums(params, placed[-1])
    total, weight = total + t, weight + w
    grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
  return (float(total / weight), jax.tree.map(lambda x: np.asarray(x / weight), grads),
          sums.cost_analysis()["flops"], placed[0])


def test_context_parallel_loss_and_grads_equal_one_device():
  assert jax.device_count() == 8
  params, batch = random_params(), packed_batch()
  # the activations' sequence dim goes where the batch's does
  assert sharding.logical_to_mesh(P("batch", "length", "embed")) == P(("data", "fsdp"), "context", None)
  want_loss, want_grads, want_flops, _ = mean_loss_and_grads(mesh_of((1, 1, 1, 1), jax.devices()[:1]), params,
                                                             batch, B)

  # one device against the definition: the loss from numpy, the gradient along a random direction u by a central
  # difference of the numpy loss (float64)
  np.testing.assert_allclose(want_loss, np_loss(params, batch), rtol=1e-5)
  leaves, tree = jax.tree.flatten(params)
  rng = np.random.default_rng(1)
  u = jax.tree.unflatten(tree, [rng.standard_normal(x.shape) for x in leaves])
  eps = 1e-4
  shifted = lambda s: jax.tree.map(lambda p, d: np.asarray(p, np.float64) + s * eps * d, params, u)
  fd = (np_loss(shifted(1), batch) - np_loss(shifted(-1), batch)) / (2 * eps)
  directional = sum(np.vdot(g, d) for g, d in zip(jax.tree.leaves(want_grads), jax.tree.leaves(u)))
  np.testing.assert_allclose(directional, fd, rtol=1e-4)

  table = []
  for name, layout in LAYOUTS.items():
    _, f, c, _ = layout
    loss, grads, flops, placed = mean_loss_and_grads(mesh_of(layout, jax.devices()), params, batch, f)
    # each device holds T/context tokens of one row, and does an eighth of the work (the row's keys and values
    # gathered, every projection on its own tokens): not the whole sequence's projections on every device
    assert {s.data.shape for s in placed["inputs"].addressable_shards} == {(1, T // c)}
    assert flops * (B // f) < 1.25 * want_flops / 8, (name, flops, want_flops)  # B/f calls
    d_loss = abs(loss - want_loss)
    d_grad = max(float(np.max(np.abs(g - w))) for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)))
    scale = max(float(np.max(np.abs(w))) for w in jax.tree.leaves(want_grads))
    table.append(f"| {name} | {d_loss:.1e} | {d_grad:.1e} |")
    assert d_loss <= 1e-6 * want_loss and d_grad <= 1e-5 * scale, (name, d_loss, d_grad, scale)
  print("\n| layout (8 CPU devices) | max abs loss difference | max abs grad difference |\n| --- | --- | --- |\n"
        + "\n".join(table) + f"\n(loss {want_loss:.4f}, largest gradient entry {scale:.2e})")
