"""Device mesh, the logical-axis rules table, and the shardings derived from them.

Parameters and the main activations carry logical axis names (model.AXES); a rules table (config.mesh.rules,
default RULES) maps each name to mesh axes, or None = replicated. A logical name without a rule is an error,
so a new parameter cannot silently end up replicated.

The mesh is (data, fsdp, context, tensor), tensor innermost (the fastest links). `context` splits the sequence
("length") of the activations; attention gathers each layer's keys and values over it (model.Attention), so every
query still sees the whole row.
"""

from __future__ import annotations

import contextlib
import functools
import math

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "context", "tensor")

# logical name -> mesh axes. The batch splits over data and fsdp, each sequence over context; weights split their
# embed dim over fsdp (ZeRO-3 style: gathered per layer in the forward pass) and their head / mlp / vocab dim over
# tensor, and are whole across context.
RULES = (
    ("batch", ("data", "fsdp")),
    ("length", "context"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),
    ("lora_rank", None),  # the rank dim of LoRA's A and B: small, replicated
    ("prefix", None),  # the virtual tokens of prompt / prefix tuning (and their MLP's width): replicated
)


# logical name -> the ModelConfig field that sizes it
MODEL_DIMS = {"vocab": "vocab_size", "embed": "d_model", "heads": "num_heads", "kv_heads": "num_kv_heads",
              "head_dim": "head_dim", "mlp": "mlp_dim", "layers": "num_layers"}


def indivisible(model_dims: dict, axis_sizes: dict, rules=RULES) -> str | None:
  """Why the model's dims cannot be split over the mesh by the rules (one line naming the mesh axis and the model
  field), or None. `model_dims` maps ModelConfig fields to sizes (a field that is None is not checked)."""
  for name, axes in rules:
    size = model_dims.get(MODEL_DIMS.get(name))
    if size is None or axes is None:
      continue
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    parts = math.prod(axis_sizes[a] for a in axes)
    if size % parts:
      return (f"mesh.{'*'.join(axes)}: {parts} does not divide the model's {MODEL_DIMS[name]}={size} (logical axis "
              f"{name!r} is split over {', '.join(axes)}); choose a mesh that divides it")
  return None


def rules_of(config) -> tuple:
  """The config's rules table as a tuple of (name, mesh axes) pairs (JSON turns tuples into lists)."""
  as_axes = lambda a: tuple(a) if isinstance(a, (list, tuple)) else a
  return tuple((name, as_axes(axes)) for name, axes in config.mesh.rules)


def axis_sizes(mesh_config) -> dict[str, int]:
  """mesh.<axis> for each of MESH_AXES, as configured (-1 = fill). A mesh config from before the context axis
  (an old run's config.json, a hand-made ConfigDict) has context 1."""
  return {axis: getattr(mesh_config, axis, 1) for axis in MESH_AXES}


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, ...]:
  """The MESH_AXES sizes with a -1 filled from the device count (config.validate_mesh checked it divides)."""
  sizes = list(axis_sizes(mesh_config).values())
  known = math.prod(s for s in sizes if s > 0)
  return tuple(num_devices // known if s == -1 else s for s in sizes)


def make_mesh(mesh_config, devices=None, procs_per_node: int = 1) -> Mesh:
  """The (data, fsdp, context, tensor) mesh of `devices` (default: all), laid out by `layout`; build passes the
  processes per node of the run this process joined (distributed.procs_per_node())."""
  devices = jax.devices() if devices is None else devices
  return Mesh(layout(mesh_config, devices, procs_per_node), MESH_AXES)


def layout(mesh_config, devices, procs_per_node: int = 1) -> np.ndarray:
  """The (data, fsdp, context, tensor) array of `devices`, which need only `id`, `process_index`, `platform` and
  `device_kind`. Process p runs on node p // procs_per_node. On one node: mesh_utils' layout of all its devices.
  Across nodes, a hybrid mesh as mesh_utils.create_hybrid_device_mesh lays it with node granules: mesh.dcn_fsdp
  nodes share each fsdp group and the remaining nodes split data, over the slow network; the rest of each axis,
  and all of context (a gather of keys and values per layer) and tensor, stays inside a node (NVLink), so one
  process per GPU gives the mesh one per node does."""
  shape = mesh_shape(mesh_config, len(devices))
  by_node = {}
  for d in devices:
    by_node.setdefault(d.process_index // procs_per_node, []).append(d)
  nodes = len(by_node)
  if nodes == 1:
    return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  dcn = (nodes // mesh_config.dcn_fsdp, mesh_config.dcn_fsdp, 1, 1)
  if math.prod(dcn) != nodes or any(s % d for s, d in zip(shape, dcn)):
    raise ValueError(f"mesh: ({', '.join(MESH_AXES)})={shape} cannot be laid over {nodes} nodes as {dcn} nodes per "
                     f"axis (mesh.dcn_fsdp={mesh_config.dcn_fsdp}, {procs_per_node} processes per node)")
  ici = tuple(s // d for s, d in zip(shape, dcn))
  if sizes := {len(node) for node in by_node.values()} - {math.prod(ici)}:
    raise ValueError(f"mesh: nodes of {sorted(sizes)} devices, not {math.prod(ici)} each, for {shape} over {nodes} "
                     f"nodes ({procs_per_node} processes per node)")
  per_node = [mesh_utils.create_device_mesh(ici, by_node[n]) for n in sorted(by_node)]
  grid = np.arange(nodes).reshape(dcn).tolist()
  return np.block([[[[per_node[i] for i in row] for row in plane] for plane in cube] for cube in grid])


def check_rules(logical_specs, rules=RULES):
  """Raises if a logical axis name in `logical_specs` has no rule."""
  known = {name for name, _ in rules}
  for path, spec in jax.tree_util.tree_leaves_with_path(logical_specs, is_leaf=lambda x: isinstance(x, P)):
    for name in spec:
      if name is not None and name not in known:
        raise ValueError(f"parameter {jax.tree_util.keystr(path)} has logical axis {name!r} that matches no "
                         f"rule in the sharding rules table {sorted(known)}")


def logical_to_mesh(logical_specs, rules=RULES):
  """Logical PartitionSpecs -> mesh-axis PartitionSpecs."""
  check_rules(logical_specs, rules)
  return nn.logical_to_mesh(logical_specs, rules)


def logical_to_sharding(logical_specs, mesh: Mesh, rules=RULES):
  """A pytree of logical PartitionSpecs -> a pytree of NamedShardings on `mesh`."""
  check_rules(logical_specs, rules)
  return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def batch_sharding(mesh: Mesh, rules=RULES) -> NamedSharding:
  """Sharding of [batch, length] inputs: rows over data and fsdp, each row's tokens over context. Raises if a row
  would lie on the devices of several processes (see rows_across_processes)."""
  if reason := rows_across_processes(mesh.devices, rules):
    raise ValueError(reason)
  return logical_to_sharding(P("batch", "length"), mesh, rules)


def rows_across_processes(devices, rules=RULES) -> str | None:
  """Why a batch row would lie on the devices of more than one process, or None. `devices` is a mesh array
  (layout's). Each process reads its own rows of every batch (tasks.data_shards), so the devices that share a row
  (its context and tensor groups) must be one process's: one process per node, not per GPU, for mesh.context or
  mesh.tensor > 1."""
  batch = dict(rules).get("batch") or ()
  batch = (batch,) if isinstance(batch, str) else tuple(batch)
  keep = [i for i, axis in enumerate(MESH_AXES) if axis in batch]
  other = [i for i in range(devices.ndim) if i not in keep]
  rows = devices.transpose(keep + other).reshape(-1, math.prod(devices.shape[i] for i in other))
  for row in rows:
    if len(processes := sorted({d.process_index for d in row})) > 1:
      shared = " x ".join(f"mesh.{MESH_AXES[i]}={devices.shape[i]}" for i in other if devices.shape[i] > 1)
      return (f"mesh: a batch row lies on {len(row)} devices ({shared}) of processes {processes}, but each process "
              "reads its own rows; keep the axes that split a row inside one process: one process per node "
              "(PROCS_PER_NODE=1)")
  return None


def put_batch(batch, sharding: NamedSharding):
  """This process's rows of the global batch -> global jax.Arrays (works for one or many processes). Leaves of
  fewer dims than the sharding's spec (per-row values, [batch]) take its leading entries."""
  def put(x):
    s = sharding if x.ndim == len(sharding.spec) else NamedSharding(sharding.mesh, P(*sharding.spec[:x.ndim]))
    return jax.make_array_from_process_local_data(s, x)
  return jax.tree.map(put, batch)


def with_rules(jitted_fn, mesh: Mesh, rules=RULES):
  """Calls `jitted_fn` with the mesh and rules in context, so that when it traces, the model's activation
  constraints (nn.with_logical_constraint) resolve to mesh axes."""

  @functools.wraps(jitted_fn)
  def wrapped(*args, **kwargs):
    with contextlib.ExitStack() as stack:
      stack.enter_context(jax.set_mesh(mesh))
      stack.enter_context(nn.logical_axis_rules(rules))
      return jitted_fn(*args, **kwargs)

  return wrapped


def per_device_bytes(abstract_tree, mesh_axis_sizes: dict[str, int], logical_specs, rules=RULES) -> int:
  """Bytes one device holds of `abstract_tree` (ShapeDtypeStructs) under the rules on a mesh of the given
  axis sizes. Pure arithmetic: no devices needed, so any pod layout can be sized from a laptop."""
  mesh_specs = logical_to_mesh(logical_specs, rules)
  total = 0
  leaves = jax.tree.leaves(abstract_tree)
  specs = jax.tree.leaves(mesh_specs, is_leaf=lambda x: isinstance(x, P))
  assert len(leaves) == len(specs), (len(leaves), len(specs))
  for leaf, spec in zip(leaves, specs):
    shard = list(leaf.shape)
    for dim, axes in enumerate(spec):
      for axis in (axes if isinstance(axes, tuple) else (axes,)) if axes else ():
        shard[dim] = -(-shard[dim] // mesh_axis_sizes[axis])
    total += math.prod(shard) * np.dtype(leaf.dtype).itemsize
  return total
