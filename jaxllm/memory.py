"""Per-device memory of a config on a mesh, computed without allocating anything: the train state's shapes come
from jax.eval_shape of the real init (params + AdamW state), their shards from the rules table, and activations
from a stated estimate. Used by bench/memory.py and by tests that check every GPU layout fits."""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax

from jaxllm import config as config_lib, optim, peft, sharding, step, tasks


def state_bytes_per_device(config, model_cfg) -> dict[str, int]:
  """{'params', 'optimizer', 'grads'}: bytes one device holds under config.mesh and config.mesh.rules."""
  tx = optim.optimizer(config.optimizer, config.train.steps)
  tuning = peft.make(config, model_cfg, tasks.make(config).needs_reference)
  init = functools.partial(step.init_state, init_trainable=tuning.init_trainable, tx=tx)
  boxed = jax.eval_shape(init, jax.random.key(0))
  specs = nn.get_partition_spec(boxed)
  abstract = nn.meta.unbox(boxed)
  axis_sizes = dict(zip(sharding.MESH_AXES, sharding.mesh_shape(config.mesh, mesh_devices(config))))
  rules = sharding.rules_of(config)
  params = sharding.per_device_bytes(abstract.params, axis_sizes, specs.params, rules)
  opt = sharding.per_device_bytes(abstract.opt_state, axis_sizes, specs.opt_state, rules)
  return {"params": params, "grads": params, "optimizer": opt}


def mesh_devices(config) -> int:
  sizes = sharding.axis_sizes(config.mesh)
  if -1 in sizes.values():
    raise ValueError("mesh: give every axis a size to size a layout without devices")
  return math.prod(sizes.values())


def activation_bytes(config, model_cfg) -> int:
  """An estimate of the activations one device holds at the peak of a step, in the compute dtype:

    saved between layers:  L · b·T/c·D                      (each layer's input; remat recomputes the rest)
      (without remat, ×12: every matmul input and output of a layer is kept for the backward pass)
    one layer's working set:  b·T/c·(12·D + 3·F/t)
      + 2·b·(T - T/c)·(K/t)·E    the other devices' keys and values of the row, gathered over context
      + 2·b·(H/t)·(T/c)·T        in float32: attention logits and probs, this device's queries x every key
    logits:  3 · b·T/c·V/t in float32 (logits, softmax, its gradient)

  with b = micro-batch per data-parallel shard, T = train.seq_len, c = mesh.context, t = mesh.tensor. A planning
  number, not a measurement.
  """
  m, tr, c = sharding.axis_sizes(config.mesh), config.train, model_cfg
  b = tr.batch_size // tr.grad_accum // (m["data"] * m["fsdp"])
  t, seq = m["tensor"], tr.seq_len
  local = seq // m["context"]  # the tokens of a row on this device
  width = 2 if c.dtype in ("bfloat16", "float16") else 4
  saved = c.num_layers * b * local * c.d_model * width * (1 if c.remat_policy == "full" else 12)
  layer = (b * local * (12 * c.d_model + 3 * c.mlp_dim // t) * width
           + 2 * b * (seq - local) * (c.num_kv_heads // t) * c.head_dim * width
           + 2 * b * (c.num_heads // t) * local * seq * 4)
  logits = 3 * b * local * c.vocab_size // t * 4
  return saved + layer + logits


def report(config) -> dict[str, float]:
  """GiB per device: params, grads, optimizer, activations, total."""
  model_cfg = config_lib.resolve_model(config, 0)
  out = state_bytes_per_device(config, model_cfg)
  out["activations"] = activation_bytes(config, model_cfg)
  out["total"] = sum(out.values())
  return {k: v / 2 ** 30 for k, v in out.items()}
