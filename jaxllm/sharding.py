"""Device mesh, the logical-axis rules table, and the shardings derived from them.

Parameters carry logical axis names (model.AXES); RULES maps each name to a mesh axis (or None = replicated).
A logical name with no rule is an error, so a new parameter cannot silently end up replicated.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axes. Batch splits over data and fsdp; weights split their embed dim over fsdp and
# their head / mlp / vocab dim over tensor.
RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),
)


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor) with a -1 filled from the device count (config.validate_mesh checked it divides)."""
  sizes = [mesh_config.data, mesh_config.fsdp, mesh_config.tensor]
  known = int(np.prod([s for s in sizes if s > 0]))
  return tuple(num_devices // known if s == -1 else s for s in sizes)


def make_mesh(mesh_config, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_config, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def check_rules(logical_specs, rules=RULES):
  """Raises if a logical axis name in `logical_specs` has no rule."""
  known = {name for name, _ in rules}
  for path, spec in jax.tree_util.tree_leaves_with_path(logical_specs, is_leaf=lambda x: isinstance(x, P)):
    for name in spec:
      if name is not None and name not in known:
        raise ValueError(f"parameter {jax.tree_util.keystr(path)} has logical axis {name!r} that matches no "
                         f"rule in the sharding rules table {sorted(known)}")


def logical_to_sharding(logical_specs, mesh: Mesh, rules=RULES):
  """A pytree of logical PartitionSpecs -> a pytree of NamedShardings on `mesh`."""
  check_rules(logical_specs, rules)
  return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def batch_sharding(mesh: Mesh, rules=RULES) -> NamedSharding:
  """Sharding of [batch, length] inputs."""
  return logical_to_sharding(P("batch", "length"), mesh, rules)


def put_batch(batch, sharding: NamedSharding):
  """This process's rows of the global batch -> global jax.Arrays (works for one or many processes)."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
