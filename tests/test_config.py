"""Bad configs fail before anything compiles, naming the key; schedules match their definitions."""

import os
import subprocess
import sys
import time

import numpy as np
import pytest

from configs import pretrain, pretrain_tiny
from jaxllm import config as config_lib, optim

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("key,value,message", [
    ("train.steps", 0, "train.steps"),
    ("train.seq_len", -1, "train.seq_len"),
    ("train.batch_size", 0, "train.batch_size"),
    ("train.grad_accum", 3, "train.batch_size"),           # 16 does not divide into 3 micro-batches
    ("train.nan_policy", "ignore", "train.nan_policy"),
    ("train.log_every", 0, "train.log_every"),
    ("optimizer.schedule", "linear", "optimizer.schedule"),
    ("optimizer.warmup_steps", 10_000, "optimizer.warmup_steps"),
    ("optimizer.learning_rate", -1.0, "optimizer.learning_rate"),
    ("model.size", "huge", "model.size"),
    ("model.remat_policy", "some", "model.remat_policy"),
    ("model.dtype", "int8", "model.dtype"),
    ("stage", "rlhf", "stage"),
    ("data.tokenizer.vocab_size", 100, "data.tokenizer.vocab_size"),
    ("data.validation_fraction", 1.0, "data.validation_fraction"),  # 0 is allowed: no validation
    ("mesh.data", 3, "mesh"),                              # 3 does not divide 1 device
    ("mesh.fsdp", 0, "mesh.fsdp"),
])
def test_validate_names_the_key(key, value, message):
  c = pretrain_tiny.get_config()
  *parents, leaf = key.split(".")
  node = c
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(config_lib.ConfigError, match=message.replace(".", r"\.")):
    config_lib.validate(c, num_devices=1)


def test_mesh_and_batch_over_devices():
  c = pretrain_tiny.get_config()
  c.mesh.data, c.mesh.fsdp = 4, 2
  config_lib.validate(c, num_devices=8)
  with pytest.raises(config_lib.ConfigError, match="does not divide the 4 devices"):
    config_lib.validate(c, num_devices=4)
  c.train.batch_size = 12
  with pytest.raises(config_lib.ConfigError, match="data-parallel size"):
    config_lib.validate(c, num_devices=8)


def test_mesh_must_divide_the_model():
  """Every dim a rule splits (heads, KV heads, MLP, embed, vocab) divides by its mesh axes, before anything runs."""
  c = pretrain_tiny.get_config()
  c.mesh.data, c.mesh.tensor = 1, 4          # the tiny preset has 2 KV heads
  with pytest.raises(config_lib.ConfigError, match=r"mesh\.tensor: 4 does not divide the model's num_kv_heads=2"):
    config_lib.validate(c, num_devices=4)
  c.mesh.data, c.mesh.tensor = 2, 2
  config_lib.validate(c, num_devices=4)
  c.model.mlp_dim = 513
  with pytest.raises(config_lib.ConfigError, match=r"mesh\.tensor: 2 does not divide the model's mlp_dim=513"):
    config_lib.validate(c, num_devices=4)
  c.model.mlp_dim, c.mesh.data, c.mesh.tensor, c.mesh.fsdp = None, 1, 1, 3
  c.train.batch_size = 12
  with pytest.raises(config_lib.ConfigError, match=r"mesh\.fsdp: 3 does not divide the model's d_model=128"):
    config_lib.validate(c, num_devices=3)


def test_resolve_model_vocab():
  c = pretrain_tiny.get_config()
  assert config_lib.resolve_model(c, 2048).vocab_size == 2048  # the tokenizer's
  c.model.vocab_size = 1000
  with pytest.raises(config_lib.ConfigError, match="model.vocab_size"):
    config_lib.resolve_model(c, 2048)
  c.model.vocab_size = 4096
  c.model.d_model = 64
  cfg = config_lib.resolve_model(c, 2048)
  assert (cfg.vocab_size, cfg.d_model, cfg.num_layers) == (4096, 64, 4)


def test_parse_arg():
  arg = config_lib.parse_arg("size=small,lora=true,rank=4", size="tiny", lora=False, rank=8)
  assert (arg.size, arg.lora, arg.rank) == ("small", True, 4)
  with pytest.raises(config_lib.ConfigError, match="'rnak' is unknown"):
    config_lib.parse_arg("rnak=4", rank=8)
  for size in pretrain.RECIPES:
    config_lib.validate(pretrain.get_config(f"size={size}"), num_devices=1)


@pytest.mark.parametrize("override,message", [
    ("--config.train.stepz=3", "stepz"),
    ("--config.train.steps=many", "train.steps"),
])
def test_cli_rejects_bad_overrides_before_compiling(tmp_path, override, message):
  start = time.time()
  proc = subprocess.run([sys.executable, "-m", "jaxllm.train", "--config", "configs/pretrain_tiny.py",
                         "--workdir", str(tmp_path / "w"), override], cwd=ROOT, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode != 0
  assert message in proc.stderr
  assert time.time() - start < 30
  assert not os.path.exists(tmp_path / "w")  # nothing written


def test_schedules_match_their_definitions():
  c = pretrain_tiny.get_config().optimizer
  c.learning_rate, c.warmup_steps, c.min_lr_ratio = 1.0, 10, 0.1
  c.schedule = "cosine"
  cos = optim.schedule(c, 110)
  assert float(cos(5)) == pytest.approx(0.5)
  assert float(cos(10)) == pytest.approx(1.0)
  assert float(cos(60)) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 0.5)), abs=1e-6)
  assert float(cos(110)) == pytest.approx(0.1)
  c.schedule, c.decay_fraction = "wsd", 0.2
  wsd = optim.schedule(c, 110)  # warmup 10, stable 78, decay 22
  assert float(wsd(5)) == pytest.approx(0.5)
  assert float(wsd(50)) == pytest.approx(1.0) and float(wsd(88)) == pytest.approx(1.0)
  assert float(wsd(99)) == pytest.approx(1.0 - 0.9 * 11 / 22)
  assert float(wsd(110)) == pytest.approx(0.1)


@pytest.mark.parametrize("overrides,message", [
    ({"dpo.kind": "simpo", "dpo.cache_reference": True, "lora.enabled": False},
     r"dpo\.cache_reference: dpo\.kind=simpo uses no reference"),
    ({"dpo.kind": "orpo", "dpo.cache_reference": True}, r"dpo\.cache_reference: dpo\.kind=orpo uses no reference"),
    ({"dpo.gamma": 0.5}, r"dpo\.gamma: is SimPO's target margin; dpo\.kind=sigmoid has none"),
    ({"dpo.kind": "ipo", "dpo.label_smoothing": 0.1}, r"dpo\.label_smoothing: dpo\.kind=ipo has no label-smoothed"),
    ({"dpo.rpo_alpha": -1.0}, r"dpo\.rpo_alpha: must be >= 0"),
    ({"dpo.kind": "nope"}, r"dpo\.kind: 'nope' is not one of"),
])
def test_preference_options_are_checked_before_any_data(tmp_path, overrides, message):
  from configs import dpo

  c = dpo.get_config(f"size=tiny,init_from={tmp_path}").unlock()
  for key, value in overrides.items():
    config_lib.override(c, key, value)
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(c, num_devices=1)


def test_query_blocks_follow_the_preset_and_yield_to_context_parallelism():
  """model.query_blocks unset: the preset's (tiny: 2), 1 under mesh.context > 1, whose length the blocks would
  slice; set to more than 1 with mesh.context > 1, refused naming the key."""
  c = pretrain_tiny.get_config()
  assert config_lib.resolve_model(c, 2048).query_blocks == 2
  c.mesh.data, c.mesh.context, c.train.batch_size = 1, 2, 1
  config_lib.validate(c, num_devices=2)
  assert config_lib.resolve_model(c, 2048).query_blocks == 1
  c.model.query_blocks = 2
  with pytest.raises(config_lib.ConfigError, match=r"model\.query_blocks: 2 query blocks would slice"):
    config_lib.validate(c, num_devices=2)
  c.mesh.context, c.mesh.data = 1, 2
  c.train.batch_size = 16
  config_lib.validate(c, num_devices=2)
  assert config_lib.resolve_model(c, 2048).query_blocks == 2
