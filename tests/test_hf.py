"""Hugging Face interop (jaxllm/hf.py, jaxllm/safetensors_io.py). The last tests compare with the reference
implementation (transformers, PEFT) and skip cleanly without it (pip install -e ".[hf]" installs it)."""

import dataclasses
import json
import os
import shutil
import struct

import jax
import ml_dtypes
import numpy as np
import pytest

from jaxllm import cli, config as config_lib, export, hf, lora, model, runs
from jaxllm import safetensors_io as st
from jaxllm.data.tokenizer import train_tokenizer
from tests.conftest import tiny_config

TOKENS = np.random.default_rng(0).integers(0, 256, (2, 24))


def tiny(**overrides) -> model.ModelConfig:
  fields = dict(vocab_size=320, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
                norm_eps=1e-5)
  return model.ModelConfig(**{**fields, **overrides})


def random_params(cfg, seed=0):
  """Params with every leaf random (norm scales and biases too: a swapped or dropped one shows)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: rng.normal(0, 0.2, x.shape).astype(np.float32), model.abstract_params(cfg))


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ------------------------------------------------------------------------------------------ safetensors


def test_safetensors_layout_and_dtypes(tmp_path):
  rng = np.random.default_rng(0)
  arrays = {"f32": rng.normal(size=(3, 5)).astype(np.float32), "f16": rng.normal(size=(7,)).astype(np.float16),
            "bf16": rng.normal(size=(2, 3)).astype(ml_dtypes.bfloat16), "i32": np.arange(5, dtype=np.int32),
            "scalar": np.array(1.5, np.float32)}
  path = str(tmp_path / "x.safetensors")
  st.write(path, [st.Entry(k, v.shape, v.dtype, lambda v=v: v) for k, v in arrays.items()], {"format": "pt"})
  raw = open(path, "rb").read()
  (n,) = struct.unpack("<Q", raw[:8])
  header = json.loads(raw[8:8 + n])
  assert n % 8 == 0 and header.pop("__metadata__") == {"format": "pt"}
  spans = sorted(v["data_offsets"] for v in header.values())  # back to back from 0 to the end of the file
  assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:])) and spans[-1][1] == len(raw) - 8 - n
  assert {k: v["dtype"] for k, v in header.items()} == {"f32": "F32", "f16": "F16", "bf16": "BF16", "i32": "I32",
                                                        "scalar": "F32"}
  reader = st.Reader([path])
  for k, v in arrays.items():
    assert reader.get(k).dtype == v.dtype
    np.testing.assert_array_equal(reader.get(k), v)


def test_the_safetensors_package_reads_ours_and_we_read_its(tmp_path):
  numpy_api = pytest.importorskip("safetensors.numpy")
  rng = np.random.default_rng(0)
  arrays = {"a": rng.normal(size=(4, 3)).astype(np.float32), "b": rng.normal(size=(5,)).astype(np.float16)}
  ours, theirs = str(tmp_path / "ours.safetensors"), str(tmp_path / "theirs.safetensors")
  st.write(ours, [st.Entry(k, v.shape, v.dtype, lambda v=v: v) for k, v in arrays.items()])
  numpy_api.save_file(arrays, theirs)
  for k, v in numpy_api.load_file(ours).items():
    np.testing.assert_array_equal(v, arrays[k])
  reader = st.Reader([theirs])
  for k, v in arrays.items():
    np.testing.assert_array_equal(reader.get(k), v)


def test_parse_size():
  assert st.parse_size("2GB") == 2 * 10**9 and st.parse_size("500MiB") == 500 * 2**20
  assert st.parse_size("10kb") == 10_000 and st.parse_size(1234) == 1234
  with pytest.raises(ValueError, match="max_shard_size"):
    st.parse_size("two gigs")


# ------------------------------------------------------------------------------------------ save / load


@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("variant", ["llama_untied", "qwen2_tied", "llama3_rope"])
def test_save_then_load_is_bit_exact(tmp_path, scan, variant):
  overrides = {"llama_untied": {}, "qwen2_tied": dict(qkv_bias=True, tie_embeddings=True),
               "llama3_rope": dict(rope_theta=500_000.0, rope_scaling=dict(
                   rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=64))}[variant]
  cfg = tiny(scan_layers=scan, **overrides)
  params = random_params(cfg)
  hf.save(str(tmp_path), cfg, params)
  assert os.listdir(tmp_path) and sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
  cfg2, params2 = hf.load(str(tmp_path), scan_layers=scan)
  assert cfg2 == cfg
  assert_trees_equal(params2, params)
  family = json.load(open(tmp_path / "config.json"))["model_type"]
  assert family == ("qwen2" if cfg.qkv_bias else "llama")


def test_sharded_save_writes_an_index(tmp_path):
  cfg = tiny()
  params = random_params(cfg)
  files = hf.save(str(tmp_path), cfg, params, max_shard_size="20KB")
  index = json.load(open(tmp_path / "model.safetensors.index.json"))
  assert len(files) > 2 and sorted(set(index["weight_map"].values())) == sorted(files)
  names = [name for name, *_ in hf._tensors(cfg)]
  assert sorted(index["weight_map"]) == sorted(names)
  sizes = [os.path.getsize(tmp_path / f) - 8 - struct.unpack("<Q", open(tmp_path / f, "rb").read(8))[0]
           for f in files]
  assert index["metadata"]["total_size"] == sum(sizes) == sum(4 * np.size(x) for x in jax.tree.leaves(params))
  largest = max(4 * np.size(x) // (cfg.num_layers if x.ndim == 3 else 1) for x in jax.tree.leaves(params))
  assert all(s <= max(20_000, largest) for s in sizes)
  assert_trees_equal(hf.load(str(tmp_path))[1], params)
  hf.save(str(tmp_path), cfg, params)  # unsharded into the same directory: the old shards and index go
  assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]


@pytest.mark.parametrize("dtype,np_dtype", [("bfloat16", ml_dtypes.bfloat16), ("float16", np.float16)])
def test_half_precision_loads_as_float32(tmp_path, dtype, np_dtype):
  cfg = tiny()
  params = random_params(cfg)
  hf.save(str(tmp_path), cfg, params, dtype=dtype)
  assert json.load(open(tmp_path / "config.json"))["torch_dtype"] == dtype
  _, loaded = hf.load(str(tmp_path))
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(loaded))
  assert_trees_equal(loaded, jax.tree.map(lambda x: x.astype(np_dtype).astype(np.float32), params))


# ------------------------------------------------------------------------------------------ configs

LLAMA31 = dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
               num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
               tie_word_embeddings=True, max_position_embeddings=131072)
LLAMA3_SCALING = dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)


@pytest.mark.parametrize("style", ["transformers4", "transformers5"])
def test_config_of_llama_3_2_in_both_styles(style):
  if style == "transformers4":
    hf_config = {**LLAMA31, "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", **LLAMA3_SCALING}}
  else:
    hf_config = {**LLAMA31, "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, **LLAMA3_SCALING}}
  cfg = hf.model_config(hf_config)
  assert cfg == model.model_config("1b", norm_eps=1e-5, rope_scaling={"rope_type": "llama3", **LLAMA3_SCALING})
  assert hf.model_config(hf.to_hf_config(cfg)) == cfg


def test_config_of_mistral_and_qwen2():
  mistral = dict(model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rope_theta=10000.0,
                 sliding_window=4096, rope_scaling={"type": "linear", "factor": 2.0})  # no head_dim: 4096 / 32
  cfg = hf.model_config(mistral)
  assert (cfg.head_dim, cfg.num_kv_heads, cfg.qkv_bias, cfg.tie_embeddings) == (128, 8, False, False)
  assert cfg.norm_eps == 1e-6  # transformers' default
  assert dict(cfg.rope_scaling) == {"rope_type": "linear", "factor": 2.0}
  assert hf.sliding_window(mistral) == 4096 and hf.sliding_window({**mistral, "sliding_window": None}) is None
  qwen2 = dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
               num_attention_heads=14, num_key_value_heads=2, rope_theta=1e6, tie_word_embeddings=True,
               sliding_window=32768, use_sliding_window=False)
  cfg = hf.model_config(qwen2)
  assert (cfg.head_dim, cfg.qkv_bias, cfg.tie_embeddings, cfg.rope_theta) == (64, True, True, 1e6)
  assert hf.sliding_window(qwen2) is None
  out = hf.to_hf_config(cfg, template={**mistral, "bos_token_id": 5})  # not Mistral's family: only token ids kept
  assert out["model_type"] == "qwen2" and out["bos_token_id"] == 5 and "sliding_window" not in out


def test_rope_scaling_frequencies_against_numpy():
  e, theta = 64, 500_000.0
  base = 1.0 / theta ** (np.arange(0, e, 2) / e)
  s = dict(LLAMA3_SCALING)
  want = []  # Meta's apply_scaling (llama-models), written out
  for f in base:
    wavelen = 2 * np.pi / f
    if wavelen < s["original_max_position_embeddings"] / s["high_freq_factor"]:
      want.append(f)
    elif wavelen > s["original_max_position_embeddings"] / s["low_freq_factor"]:
      want.append(f / s["factor"])
    else:
      smooth = (s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"]) / (
          s["high_freq_factor"] - s["low_freq_factor"])
      want.append((1 - smooth) * f / s["factor"] + smooth * f)
  got = model.rope_frequencies(e, theta, tuple({"rope_type": "llama3", **s}.items()))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert min(w / f for w, f in zip(want, base)) < 1 == max(w / f for w, f in zip(want, base))  # some scaled, some kept
  np.testing.assert_allclose(model.rope_frequencies(e, theta, (("factor", 4.0), ("rope_type", "linear"))),
                             base / 4, rtol=1e-5)
  default = 1.0 / theta ** (jax.numpy.arange(0, e, 2, dtype=np.float32) / e)  # unchanged without scaling
  np.testing.assert_array_equal(model.rope_frequencies(e, theta), default)


def test_rope_scaling_survives_json():
  cfg = tiny(rope_scaling={"rope_type": "linear", "factor": 2.0})
  again = model.ModelConfig(**json.loads(json.dumps(dataclasses.asdict(cfg))))
  assert again == cfg and hash(again) == hash(cfg)
  with pytest.raises(ValueError, match="rope_type 'yarn'"):
    tiny(rope_scaling={"rope_type": "yarn", "factor": 2.0})
  with pytest.raises(ValueError, match="llama3 needs"):
    tiny(rope_scaling={"rope_type": "llama3", "factor": 2.0})


# ------------------------------------------------------------------------------------------ errors


def test_clear_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="no config.json"):
    hf.load(str(tmp_path))
  cfg = tiny()
  good = tmp_path / "good"
  hf.save(str(good), cfg, random_params(cfg))
  hf_config = json.load(open(good / "config.json"))

  def load_with(**changes):
    d = tmp_path / "case"
    d.mkdir(exist_ok=True)
    shutil.copy(good / "model.safetensors", d)
    json.dump({**hf_config, **changes}, open(d / "config.json", "w"))
    return hf.load(str(d))

  with pytest.raises(ValueError, match="model_type 'gpt2'.*jaxllm reads llama, mistral, qwen2"):
    load_with(model_type="gpt2")
  with pytest.raises(ValueError, match="rope_type 'yarn' is not supported"):
    load_with(rope_scaling={"rope_type": "yarn", "factor": 4.0})
  with pytest.raises(ValueError, match="attention_bias"):
    load_with(attention_bias=True)
  with pytest.raises(ValueError, match="hidden_act 'gelu'"):
    load_with(hidden_act="gelu")
  with pytest.raises(ValueError, match="no tensor 'model.layers.2.self_attn.q_proj.weight'"):
    load_with(num_hidden_layers=3)
  with pytest.raises(ValueError, match=r"k_proj.weight has shape \(16, 32\), config.json implies \(32, 32\)"):
    load_with(num_attention_heads=2, head_dim=16)
  with pytest.raises(ValueError, match="no tensor 'model.layers.0.self_attn.q_proj.bias'"):  # Qwen2 has biases
    load_with(model_type="qwen2")
  qwen2 = tmp_path / "qwen2"
  hf.save(str(qwen2), tiny(qkv_bias=True), random_params(tiny(qkv_bias=True)))
  json.dump({**json.load(open(qwen2 / "config.json")), "model_type": "llama"}, open(qwen2 / "config.json", "w"))
  with pytest.raises(ValueError, match=r"6 tensors have no place in a llama model .*q_proj.bias"):
    hf.load(str(qwen2))
  with pytest.raises(ValueError, match="no 'vocab_size'"):
    hf.model_config({k: v for k, v in hf_config.items() if k != "vocab_size"})
  with pytest.raises(ValueError, match="do not match the model config"):
    hf.save(str(tmp_path / "bad"), tiny(num_layers=3), random_params(cfg))


# ------------------------------------------------------------------------------------------ init_from


@pytest.fixture(scope="module")
def tokenizer_320(corpus_dir):
  texts = [p.read_text() for p in sorted(corpus_dir.glob("*.txt"))]
  return train_tokenizer(texts, vocab_size=320)


def hf_dir_for_tiny_config(path, tokenizer, vocab_size=384, **hf_config):
  """An HF directory with tiny_config's shapes (the run's overrides must agree) and a padded embedding."""
  cfg = model.ModelConfig(vocab_size=vocab_size, d_model=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
                          mlp_dim=64)
  params = random_params(cfg)
  hf.save(str(path), cfg, params, hf_config=hf_config)
  if tokenizer is not None:
    tokenizer.save(str(path / "tokenizer.model"))
  return cfg, params


def test_init_from_a_hugging_face_directory_hooks(tmp_path, corpus_dir, tokenizer_320):
  d = tmp_path / "hf"
  cfg, params = hf_dir_for_tiny_config(d, tokenizer_320)
  run_dir, step = runs.resolve(str(d))
  assert (run_dir, step) == (str(d), 0) and hf.is_hf_dir(str(d))
  ident = runs.fingerprint(run_dir, step)
  assert ident.startswith(f"{d}@hf:")
  assert_trees_equal(runs.load_params(run_dir, step), params)
  config = tiny_config(corpus_dir, init_from=str(d), **{"model.dtype": "bfloat16"})
  assert config.model.scan_layers is None  # unset: the source's layout (an HF directory's: scanned)
  assert runs.model_for(config, run_dir, 0) == dataclasses.replace(
      cfg, dtype="bfloat16", remat_policy=config.model.remat_policy, scan_layers=True)
  assert runs.tokenizer_file(str(d)) == str(d / "tokenizer.model")
  os.utime(d / "model.safetensors", ns=(1, 1))  # changed weights get a new fingerprint
  assert runs.fingerprint(run_dir, step) != ident


def test_init_from_refusals(tmp_path, corpus_dir, tokenizer_320):
  d = tmp_path / "no_tokenizer"
  hf_dir_for_tiny_config(d, None)
  (d / "merges.txt").write_text("")
  with pytest.raises(config_lib.ConfigError, match="init_from: .* no tokenizer .*; only merges.txt"):
    runs.tokenizer_file(str(d))
  assert cli.main(["hf", "import", "--hf", str(d), "--out", str(tmp_path / "imported")]) == 0  # a run without a tokenizer either
  with pytest.raises(config_lib.ConfigError, match="init_from: .*imported has no tokenizer"):
    runs.tokenizer_file(str(tmp_path / "imported"))
  (d / "tokenizer.json").write_text("{}")
  pytest.importorskip("tokenizers")
  with pytest.raises(config_lib.ConfigError, match="init_from: .*tokenizer.json is not a readable tokenizer"):
    runs.tokenizer_file(str(d))
  d = tmp_path / "small_embedding"
  hf_dir_for_tiny_config(d, tokenizer_320, vocab_size=300)
  with pytest.raises(config_lib.ConfigError, match="has 320 pieces, more than the 300 rows"):
    runs.tokenizer_file(str(d))
  d = tmp_path / "mistral"
  hf_dir_for_tiny_config(d, tokenizer_320, model_type="mistral", sliding_window=16)
  assert json.load(open(d / "config.json"))["model_type"] == "mistral"
  with pytest.raises(config_lib.ConfigError, match="train.seq_len: 32 is longer than the sliding attention window"):
    runs.model_for(tiny_config(corpus_dir, init_from=str(d)), str(d), 0)
  with pytest.warns(UserWarning, match="sliding-window attention of 16 tokens"):
    hf.load(str(d))
  runs.model_for(tiny_config(corpus_dir, init_from=str(d), **{"train.seq_len": 16}), str(d), 0)


def test_cli_import_then_export_gives_back_the_same_files(tmp_path, tokenizer_320):
  src = tmp_path / "src"
  cfg, params = hf_dir_for_tiny_config(src, tokenizer_320, model_type="mistral", sliding_window=None,
                                       max_position_embeddings=4096, bos_token_id=2)
  assert cli.main(["hf", "import", "--hf", str(src), "--out", str(tmp_path / "run")]) == 0
  assert open(tmp_path / "run" / "tokenizer.model", "rb").read() == open(src / "tokenizer.model", "rb").read()
  assert_trees_equal(runs.load_params(*runs.resolve(str(tmp_path / "run"))), params)
  assert cli.main(["hf", "export", "--workdir", str(tmp_path / "run"), "--out", str(tmp_path / "back"), "--max-shard-size", "30KB"]) == 0
  back = json.load(open(tmp_path / "back" / "config.json"))
  assert (back["model_type"], back["max_position_embeddings"], back["bos_token_id"]) == ("mistral", 4096, 2)
  assert os.path.exists(tmp_path / "back" / "model.safetensors.index.json")
  cfg2, params2 = hf.load(str(tmp_path / "back"))
  assert cfg2 == cfg
  assert_trees_equal(params2, params)


def random_delta(cfg, params, targets, rank=4, alpha=8.0, rslora=False, seed=1):
  """A LoRA delta with B nonzero (lora.init's B is zero, which would hide a wrong B layout)."""
  delta = lora.init(params, rank=rank, alpha=alpha, targets=targets, rng=jax.random.key(seed), rslora=rslora)
  rng = np.random.default_rng(seed)
  is_lw = lambda x: isinstance(x, lora.LoraWeight)
  return jax.tree.map(lambda lw: lora.LoraWeight(lw.a, rng.normal(0, 0.1, lw.b.shape).astype(np.float32), lw.scale),
                      delta, is_leaf=is_lw)


def test_peft_adapter_of_a_tied_embedding_delta_is_refused(tmp_path):
  """PEFT would adapt the tied embedding's lookup only, not the logits: refused, naming why, nothing written."""
  cfg = tiny(tie_embeddings=True)
  params = random_params(cfg)
  with pytest.raises(ValueError, match="tied embedding.*lookup only"):
    hf.save_adapter(str(tmp_path / "adapter"), cfg, random_delta(cfg, params, "all"), rank=4, alpha=8.0)
  assert not os.path.exists(tmp_path / "adapter")
  hf.save_adapter(str(tmp_path / "ok"), cfg, random_delta(cfg, params, "attention"), rank=4, alpha=8.0)  # untied part


@pytest.mark.parametrize("scan", [True, False])
def test_peft_adapter_layout_is_the_merged_delta(tmp_path, scan):
  """W_hf + s·B·A (PEFT's rule, from the adapter's files alone) equals the HF export of merge(params, delta)."""
  cfg = tiny(scan_layers=scan)
  params = random_params(cfg)
  delta = random_delta(cfg, params, "all", rslora=True)
  names = hf.save_adapter(str(tmp_path / "adapter"), cfg, delta, rank=4, alpha=8.0, rslora=True, base="base")
  adapter = json.load(open(tmp_path / "adapter" / "adapter_config.json"))
  assert adapter["target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj", "embed_tokens", "lm_head"])
  assert (adapter["peft_type"], adapter["task_type"], adapter["r"], adapter["lora_alpha"], adapter["use_rslora"]) == (
      "LORA", "CAUSAL_LM", 4, 8.0, True)
  assert "base_model.model.model.layers.1.self_attn.o_proj.lora_A.weight" in names
  assert "base_model.model.model.embed_tokens.lora_embedding_A" in names
  assert "base_model.model.lm_head.lora_B.weight" in names
  hf.save(str(tmp_path / "base"), cfg, params)
  hf.save(str(tmp_path / "merged"), cfg, lora.merge(params, delta))
  base, merged = st.Reader(st.files_of(str(tmp_path / "base"))), st.Reader(st.files_of(str(tmp_path / "merged")))
  ad = st.Reader([str(tmp_path / "adapter" / "adapter_model.safetensors")])
  scale = 8.0 / np.sqrt(4)
  for name in base.keys():
    module = "base_model.model." + name.removesuffix(".weight")
    if module + ".lora_A.weight" in ad:
      a_RxIn, b_OutxR = ad.get(module + ".lora_A.weight"), ad.get(module + ".lora_B.weight")
      want = base.get(name) + scale * b_OutxR @ a_RxIn
    elif module + ".lora_embedding_A" in ad:
      want = base.get(name) + scale * (ad.get(module + ".lora_embedding_B") @ ad.get(module + ".lora_embedding_A")).T
    else:
      want = base.get(name)
    np.testing.assert_allclose(merged.get(name), want, atol=1e-5, err_msg=name)
  assert len(names) == 2 * (7 * cfg.num_layers + 2)


def test_lora_from_a_hugging_face_directory_then_export(tmp_path, corpus_dir, tokenizer_320, capsys):
  """The whole path: init_from an HF dir, train a LoRA delta, export it merged and as a PEFT adapter."""
  from jaxllm import train
  d = tmp_path / "hf"
  cfg, params = hf_dir_for_tiny_config(d, tokenizer_320)
  run = str(tmp_path / "lora")
  config = tiny_config(corpus_dir, init_from=str(d), **{
      "lora.enabled": True, "lora.targets": "attention,mlp,embed", "train.steps": 2, "train.checkpoint_every": 2,
      "train.eval_batches": 0, "train.num_samples": 0})
  train.run(config, run)
  assert f"initialized from {d} (Hugging Face model) (frozen base of a LoRA delta)" in capsys.readouterr().out
  assert open(os.path.join(run, "tokenizer.model"), "rb").read() == tokenizer_320.model_bytes
  run_config = json.load(open(os.path.join(run, "config.json")))
  delta = lora.from_saved(runs.saved_params(run, 2), run_config["lora"])
  merged = lora.merge(params, delta)
  assert cli.main(["hf", "export", "--workdir", run, "--out", str(tmp_path / "merged")]) == 0
  cfg2, exported = hf.load(str(tmp_path / "merged"))
  assert cfg2 == cfg and os.path.exists(tmp_path / "merged" / "tokenizer.model")
  for x, y in zip(jax.tree.leaves(exported), jax.tree.leaves(merged)):
    np.testing.assert_allclose(x, y, atol=1e-6)
  assert not np.allclose(exported["layers"]["attn"]["q"]["kernel"], params["layers"]["attn"]["q"]["kernel"])
  assert cli.main(["hf", "export", "--workdir", run, "--out", str(tmp_path / "adapter"), "--peft"]) == 0
  adapter = json.load(open(tmp_path / "adapter" / "adapter_config.json"))
  assert adapter["base_model_name_or_path"] == str(d) and adapter["r"] == config.lora.rank
  imported = export.import_hf(str(d), str(tmp_path / "imported"))
  with pytest.raises(ValueError, match="not a LoRA, prompt- or prefix-tuned run"):
    export.to_peft(imported, 0, str(tmp_path / "x"))


# ------------------------------------------------------------------------------------------ transformers

FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        rope_theta=500_000.0, max_position_embeddings=1024, rope_scaling=dict(
            rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=16))),
    "llama_tied_linear": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True, rms_norm_eps=1e-5,
                                                                   rope_scaling=dict(rope_type="linear", factor=4.0))),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True, rope_theta=1e6)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(head_dim=32, sliding_window=4096)),
}


def reference_model(family, path):
  """A random tiny transformers model of `family` saved with save_pretrained at `path`; (model, logits)."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  config_cls, model_cls, extra = FAMILIES[family]
  torch.manual_seed(0)
  hf_config = getattr(transformers, config_cls)(
      vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, initializer_range=0.1, **extra)  # 0.1: peaked attention, so RoPE matters
  m = getattr(transformers, model_cls)(hf_config).eval()
  with torch.no_grad():
    for name, p in m.named_parameters():  # norms start at 1 and biases at 0: make them count
      if "norm" in name or "bias" in name:
        p.add_(torch.randn_like(p) * 0.1)
    m.save_pretrained(path)
    return m, m(torch.tensor(TOKENS)).logits.numpy()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_transformers_both_ways(tmp_path, family):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  _, want = reference_model(family, str(tmp_path / "ref"))
  cfg, params = hf.load(str(tmp_path / "ref"))
  got = np.asarray(model.forward(cfg, params, TOKENS))
  load_diff = float(np.abs(got - want).max())
  hf.save(str(tmp_path / "back"), cfg, params, hf_config=hf.read_config(str(tmp_path / "ref")), max_shard_size="50KB")
  back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "back")).eval()
  with torch.no_grad():
    export_diff = float(np.abs(back(torch.tensor(TOKENS)).logits.numpy() - want).max())
  print(f"{family}: max |logits - transformers'| = {load_diff:.2e} (loaded), {export_diff:.2e} (exported)")
  assert type(back).__name__ == FAMILIES[family][1]
  assert load_diff < 1e-4 and export_diff < 1e-4


def test_peft_loads_the_adapter_onto_transformers(tmp_path):
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  m, _ = reference_model("llama", str(tmp_path / "ref"))
  cfg, params = hf.load(str(tmp_path / "ref"))
  delta = random_delta(cfg, params, "attention,mlp,embed,lm_head", rank=4, alpha=16.0)
  hf.save_adapter(str(tmp_path / "adapter"), cfg, delta, rank=4, alpha=16.0, base=str(tmp_path / "ref"))
  want = np.asarray(model.forward(cfg, lora.merge(params, delta), TOKENS))
  adapted = peft.PeftModel.from_pretrained(m, str(tmp_path / "adapter")).eval()
  with torch.no_grad():
    got = adapted(torch.tensor(TOKENS)).logits.numpy()
  diff = float(np.abs(got - want).max())
  print(f"PEFT adapter: max |logits - jaxllm merged| = {diff:.2e}")
  assert diff < 1e-4


def _prefix_entries(cfg, kind):
  rng = np.random.default_rng(3)
  if kind == "prompt":
    return {"prompt": rng.normal(size=(5, cfg.d_model)).astype(np.float32) * 0.5}
  shape = (cfg.num_layers, 5, cfg.num_kv_heads, cfg.head_dim)
  return {"prefix": {"k": rng.normal(size=shape).astype(np.float32), "v": rng.normal(size=shape).astype(np.float32)}}


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_prompt_and_prefix_adapter_layout(tmp_path, kind):
  """PEFT's names and shapes (as peft 0.21's save_pretrained writes them): prompt_embeddings [P, D], or [P, L·2·K·E]
  with token_dim K·E and num_attention_heads K for a GQA prefix."""
  cfg = tiny()
  hf.save_prefix_adapter(str(tmp_path / "a"), cfg, _prefix_entries(cfg, kind), base="BASE")
  adapter = json.load(open(tmp_path / "a" / "adapter_config.json"))
  reader = st.Reader([str(tmp_path / "a" / "adapter_model.safetensors")])
  tensors = {name: reader.get(name) for name in reader.keys()}
  assert adapter["peft_type"] == {"prompt": "PROMPT_TUNING", "prefix": "PREFIX_TUNING"}[kind]
  assert adapter["num_virtual_tokens"] == 5 and adapter["base_model_name_or_path"] == "BASE"
  width = cfg.d_model if kind == "prompt" else cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim
  assert tensors["prompt_embeddings"].shape == (5, width)
  if kind == "prefix":
    assert (adapter["token_dim"], adapter["num_attention_heads"]) == (cfg.num_kv_heads * cfg.head_dim, cfg.num_kv_heads)
    want = _prefix_entries(cfg, kind)["prefix"]["v"][1, 2, 1]  # layer 1, virtual token 2, kv head 1
    row = tensors["prompt_embeddings"][2].reshape(cfg.num_layers, 2, cfg.num_kv_heads, cfg.head_dim)
    np.testing.assert_array_equal(row[1, 1, 1], want)


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_peft_loads_prompt_and_prefix_adapters_onto_transformers(tmp_path, kind):
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  m, _ = reference_model("llama", str(tmp_path / "ref"))
  cfg, params = hf.load(str(tmp_path / "ref"))
  entries = _prefix_entries(cfg, kind)
  hf.save_prefix_adapter(str(tmp_path / "adapter"), cfg, entries, base=str(tmp_path / "ref"))
  want = np.asarray(model.forward(cfg, dict(params, **entries), TOKENS))
  adapted = peft.PeftModel.from_pretrained(m, str(tmp_path / "adapter")).eval()
  with torch.no_grad():
    got = adapted(input_ids=torch.tensor(TOKENS)).logits.numpy()[:, -TOKENS.shape[1]:]
  diff = float(np.abs(got - want).max())
  print(f"PEFT {kind} tuning: max |logits - jaxllm| = {diff:.2e}")
  assert diff < 1e-4
