"""What trains and what stays frozen: the whole model, or a parameter-efficient tree beside a frozen base.

A Task's loss is written for full params, `(params, batch, frozen, rng)`. A tuning decides what the trainable
tree is, which frozen trees the step gets, and wraps the loss so that it sees full params:

  Full  trainable = the params; frozen = {"reference": the init_from params} when the task needs a reference.
  Lora  trainable = a LoRA delta; frozen = {"base": the init_from params (int8 with lora.quantize_base)}. Each
        targeted module computes x·(W + s·A·B) without forming dL/dW (lora.apply), or x·W + s·(drop(x)·A)·B
        with lora.dropout while training, or with lora.merged the model sees merge(base, delta). The base
        doubles as the reference: no second copy of the weights.
  PromptTuning  trainable = {"prompt": [P, D]}, P virtual-token embeddings (Lester et al. 2021); frozen =
        {"base": ...} as LoRA's. The model sees the base's params with a "prompt" entry beside them: every
        sequence is preceded by the prompt (model.split_prefix).
  PrefixTuning  trainable = {"prefix": {"k", "v"} [L, P, K, E]}, keys and values every layer's attention reads
        (Li & Liang 2021; P-tuning v2), or with prefix_tuning.hidden > 0 {"prefix_mlp": ...}: a virtual-token
        embedding [P, D] through a tanh MLP that produces them (the reparameterisation, used while training;
        runs.load_params and the PEFT export turn it into the plain keys and values).

Frozen trees are separate step arguments: never donated, never in the optimizer state.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import lora, model as model_lib
from jaxllm.errors import ConfigError


def _check(cond: bool, key: str, message: str):
  if not cond:
    raise ConfigError(f"{key}: {message}")


class Full:
  """Every parameter trains; a run with init_from starts from its params with a fresh optimizer state."""
  name = ""  # what trains beside a frozen base, for the log

  def __init__(self, config, model_cfg: model_lib.ModelConfig, needs_reference: bool):
    self.config, self.model_cfg, self.needs_reference = config, model_cfg, needs_reference

  def init_trainable(self, rng):
    """Boxed (logical axes attached) trainable params, for eval_shape and init."""
    return model_lib.init_boxed(self.model_cfg, rng)

  def frozen(self, source_params) -> tuple[dict, dict]:
    """(trees, their logical axes): what the step reads but never trains."""
    if not self.needs_reference:
      return {}, {}
    return {"reference": source_params()}, {"reference": model_lib.logical_axes(self.model_cfg)}

  def wrap(self, loss_fn, *, train: bool):
    del train
    return loss_fn

  def start(self, source_params, source_saved):
    """The trainable tree a new run starts from (host arrays), or None for a fresh init. `source_params()`: the
    init_from run's params (merged); `source_saved()`: its checkpoint's params as saved (a LoRA run's delta)."""
    del source_saved
    # a copy: the trainable state is donated to the step, and a reference must not share its buffers
    return jax.tree.map(lambda x: np.array(x, copy=True), source_params())

  def model_params(self, trainable, frozen):
    """The full params the model runs with (for samples)."""
    del frozen
    return trainable

  def reference_params(self, frozen):
    return frozen["reference"]


class Lora(Full):
  """A LoRA delta trains on a frozen base, the params of the run init_from names."""
  name = "LoRA delta"

  def init_trainable(self, rng):
    lc = self.config.lora
    return lora.init_boxed(model_lib.abstract_params(self.model_cfg), model_lib.logical_axes(self.model_cfg),
                           rank=lc.rank, alpha=lc.alpha, targets=lc.targets, rng=rng, rslora=lc.rslora)

  def frozen(self, source_params):
    lc = self.config.lora
    params = source_params()
    base = lora.quantize_int8(params, lc.targets) if lc.quantize_base else params
    return {"base": base}, {"base": lora.logical_axes(base, model_lib.logical_axes(self.model_cfg))}

  def wrap(self, loss_fn, *, train: bool):
    lc = self.config.lora

    def wrapped(delta, batch, frozen, rng=None):
      base = lora.dequantize(frozen["base"])
      inner = dict(frozen, reference=base)
      if lc.merged:
        return loss_fn(lora.merge(base, delta), batch, inner, rng)
      return lora.apply(loss_fn, base, delta, batch, inner, rng, dropout=lc.dropout if train else 0.0, rng=rng)

    return wrapped

  def start(self, source_params, source_saved):
    """lora.continue_delta: the delta of the LoRA run init_from names, trained further; else a new delta."""
    del source_params
    if not self.config.lora.continue_delta:
      return None
    return lora.from_saved(source_saved(), self.config.lora)

  def model_params(self, delta, frozen):
    return lora.merge(lora.dequantize(frozen["base"]), delta)

  def reference_params(self, frozen):
    return lora.dequantize(frozen["base"])


class Prefix(Full):
  """What prompt and prefix tuning share: a small tree beside a frozen base (the params of the run init_from
  names), which doubles as the reference. `entries(trainable)` is what the model sees beside the base's params."""

  def frozen(self, source_params):
    axes = model_lib.logical_axes(self.model_cfg)
    return {"base": source_params()}, {"base": axes}

  def entries(self, trainable) -> dict:
    return model_entries(trainable)

  def wrap(self, loss_fn, *, train: bool):
    del train

    def wrapped(trainable, batch, frozen, rng=None):
      return loss_fn(dict(frozen["base"], **self.entries(trainable)), batch, dict(frozen, reference=frozen["base"]),
                     rng)

    return wrapped

  def model_params(self, trainable, frozen):
    return dict(frozen["base"], **self.entries(trainable))

  def reference_params(self, frozen):
    return frozen["base"]


def _vocab_rows(params, num: int, rng, token_ids=None):
  """[num, D]: the embeddings of `token_ids` repeated to `num` rows, or of `num` random vocabulary ids."""
  table = np.asarray(params["embed"]["embedding"])
  if token_ids:
    ids = np.resize(np.asarray(token_ids), num)
  else:
    ids = np.asarray(jax.random.randint(rng, (num,), 0, table.shape[0]))
  return table[ids].astype(np.float32)


class PromptTuning(Prefix):
  """prompt_tuning.num_tokens virtual-token embeddings train in front of every sequence on a frozen model."""
  name = "tuned prompt"

  def __init__(self, config, model_cfg, needs_reference, tokenizer=None):
    super().__init__(config, model_cfg, needs_reference)
    self.tokenizer = tokenizer

  def init_trainable(self, rng):
    p, d = self.config.prompt_tuning.num_tokens, self.model_cfg.d_model
    prompt = jax.random.normal(rng, (p, d), jnp.float32) / math.sqrt(d)  # the scale of the model's embedding init
    return {"prompt": nn.LogicallyPartitioned(prompt, ("prefix", "embed"))}

  def start(self, source_params, source_saved):
    """The embeddings of prompt_tuning.init_text's tokens (repeated to num_tokens), or of random vocabulary
    tokens: Lester et al.'s better inits than random vectors."""
    del source_saved
    pc = self.config.prompt_tuning
    ids = self.tokenizer.encode(pc.init_text) if pc.init_text and self.tokenizer is not None else None
    return {"prompt": _vocab_rows(source_params(), pc.num_tokens, jax.random.key(self.config.seed + 1), ids)}


class PrefixTuning(Prefix):
  """prefix_tuning.num_tokens keys and values per layer train on a frozen model, directly or (hidden > 0) through
  PEFT's reparameterisation: embedding [P, D] -> Linear(D, hidden) -> tanh -> Linear(hidden, L·2·K·E)."""
  name = "tuned prefix"

  def _shape(self):
    c = self.model_cfg
    return c.num_layers, self.config.prefix_tuning.num_tokens, c.num_kv_heads, c.head_dim

  def init_trainable(self, rng):
    l, p, k, e = self._shape()
    hidden, d = self.config.prefix_tuning.hidden, self.model_cfg.d_model
    box = nn.LogicallyPartitioned
    if not hidden:
      kv_axes = ("layers", "prefix", "kv_heads", "head_dim")
      rk, rv = jax.random.split(rng)
      return {"prefix": {"k": box(jax.random.normal(rk, (l, p, k, e)), kv_axes),
                         "v": box(jax.random.normal(rv, (l, p, k, e)), kv_axes)}}
    r0, r1, r2 = jax.random.split(rng, 3)
    return {"prefix_mlp": {
        "embedding": box(jax.random.normal(r0, (p, d)) / math.sqrt(d), ("prefix", "embed")),
        "w1": box(jax.random.normal(r1, (d, hidden)) / math.sqrt(d), ("embed", "prefix")),
        "b1": box(jnp.zeros((hidden,)), ("prefix",)),
        "w2": box(jax.random.normal(r2, (hidden, l, 2, k, e)) / math.sqrt(hidden),
                  ("prefix", "layers", None, "kv_heads", "head_dim")),
        "b2": box(jnp.zeros((l, 2, k, e)), ("layers", None, "kv_heads", "head_dim"))}}

  def start(self, source_params, source_saved):
    """Keys and values the frozen model computes on random vocabulary tokens (Li & Liang: real activations
    train better than random ones); with the MLP, its embedding starts at those tokens' embeddings."""
    del source_saved
    params = source_params()
    rows = _vocab_rows(params, self._shape()[1], jax.random.key(self.config.seed + 1))
    if self.config.prefix_tuning.hidden:
      mlp = nn.meta.unbox(self.init_trainable(jax.random.key(self.config.seed)))["prefix_mlp"]
      return {"prefix_mlp": jax.tree.map(np.asarray, dict(mlp, embedding=rows))}
    _, (k, v) = model_lib.split_prefix(self.model_cfg, dict(params, prompt=jnp.asarray(rows)))
    return {"prefix": {"k": np.asarray(k, np.float32), "v": np.asarray(v, np.float32)}}


def model_entries(trainable) -> dict:
  """What the model sees beside the base's params for a prompt- or prefix-tuning tree: {"prompt": [P, D]} or
  {"prefix": {"k", "v"}} (model.split_prefix)."""
  return {"prompt": trainable["prompt"]} if "prompt" in trainable else {"prefix": prefix_kv(trainable)}


def prefix_kv(trainable) -> dict:
  """{"k", "v"} [L, P, K, E] of a prefix-tuning tree: as trained, or produced by its reparameterisation MLP."""
  if "prefix" in trainable:
    return trainable["prefix"]
  m = trainable["prefix_mlp"]
  h_PxH = jnp.tanh(jnp.asarray(m["embedding"]) @ jnp.asarray(m["w1"]) + jnp.asarray(m["b1"]))
  kv_PxLx2xKxE = jnp.einsum("ph,hlzke->plzke", h_PxH, jnp.asarray(m["w2"])) + jnp.asarray(m["b2"])
  kv_2xLxPxKxE = jnp.transpose(kv_PxLx2xKxE, (2, 1, 0, 3, 4))
  return {"k": kv_2xLxPxKxE[0], "v": kv_2xLxPxKxE[1]}


def kind(config) -> str:
  """full | lora | prompt | prefix: the tuning a config (a ConfigDict, or a run's config.json dict) trains."""
  get = lambda section, key, default: (config.get(section) or {}).get(key, default)
  if get("lora", "enabled", False):
    return "lora"
  if get("prompt_tuning", "num_tokens", 0):
    return "prompt"
  return "prefix" if get("prefix_tuning", "num_tokens", 0) else "full"


def make(config, model_cfg: model_lib.ModelConfig, needs_reference: bool, tokenizer=None) -> Full:
  k = kind(config)
  if k == "prompt":
    return PromptTuning(config, model_cfg, needs_reference, tokenizer)
  return {"full": Full, "lora": Lora, "prefix": PrefixTuning}[k](config, model_cfg, needs_reference)


def validate(config, needs_reference: bool):
  """Raises ConfigError naming the key of a parameter-efficient setting that cannot work."""
  pt, xt = config.prompt_tuning, config.prefix_tuning
  _check(pt.num_tokens >= 0, "prompt_tuning.num_tokens", f"must be >= 0, got {pt.num_tokens}")
  _check(xt.num_tokens >= 0, "prefix_tuning.num_tokens", f"must be >= 0, got {xt.num_tokens}")
  _check(xt.hidden >= 0, "prefix_tuning.hidden", f"must be >= 0, got {xt.hidden}")
  on = [name for name, used in (("lora.enabled", config.lora.enabled), ("prompt_tuning.num_tokens", pt.num_tokens),
                                ("prefix_tuning.num_tokens", xt.num_tokens)) if used]
  _check(len(on) <= 1, on[-1] if on else "", f"choose one parameter-efficient method; {' and '.join(on)} are set")
  for key in ("prompt_tuning.num_tokens", "prefix_tuning.num_tokens"):
    _check(key not in on or bool(config.init_from), key, "a prompt or prefix trains on a frozen model: set "
           "init_from to a trained run")
  c = config.lora
  if not c.enabled:
    return
  _check(bool(config.init_from), "lora.enabled", "a LoRA delta needs a base: set init_from to a trained run")
  _check(c.rank > 0, "lora.rank", f"must be > 0, got {c.rank}")
  _check(c.alpha > 0, "lora.alpha", f"must be > 0, got {c.alpha}")
  _check(0 <= c.dropout < 1, "lora.dropout", f"must be in [0, 1), got {c.dropout}")
  _check(not (c.continue_delta and needs_reference), "lora.continue_delta",
         "the reference is the LoRA base without a delta, which a continued delta does not start from; start "
         "from the merged model instead (lora.continue_delta=False)")
  _check(not (c.merged and c.dropout), "lora.dropout",
         "dropout acts on the A·B path's input, which lora.merged=True does not compute; set lora.merged=False")
  try:
    lora.resolve_targets(c.targets)
  except ValueError as e:
    raise ConfigError(str(e)) from e
