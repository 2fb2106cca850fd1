"""Sharding rules, the memory model, and (in a subprocess with 8 emulated CPU devices) multi-device runs."""

import jax
import ml_collections
import pytest
from jax.sharding import PartitionSpec as P

from configs import pretrain
from jaxllm import config as config_lib, memory, model as model_lib, sharding
from jaxllm.errors import ConfigError
from tests import conftest


def test_resolved_partition_specs_of_the_tiny_preset():
  """Golden: how every parameter of the tiny preset, its layers scanned, lies on the (data, fsdp, tensor) mesh."""
  cfg = model_lib.model_config("tiny", vocab_size=2048, qkv_bias=True, scan_layers=True)
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
  """tests/multidevice under 8 emulated CPU devices, in a fresh process (XLA reads the flag at start-up), started
  in the background as soon as the suite is collected (conftest.pytest_collection_finish)."""
  returncode, output = conftest.multidevice_result()
  print(output[-8000:])
  assert returncode == 0


def test_activations_of_a_context_parallel_layout_by_hand():
  """memory.activation_bytes on mesh.context=4: per-token terms hold T/4 of a row, attention 4 of 16 query
  slices against all 64 keys, plus the other devices' gathered keys and values."""
  c = pretrain.get_config("size=tiny").unlock()
  c.train.batch_size, c.train.grad_accum, c.train.seq_len = 8, 1, 64
  c.mesh.data, c.mesh.fsdp, c.mesh.context, c.mesh.tensor = 1, 2, 4, 1
  cfg = model_lib.ModelConfig(vocab_size=512, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                              mlp_dim=128, remat_policy="full")
  # b = 8 rows / fsdp 2 = 4 rows per device, 64 / 4 = 16 tokens each; float32
  saved = 2 * 4 * 16 * 64 * 4                       # each layer's input
  working = 4 * 16 * (12 * 64 + 3 * 128) * 4        # one layer's matmul inputs and outputs
  gathered = 2 * 4 * (64 - 16) * 2 * 16 * 4         # keys and values of the other 48 positions, 2 KV heads
  attention = 2 * 4 * 4 * 16 * 64 * 4               # logits and probs: 4 heads x 16 queries x 64 keys
  logits = 3 * 4 * 16 * 512 * 4
  assert memory.activation_bytes(c, cfg) == saved + working + gathered + attention + logits == 901_120
  c.mesh.context = 1  # the whole row on each device: no gathered keys, 4x the rest
  assert memory.activation_bytes(c, cfg) == 4 * (saved + working + attention + logits)


@pytest.mark.parametrize("size,gpus,seq", sorted(pretrain.LONG))
def test_long_context_layouts_fit_in_80gb_only_with_context(size, gpus, seq):
  c = pretrain.get_config(f"size={size},gpus={gpus},seq={seq}")
  assert memory.mesh_devices(c) == pretrain.GPUS[gpus] and c.mesh.context > 1
  config_lib.validate_mesh(c, pretrain.GPUS[gpus])
  fits = memory.report(c)
  assert fits["total"] * 2 ** 30 < 80e9, fits
  c = c.unlock()
  c.mesh.fsdp, c.mesh.context = c.mesh.fsdp * c.mesh.context, 1  # the same GPUs, whole sequences
  c.train.grad_accum = c.train.batch_size // c.mesh.fsdp
  assert memory.report(c)["activations"] > 80e9 / 2 ** 30


def test_mesh_validation_of_the_context_axis():
  c = pretrain.get_config("size=tiny").unlock()
  c.mesh.data, c.mesh.context = 2, 4
  c.train.batch_size, c.train.grad_accum = 16, 4
  with pytest.raises(ConfigError, match=r"train\.grad_accum: mesh\.context=4 needs one row per device in each "
                     r"micro-batch: batch_size/grad_accum=4 must equal mesh\.data\*mesh\.fsdp=2 \(grad_accum=8\)"):
    config_lib.validate_mesh(c, 8)
  c.train.grad_accum = 8
  config_lib.validate_mesh(c, 8)
  c.train.seq_len = 102
  with pytest.raises(ConfigError, match=r"train\.seq_len: 102 is not divisible by mesh\.context=4"):
    config_lib.validate_mesh(c, 8)
  c.train.seq_len = 128
  c.mesh.rules = tuple((name, None if name == "length" else axes) for name, axes in sharding.RULES)
  with pytest.raises(ConfigError, match=r"mesh\.rules: mesh\.context=4 but the rules split the 'length' axis"):
    config_lib.validate_mesh(c, 8)
  with pytest.raises(ConfigError, match=r"data\*fsdp\*context\*tensor=8 != the 16 available devices"):
    config_lib.validate_mesh(c, 16)
  # a mesh config from before the context axis (an old run's) is context 1
  old = ml_collections.ConfigDict({k: v for k, v in c.mesh.items() if k != "context"})
  assert sharding.mesh_shape(old, 8) == (2, 1, 1, 1) and sharding.axis_sizes(old)["context"] == 1
