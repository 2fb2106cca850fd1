"""Hugging Face interop: Llama, Mistral and Qwen2 checkpoints (config.json + safetensors) <-> jaxllm params.

  cfg, params = hf.load("models/Llama-3.2-1B")          # float32 numpy params (scanned layers)
  hf.save("out/", cfg, params, max_shard_size="2GB")    # config.json + model.safetensors (or shards + index)

  python -m jaxllm.hf import --hf DIR --out RUN_DIR     # a jaxllm run directory (a checkpoint at step 0)
  python -m jaxllm.hf export --workdir RUN --out DIR [--max-shard-size 2GB] [--dtype bfloat16] [--peft]

`init_from` may name a Hugging Face directory directly: checkpoint.resolve_run / identity / load_params,
config.model_from_run and the tokenizer loader recognise one (`is_hf_dir`) and come here.

Weights. An HF Linear weight is [out, in]; a jaxllm kernel is [in dims..., out dims...] (q [D, H, E], o [H, E, D]),
so a kernel is flattened to [in, out] and transposed ("T1"/"T2": one or two input dims). Under model.layers.{i}.:
  self_attn.{q,k,v,o}_proj.weight   layers/attn/{q,k,v,o}/kernel    (.bias of q/k/v: Qwen2's biases, [H*E])
  mlp.{gate,up,down}_proj.weight    layers/mlp/{gate,up,down}/kernel
  input_layernorm.weight            layers/attn_norm/scale
  post_attention_layernorm.weight   layers/mlp_norm/scale
and model.embed_tokens.weight = embed/embedding [V, D], model.norm.weight = final_norm/scale, lm_head.weight =
lm_head/kernel (absent when tied). Layer i is index i of a scanned leaf ("layers/...") or the leaf "layers_i/...".

Mistral is Llama's architecture plus a sliding attention window: jaxllm attends to the whole sequence, which is
the same for sequences up to the window (init_from refuses a longer train.seq_len; load warns).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import warnings

import jax
import numpy as np

from jaxllm import model as model_lib
from jaxllm import safetensors_io as st

FAMILIES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
DTYPES = ("float32", "bfloat16", "float16")

# (jaxllm path under a layer, HF name under model.layers.{i}, how: T<n> kernel with n input dims | flat | same)
_LAYER = (
    ("attn/q/kernel", "self_attn.q_proj.weight", "T1"), ("attn/q/bias", "self_attn.q_proj.bias", "flat"),
    ("attn/k/kernel", "self_attn.k_proj.weight", "T1"), ("attn/k/bias", "self_attn.k_proj.bias", "flat"),
    ("attn/v/kernel", "self_attn.v_proj.weight", "T1"), ("attn/v/bias", "self_attn.v_proj.bias", "flat"),
    ("attn/o/kernel", "self_attn.o_proj.weight", "T2"),
    ("mlp/gate/kernel", "mlp.gate_proj.weight", "T1"), ("mlp/up/kernel", "mlp.up_proj.weight", "T1"),
    ("mlp/down/kernel", "mlp.down_proj.weight", "T1"),
    ("attn_norm/scale", "input_layernorm.weight", "same"),
    ("mlp_norm/scale", "post_attention_layernorm.weight", "same"),
)
_IGNORED = ("rotary_emb.inv_freq",)  # buffers some old checkpoints hold


# ---------------------------------------------------------------------------------------------- configs


def is_hf_dir(path: str) -> bool:
  """A directory with a Hugging Face config.json (a "model_type"), not a jaxllm run."""
  config = os.path.join(path, "config.json")
  if not os.path.isfile(config) or os.path.isdir(os.path.join(path, "checkpoints")):
    return False
  with open(config) as f:
    return "model_type" in json.load(f)


def read_config(path: str) -> dict:
  config = os.path.join(path, "config.json")
  if not os.path.isfile(config):
    raise FileNotFoundError(f"{path}: no config.json; a Hugging Face model directory holds config.json and "
                            "model.safetensors (or shards and model.safetensors.index.json)")
  with open(config) as f:
    return json.load(f)


def _rope(hf: dict, where: str) -> tuple[float, dict]:
  """(rope_theta, rope_scaling) of an HF config: transformers >= 5 writes "rope_parameters", older ones
  "rope_theta" and "rope_scaling" ({"type" | "rope_type": ...})."""
  params = hf.get("rope_parameters") or {**(hf.get("rope_scaling") or {})}
  theta = float(params.get("rope_theta", hf.get("rope_theta", 10_000.0)))
  kind = params.get("rope_type", params.get("type", "default"))
  if params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
    raise ValueError(f"{where}: partial_rotary_factor != 1 is not supported")
  if kind == "default":
    return theta, {}
  if kind not in model_lib.ROPE_SCALINGS:
    raise ValueError(f"{where}: rope_type {kind!r} is not supported; jaxllm implements default, "
                     f"{', '.join(model_lib.ROPE_SCALINGS)}")
  fallback = {"original_max_position_embeddings": hf.get("max_position_embeddings")}
  return theta, {"rope_type": kind, **{k: params.get(k, fallback.get(k)) for k in model_lib.ROPE_SCALING_KEYS[kind]}}


def model_config(hf: dict, where: str = "config.json", **compute) -> model_lib.ModelConfig:
  """The ModelConfig of an HF config dict; `compute` sets dtype, scan_layers, remat_policy."""
  family = hf.get("model_type")
  if family not in FAMILIES:
    raise ValueError(f"{where}: model_type {family!r} (architectures {hf.get('architectures')}) is not supported; "
                     f"jaxllm reads {', '.join(FAMILIES)}")
  if hf.get("hidden_act", "silu") not in ("silu", "swish"):
    raise ValueError(f"{where}: hidden_act {hf['hidden_act']!r}; jaxllm's MLP is SwiGLU (silu)")
  if hf.get("mlp_bias") or (family != "qwen2" and hf.get("attention_bias")):
    raise ValueError(f"{where}: attention_bias/mlp_bias (biases on o_proj or the MLP) are not supported")
  try:
    heads = hf["num_attention_heads"]
    theta, scaling = _rope(hf, where)
    return model_lib.ModelConfig(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, mlp_dim=hf["intermediate_size"],
        rope_theta=theta, rope_scaling=scaling, norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), qkv_bias=family == "qwen2", **compute)
  except KeyError as e:
    raise ValueError(f"{where}: no {e.args[0]!r}") from None


def sliding_window(hf: dict) -> int | None:
  """The attention window of a Mistral/Qwen2 config, None when attention is full."""
  if hf.get("model_type") == "mistral":
    return hf.get("sliding_window")
  if hf.get("model_type") == "qwen2" and (hf.get("use_sliding_window")
                                         or "sliding_attention" in (hf.get("layer_types") or [])):
    return hf.get("sliding_window")
  return None


def to_hf_config(cfg: model_lib.ModelConfig, template: dict | None = None, dtype: str = "float32") -> dict:
  """An HF config.json for `cfg`: Qwen2 when it has qkv biases, else Llama, or the family of `template` (the
  config the model came from, whose other fields, e.g. token ids and max_position_embeddings, are kept)."""
  out = dict(template or {})
  if out.get("model_type") not in FAMILIES or (out["model_type"] == "qwen2") != cfg.qkv_bias:
    out = {k: v for k, v in out.items() if k.endswith("token_id")}
    out["model_type"] = "qwen2" if cfg.qkv_bias else "llama"
  for key in ("rope_parameters", "rope_scaling", "_name_or_path", "torch_dtype", "dtype", "architectures",
              "transformers_version"):
    out.pop(key, None)
  scaling = dict(cfg.rope_scaling)
  default_len = int(scaling["original_max_position_embeddings"] * scaling["factor"]) if scaling.get(
      "rope_type") == "llama3" else 2048
  out.update(architectures=[FAMILIES[out["model_type"]]], vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
             intermediate_size=cfg.mlp_dim, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
             num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, hidden_act="silu",
             rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, rope_scaling=scaling or None,
             tie_word_embeddings=cfg.tie_embeddings, torch_dtype=dtype,
             max_position_embeddings=out.get("max_position_embeddings", default_len))
  if out["model_type"] == "llama":
    out.update(attention_bias=False, mlp_bias=False)
  return out


# ---------------------------------------------------------------------------------------------- weights


def _tensors(cfg: model_lib.ModelConfig) -> list[tuple[str, tuple, int | None, str]]:
  """(HF name, jaxllm keys, layer index into a scanned leaf or None, how) of every weight, in HF order."""
  shapes = _flat(model_lib.abstract_params(cfg))
  out = [("model.embed_tokens.weight", ("embed", "embedding"), None, "same")]
  for i in range(cfg.num_layers):
    for sub, name, how in _LAYER:
      keys, index = (("layers", *sub.split("/")), i) if cfg.scan_layers else ((f"layers_{i}", *sub.split("/")), None)
      if keys in shapes:
        out.append((f"model.layers.{i}.{name}", keys, index, how))
  out.append(("model.norm.weight", ("final_norm", "scale"), None, "same"))
  if not cfg.tie_embeddings:
    out.append(("lm_head.weight", ("lm_head", "kernel"), None, "T1"))
  return out


def _flat(tree) -> dict[tuple, object]:
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  return {tuple(getattr(k, "key", getattr(k, "name", k)) for k in path): x for path, x in leaves}


def _unflat(flat: dict[tuple, object]) -> dict:
  out: dict = {}
  for keys, x in flat.items():
    node = out
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = x
  return out


def _hf_shape(shape, how: str) -> tuple:
  if how == "same":
    return tuple(shape)
  if how == "flat":
    return (math.prod(shape),)
  n = int(how[1])
  return (math.prod(shape[n:]), math.prod(shape[:n]))


def _to_hf(x, how: str):
  x = np.asarray(x)
  if how in ("same", "flat"):
    return x.reshape(_hf_shape(x.shape, how))
  return x.reshape(math.prod(x.shape[:int(how[1])]), -1).T


def _from_hf(y, how: str, shape):
  return (y if how in ("same", "flat") else y.T).reshape(shape)


def load(path: str, *, scan_layers: bool = True, **compute) -> tuple[model_lib.ModelConfig, dict]:
  """(ModelConfig, float32 numpy params) of a Hugging Face directory. Tensors are read one at a time from
  memory-mapped safetensors (float32, float16 or bfloat16) into the params."""
  hf = read_config(path)
  cfg = model_config(hf, os.path.join(path, "config.json"), scan_layers=scan_layers, **compute)
  if window := sliding_window(hf):
    warnings.warn(f"{path}: sliding-window attention of {window} tokens; jaxllm attends to the whole sequence, "
                  f"which is the same only for sequences of at most {window} tokens")
  reader = st.Reader(st.files_of(path))
  shapes = _flat(model_lib.abstract_params(cfg))
  params = {keys: np.empty(s.shape, np.float32) for keys, s in shapes.items()}
  used = set()
  for name, keys, i, how in _tensors(cfg):
    shape = shapes[keys].shape[1:] if i is not None else shapes[keys].shape
    if name not in reader:
      raise ValueError(f"{path}: no tensor {name!r} (expected of shape {_hf_shape(shape, how)})")
    if reader.shape(name) != _hf_shape(shape, how):
      raise ValueError(f"{path}: {name} has shape {reader.shape(name)}, config.json implies {_hf_shape(shape, how)}")
    dest = params[keys] if i is None else params[keys][i]
    dest[...] = _from_hf(reader.get(name), how, shape)
    used.add(name)
  extra = [n for n in reader.keys() if n not in used and not n.endswith(_IGNORED)
           and not (n == "lm_head.weight" and cfg.tie_embeddings)]
  if extra:
    raise ValueError(f"{path}: {len(extra)} tensors have no place in a {hf['model_type']} model of jaxllm, "
                     f"e.g. {sorted(extra)[:4]}")
  return cfg, _unflat(params)


def save(path: str, model_config: model_lib.ModelConfig, params, *, max_shard_size="5GB", dtype: str = "float32",
         hf_config: dict | None = None) -> list[str]:
  """Writes config.json and the params as safetensors (tensor by tensor; shards + index past max_shard_size)
  in `dtype`. `hf_config`: the HF config the model came from, whose fields beyond the shapes are kept.
  Returns the safetensors files written."""
  if dtype not in DTYPES:
    raise ValueError(f"dtype {dtype!r} is not one of {DTYPES}")
  got, want = _flat(params), _flat(model_lib.abstract_params(model_config))
  if set(got) != set(want) or any(np.shape(got[k]) != want[k].shape for k in want):
    raise ValueError(f"params do not match the model config: {sorted(set(want) ^ set(got))[:4] or 'shapes differ'}")
  os.makedirs(path, exist_ok=True)
  for name in os.listdir(path):  # an earlier save's files would mix with these ones
    if name.startswith("model") and (name.endswith(".safetensors") or name.endswith(".safetensors.index.json")):
      os.remove(os.path.join(path, name))
  np_dtype = np.dtype(st.DTYPES[{"float32": "F32", "bfloat16": "BF16", "float16": "F16"}[dtype]])
  entries = []
  for name, keys, i, how in _tensors(model_config):
    leaf = got[keys]
    shape = want[keys].shape[1:] if i is not None else want[keys].shape
    part = (lambda x=leaf: x) if i is None else (lambda x=leaf, i=i: x[i])
    entries.append(st.Entry(name, _hf_shape(shape, how), np_dtype, lambda part=part, how=how: _to_hf(part(), how)))
  files = st.write_sharded(path, entries, max_shard_size=max_shard_size, metadata={"format": "pt"})
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(to_hf_config(model_config, hf_config, dtype), f, indent=2)
  return files


# ---------------------------------------------------------------------------------------------- init_from


def identity(path: str) -> str:
  """Names an HF directory's weights: its path and a hash of its files' names, sizes and modification times."""
  h = hashlib.sha256()
  for name in sorted(os.listdir(path)):
    if name == "config.json" or ".safetensors" in name:
      s = os.stat(os.path.join(path, name))
      h.update(f"{name}:{s.st_size}:{s.st_mtime_ns};".encode())
  return f"{os.path.abspath(path)}@hf:{h.hexdigest()[:16]}"


def tokenizer_file(directory: str) -> str:
  """The sentencepiece tokenizer.model of an init_from directory (a run, or an HF directory). Refuses, naming
  init_from, one that is missing or that has more pieces than the embedding has rows (more rows is fine)."""
  from jaxllm.config import ConfigError
  from jaxllm.data.tokenizer import Tokenizer

  path = os.path.join(directory, "tokenizer.model")
  if not os.path.exists(path):
    has = [n for n in ("tokenizer.json", "vocab.json", "merges.txt") if os.path.exists(os.path.join(directory, n))]
    raise ConfigError(f"init_from: {directory} has no sentencepiece tokenizer.model"
                      + (f" (only {', '.join(has)})" if has else "")
                      + "; jaxllm reads sentencepiece tokenizers only: add the model's tokenizer.model")
  config = read_config(directory)
  rows = config["vocab_size"] if is_hf_dir(directory) else config.get("model", {}).get("vocab_size")
  pieces = Tokenizer.from_file(path).vocab_size
  if rows and pieces > rows:
    raise ConfigError(f"init_from: {path} has {pieces} pieces, more than the {rows} rows of the model's "
                      "embedding (vocab_size)")
  return path


# ---------------------------------------------------------------------------------------------- runs


def import_run(hf_dir: str, out: str) -> str:
  """A jaxllm run directory (config.json, checkpoints/0, tokenizer.model when the HF dir has one)."""
  from jaxllm import checkpoint

  cfg, params = load(hf_dir)
  if os.path.exists(out):
    raise FileExistsError(f"--out {out!r} exists; choose a new directory")
  os.makedirs(out)
  source = identity(hf_dir)
  config = {"model": dataclasses.asdict(cfg), "init_from": "", "lora": {"enabled": False},
            "imported_from": source, "hf_config": read_config(hf_dir)}
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
  if os.path.exists(os.path.join(hf_dir, "tokenizer.model")):
    shutil.copy(os.path.join(hf_dir, "tokenizer.model"), os.path.join(out, "tokenizer.model"))
  else:
    print(f"note: {hf_dir} has no sentencepiece tokenizer.model; training from {out} needs one there")
  ckpt = checkpoint.Checkpointer(os.path.join(out, "checkpoints"), keep=1, async_save=False)
  ckpt.save(0, {"params": params}, meta={"imported_from": source, "model": config["model"]})
  ckpt.close()
  return out


def _source_config(run_dir: str, depth: int = 0) -> dict:
  """The HF config.json a run descends from (through init_from), or {}."""
  from jaxllm import checkpoint

  with open(os.path.join(run_dir, "config.json")) as f:
    config = json.load(f)
  if "hf_config" in config or not config.get("init_from") or depth > 32:
    return config.get("hf_config", {})
  source = config["init_from"]
  try:
    return read_config(source) if is_hf_dir(source) else _source_config(checkpoint.resolve_run(source)[0], depth + 1)
  except (FileNotFoundError, NotADirectoryError):
    return {}


def export_run(workdir: str, out: str, *, step: int | None = None, max_shard_size="5GB", dtype="float32",
               peft: bool = False) -> str:
  """Writes a run's model (a LoRA run: merged) as an HF directory, with its tokenizer.model; `peft`: a LoRA
  run's delta as a PEFT adapter instead (export_adapter)."""
  from jaxllm import checkpoint
  from jaxllm.data.tokenizer import Tokenizer

  run_dir, step = checkpoint.resolve_run(workdir if step is None else os.path.join(workdir, "checkpoints", str(step)))
  if is_hf_dir(run_dir):
    raise ValueError(f"--workdir {workdir!r} is already a Hugging Face directory")
  if os.path.exists(out):
    raise FileExistsError(f"--out {out!r} exists; choose a new directory")
  with open(os.path.join(run_dir, "config.json")) as f:
    config = json.load(f)
  names = {f.name for f in dataclasses.fields(model_lib.ModelConfig)}
  cfg = model_lib.ModelConfig(**{k: v for k, v in config["model"].items() if k in names})
  if peft:
    return export_adapter(run_dir, step, config, cfg, out)
  template = _source_config(run_dir)
  tokenizer_path = os.path.join(run_dir, "tokenizer.model")
  if not template and os.path.exists(tokenizer_path):
    tok = Tokenizer.from_file(tokenizer_path)
    template = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
  save(out, cfg, checkpoint.load_params(run_dir, step), max_shard_size=max_shard_size, dtype=dtype,
       hf_config=template)
  if os.path.exists(tokenizer_path):
    shutil.copy(tokenizer_path, os.path.join(out, "tokenizer.model"))
  return out


def export_adapter(run_dir: str, step: int, config: dict, cfg: model_lib.ModelConfig, out: str) -> str:
  """A LoRA run's delta as a PEFT adapter (save_adapter), its base named by the run's init_from."""
  from jaxllm import checkpoint, lora

  lora_config = config.get("lora", {})
  if not lora_config.get("enabled"):
    raise ValueError(f"--peft: {run_dir} is not a LoRA run (its lora.enabled is false)")
  base = checkpoint.lora_base(run_dir)[0]  # the run's init_from (its base's, if it continued another's delta)
  if is_hf_dir(base):
    base = os.path.abspath(base)
  else:
    print(f"note: the base {base!r} is a jaxllm run; export it too (python -m jaxllm.hf export --workdir {base} "
          "--out BASE) and set base_model_name_or_path in adapter_config.json to BASE")
  delta = lora.from_saved(checkpoint.restore_params(run_dir, step), lora_config)
  save_adapter(out, cfg, delta, rank=lora_config["rank"], alpha=lora_config["alpha"],
               rslora=lora_config.get("rslora", False), base=base, dropout=lora_config.get("dropout", 0.0))
  return out


def save_adapter(out: str, cfg: model_lib.ModelConfig, delta, *, rank: int, alpha: float, rslora: bool = False,
                 base: str = "", dropout: float = 0.0) -> list[str]:
  """A delta tree (lora.LoraWeight leaves, of a model of `cfg`) as a PEFT adapter in the new directory `out`:
  adapter_config.json and adapter_model.safetensors holding, per targeted HF module,
  base_model.model.<module>.lora_A.weight [r, in] and .lora_B.weight [out, r] (an embedding:
  .lora_embedding_A [r, V], .lora_embedding_B [D, r]). PEFT's ΔW = (lora_alpha/r)·B·A (/√r: use_rslora) is
  then the delta's scale·(A·B)ᵀ. Returns the tensor names."""
  from jaxllm import lora

  leaves = jax.tree_util.tree_leaves_with_path(delta, is_leaf=lambda x: isinstance(x, lora.LoraWeight))
  weights = {lora.path_str(path): lw for path, lw in leaves}
  if any(lw.scale != lora.scaling(rank, alpha, rslora) for lw in weights.values()):
    raise ValueError(f"save_adapter: the delta's scale is not that of rank={rank}, alpha={alpha}, rslora={rslora}")
  entries, modules, used = [], set(), set()
  for name, keys, i, how in _tensors(cfg):
    path = "/".join(keys)
    if path not in weights:
      continue
    if how == "flat":
      raise ValueError(f"save_adapter: {path} is not a matrix PEFT can adapt")
    lw, used = weights[path], used | {path}
    a, b = (lw.a, lw.b) if i is None else (lw.a[i], lw.b[i])
    a_RxIn = np.asarray(a, np.float32).reshape(-1, rank).T
    b_OutxR = np.asarray(b, np.float32).reshape(rank, -1).T
    module = "base_model.model." + name.removesuffix(".weight")
    suffixes = ("lora_embedding_A", "lora_embedding_B") if how == "same" else ("lora_A.weight", "lora_B.weight")
    for suffix, x in zip(suffixes, (a_RxIn, b_OutxR)):
      entries.append(st.Entry(f"{module}.{suffix}", x.shape, np.float32, lambda x=x: x))
    modules.add(module.rsplit(".", 1)[-1])
  if unused := sorted(set(weights) - used):
    raise ValueError(f"save_adapter: the delta of {unused} has no Hugging Face module")
  os.makedirs(out)
  st.write(os.path.join(out, "adapter_model.safetensors"), entries, {"format": "pt"})
  adapter = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "r": rank,
             "lora_alpha": alpha, "use_rslora": rslora, "target_modules": sorted(modules), "lora_dropout": dropout,
             "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "modules_to_save": None}
  with open(os.path.join(out, "adapter_config.json"), "w") as f:
    json.dump(adapter, f, indent=2)
  return [e.name for e in entries]


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m jaxllm.hf", description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  imp = sub.add_parser("import", help="an HF directory -> a jaxllm run directory")
  imp.add_argument("--hf", required=True, help="a directory with config.json and *.safetensors")
  imp.add_argument("--out", required=True, help="the new run directory")
  exp = sub.add_parser("export", help="a jaxllm run -> an HF directory (or a PEFT adapter)")
  exp.add_argument("--workdir", required=True, help="a training run (LoRA or not)")
  exp.add_argument("--out", required=True, help="the new HF directory")
  exp.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
  exp.add_argument("--max-shard-size", default="5GB", help="shard the safetensors past this size (2GB, 500MB)")
  exp.add_argument("--dtype", default="float32", choices=DTYPES, help="tensor dtype (an adapter: float32)")
  exp.add_argument("--peft", action="store_true", help="a LoRA run's delta as a PEFT adapter (default: merged)")
  args = parser.parse_args(argv)
  if args.command == "import":
    out = import_run(args.hf, args.out)
  else:
    out = export_run(args.workdir, args.out, step=args.step, max_shard_size=args.max_shard_size, dtype=args.dtype,
                     peft=args.peft)
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
