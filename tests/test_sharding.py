"""Sharding rules, the memory model, and (in a subprocess with 8 emulated CPU devices) multi-device runs."""

import os
import subprocess
import sys

import jax
import pytest
from jax.sharding import PartitionSpec as P

from configs import pretrain
from jaxllm import memory, model as model_lib, sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_resolved_partition_specs_of_the_tiny_preset():
  """Golden: how every parameter of the tiny preset lies on the (data, fsdp, tensor) mesh."""
  cfg = model_lib.model_config("tiny", vocab_size=2048, qkv_bias=True)
  specs = sharding.logical_to_mesh(model_lib.logical_axes(cfg))
  assert specs == {
      "embed": {"embedding": P("tensor", "fsdp")},
      "final_norm": {"scale": P("fsdp")},
      "layers": {
          "attn": {"q": {"kernel": P(None, "fsdp", "tensor", None), "bias": P(None, "tensor", None)},
                   "k": {"kernel": P(None, "fsdp", "tensor", None), "bias": P(None, "tensor", None)},
                   "v": {"kernel": P(None, "fsdp", "tensor", None), "bias": P(None, "tensor", None)},
                   "o": {"kernel": P(None, "tensor", None, "fsdp")}},
          "attn_norm": {"scale": P(None, "fsdp")},
          "mlp": {"gate": {"kernel": P(None, "fsdp", "tensor")}, "up": {"kernel": P(None, "fsdp", "tensor")},
                  "down": {"kernel": P(None, "tensor", "fsdp")}},
          "mlp_norm": {"scale": P(None, "fsdp")},
      },
  }


def test_a_logical_axis_without_a_rule_is_an_error():
  specs = {"w": P("embed", "experts")}
  with pytest.raises(ValueError, match="'experts' that matches no rule"):
    sharding.logical_to_mesh(specs)


def test_per_device_bytes_by_hand():
  tree = {"a": jax.ShapeDtypeStruct((8, 6), "float32"), "b": jax.ShapeDtypeStruct((5,), "bfloat16")}
  specs = {"a": P("embed", "mlp"), "b": P("embed")}
  # a: 8/fsdp(4) x 6/tensor(2) floats = 2*3*4 bytes; b: ceil(5/4)=2 bf16 = 4 bytes
  assert sharding.per_device_bytes(tree, {"data": 2, "fsdp": 4, "tensor": 2}, specs) == 2 * 3 * 4 + 2 * 2


def test_fsdp_holds_an_eighth_of_data_parallel():
  for size in ("1b", "7b"):
    c = pretrain.get_config(f"size={size}")
    totals = []
    for data, fsdp in ((8, 1), (1, 8)):
      c.mesh.data, c.mesh.fsdp, c.mesh.tensor = data, fsdp, 1
      model_cfg = memory.config_lib.resolve_model(c, 0)
      totals.append(sum(memory.state_bytes_per_device(c, model_cfg).values()))
    assert totals[1] / totals[0] == pytest.approx(1 / 8, rel=1e-3)
    # with pure data parallelism each device holds params + grads + two AdamW moments in float32
    assert 0 <= totals[0] - 4 * 4 * model_lib.num_params(model_cfg) <= 64  # + the optimizer's step counters


@pytest.mark.parametrize("size,gpus", sorted(pretrain.MESHES))
def test_gpu_layouts_fit_in_80gb(size, gpus):
  c = pretrain.get_config(f"size={size},gpus={gpus}")
  assert memory.mesh_devices(c) == pretrain.GPUS[gpus]
  report = memory.report(c)
  assert report["total"] * 2 ** 30 < 80e9, report


def test_multidevice_suite():
  """tests/multidevice under 8 emulated CPU devices, in a fresh process (XLA reads the flag at start-up)."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAXLLM_MULTIDEVICE="1",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                         "tests/multidevice"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  print(proc.stdout[-6000:], proc.stderr[-3000:])
  assert proc.returncode == 0
