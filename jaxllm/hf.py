"""Hugging Face interop: Llama, Mistral and Qwen2 checkpoints (config.json + safetensors) <-> jaxllm params.

  cfg, params = hf.load("models/Llama-3.2-1B")          # float32 numpy params (scanned layers)
  hf.save("out/", cfg, params, max_shard_size="2GB")    # config.json + model.safetensors (or shards + index)

  hf.save_adapter("out/", cfg, delta, rank=8, alpha=16)  # a LoRA delta as a PEFT adapter

Format conversion only: what a run directory is, and how a run becomes an HF directory or an HF directory a
run (`python -m jaxllm.hf import|export`), live in jaxllm/runs.py and jaxllm/export.py.

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

import json
import math
import os
import warnings

import jax
import numpy as np

from jaxllm import lora, model as model_lib
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
         hf_config: dict | None = None, score_token: int | None = None) -> list[str]:
  """Writes config.json and the params as safetensors (tensor by tensor; shards + index past max_shard_size)
  in `dtype`. `hf_config`: the HF config the model came from, whose fields beyond the shapes are kept.
  `score_token`: a reward model (jaxllm/tasks/reward.py) as <Family>ForSequenceClassification with one label:
  the body, and score.weight [1, D] = the output-embedding column of that token, in place of lm_head.
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
    if score_token is not None and name == "lm_head.weight":
      continue
    leaf = got[keys]
    shape = want[keys].shape[1:] if i is not None else want[keys].shape
    part = (lambda x=leaf: x) if i is None else (lambda x=leaf, i=i: x[i])
    entries.append(st.Entry(name, _hf_shape(shape, how), np_dtype, lambda part=part, how=how: _to_hf(part(), how)))
  config = to_hf_config(model_config, hf_config, dtype)
  if score_token is not None:
    head = got[("embed", "embedding")][score_token] if model_config.tie_embeddings else \
        np.asarray(got[("lm_head", "kernel")])[:, score_token]
    entries.append(st.Entry("score.weight", (1, model_config.d_model), np_dtype,
                            lambda head=head: np.asarray(head, np.float32).reshape(1, -1)))
    family = FAMILIES[config["model_type"]].removesuffix("ForCausalLM")
    config.update(architectures=[f"{family}ForSequenceClassification"], num_labels=1,
                  id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0}, tie_word_embeddings=False)
  files = st.write_sharded(path, entries, max_shard_size=max_shard_size, metadata={"format": "pt"})
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
  return files


def save_adapter(out: str, cfg: model_lib.ModelConfig, delta, *, rank: int, alpha: float, rslora: bool = False,
                 base: str = "", dropout: float = 0.0) -> list[str]:
  """A delta tree (lora.LoraWeight leaves, of a model of `cfg`) as a PEFT adapter in the new directory `out`:
  adapter_config.json and adapter_model.safetensors holding, per targeted HF module,
  base_model.model.<module>.lora_A.weight [r, in] and .lora_B.weight [out, r] (an embedding:
  .lora_embedding_A [r, V], .lora_embedding_B [D, r]). PEFT's ΔW = (lora_alpha/r)·B·A (/√r: use_rslora) is
  then the delta's scale·(A·B)ᵀ. Returns the tensor names."""
  leaves = jax.tree_util.tree_leaves_with_path(delta, is_leaf=lambda x: isinstance(x, lora.LoraWeight))
  weights = {lora.path_str(path): lw for path, lw in leaves}
  if any(lw.scale != lora.scaling(rank, alpha, rslora) for lw in weights.values()):
    raise ValueError(f"save_adapter: the delta's scale is not that of rank={rank}, alpha={alpha}, rslora={rslora}")
  if cfg.tie_embeddings and "embed/embedding" in weights:
    # PEFT puts an embedding adapter on the lookup (embed_tokens) only; jaxllm's tied logits use the adapted matrix
    # too, so the adapter would give other logits than the run. Refuse rather than export a different model.
    raise ValueError("save_adapter: the delta adapts a tied embedding (model.tie_embeddings, lora.targets with "
                     "embed), which jaxllm applies to the lookup and to the logits but a PEFT adapter to the lookup "
                     "only; export the merged model instead (jaxllm export --hf), or train LoRA without the "
                     "embedding (lora.targets=attention,mlp)")
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


def save_prefix_adapter(out: str, cfg: model_lib.ModelConfig, entries: dict, *, base: str = "") -> list[str]:
  """A prompt ({"prompt": [P, D]}) or prefix ({"prefix": {"k", "v"} [L, P, K, E]}) as a PEFT PROMPT_TUNING or
  PREFIX_TUNING adapter in the new directory `out`: adapter_model.safetensors holds "prompt_embeddings", the
  prompt, or the keys and values flattened per virtual token as PEFT reads them ([P, L·2·K·E]: layer, then key
  or value, then kv head, then head dim), with prefix_projection off (the plain keys and values)."""
  common = {"task_type": "CAUSAL_LM", "base_model_name_or_path": base, "num_virtual_tokens": None,
            "num_layers": cfg.num_layers, "num_transformer_submodules": 1, "inference_mode": True,
            "modules_to_save": None}
  if "prompt" in entries:
    x = np.asarray(entries["prompt"], np.float32)
    adapter = dict(common, peft_type="PROMPT_TUNING", token_dim=cfg.d_model, num_attention_heads=cfg.num_heads,
                   prompt_tuning_init="RANDOM")
  else:
    k, v = (np.asarray(entries["prefix"][n], np.float32) for n in "kv")
    x = np.stack([k, v], axis=1).transpose(2, 0, 1, 3, 4).reshape(k.shape[1], -1)  # [P, L, 2, K, E] flat
    adapter = dict(common, peft_type="PREFIX_TUNING", token_dim=cfg.num_kv_heads * cfg.head_dim,
                   num_attention_heads=cfg.num_kv_heads, prefix_projection=False,
                   encoder_hidden_size=cfg.num_kv_heads * cfg.head_dim)
  adapter["num_virtual_tokens"] = x.shape[0]
  os.makedirs(out)
  st.write(os.path.join(out, "adapter_model.safetensors"),
           [st.Entry("prompt_embeddings", x.shape, np.float32, lambda: x)], {"format": "pt"})
  with open(os.path.join(out, "adapter_config.json"), "w") as f:
    json.dump(adapter, f, indent=2)
  return ["prompt_embeddings"]


if __name__ == "__main__":  # python -m jaxllm.hf: the `jaxllm hf` command of jaxllm/cli.py
  import runpy
  import sys

  sys.argv[1:1] = ["hf"]
  runpy.run_module("jaxllm.cli", run_name="__main__")
