"""A run directory, and the one module that reads and writes what it holds besides checkpoints and metrics:

  WORKDIR/config.json        the config as run (model fields resolved), written only once accepted
  WORKDIR/config_history.jsonl  the accepted changes of each resume (see `accept_config`)
  WORKDIR/tokenizer.model    the run's sentencepiece tokenizer
  WORKDIR/checkpoints/N/     orbax checkpoints (jaxllm/checkpoint.py)

`init_from` names where a run starts: a run directory (its newest checkpoint), one of its checkpoints
(`.../checkpoints/N`), or a Hugging Face model directory (config.json + safetensors, read by jaxllm/hf.py). The
"params of a run" are its checkpoint's params, with a LoRA run's delta merged onto its base.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time

import jax
import numpy as np

from jaxllm import checkpoint, hf, lora, model as model_lib, peft
from jaxllm.config import model_overrides, resolve_model
from jaxllm.data import tokenizer as tokenizer_lib
from jaxllm.data.tokenizer import Tokenizer, train_tokenizer
from jaxllm.errors import ConfigError, RunError

CONFIG, HISTORY, TOKENIZER, CHECKPOINTS = "config.json", "config_history.jsonl", "tokenizer.model", "checkpoints"
_MODEL_FIELDS = {f.name for f in dataclasses.fields(model_lib.ModelConfig)}


# ------------------------------------------------------------------------------------------ config.json


def read_config(run_dir: str) -> dict:
  """The config.json of a run directory (or of a Hugging Face directory)."""
  path = os.path.join(run_dir, CONFIG)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{run_dir}: no {CONFIG}; not a run directory")
  with open(path) as f:
    return json.load(f)


def _write_json(path: str, value):
  """Writes `value` as JSON to `path` atomically: a reader sees the old file or the new one, never a part."""
  with open(path + ".tmp", "w") as f:
    json.dump(value, f, indent=2)
    f.flush()
    os.fsync(f.fileno())
  os.replace(path + ".tmp", path)


def resolved_config(config, model_cfg: model_lib.ModelConfig) -> dict:
  """The config as run, with the model fields resolved from the preset and the tokenizer: config.json."""
  out = config.to_dict()
  out["model"].update(dataclasses.asdict(model_cfg))
  return out


# Keys a resumed run may change: they do not change what the run computes, only how it is run, logged and saved,
# and train.steps: where the run ends (the schedule follows the new length). Any other changed key is refused.
MAY_CHANGE = ("train.steps", "train.log_every", "train.eval_every", "train.eval_batches", "train.checkpoint_every",
              "train.keep_checkpoints", "train.num_samples", "train.sample_tokens", "train.sample_prompts",
              "train.grad_accum", "train.nan_policy", "mesh.", "model.remat_policy", "model.attention",
              "model.query_blocks", "lora.merged", "dpo.cache_reference", "data.on_bad_record",
              "data.max_bad_fraction", "eval.")


def _flat(tree: dict, prefix: str = "") -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[prefix + key] = value
  return out


def accept_config(workdir: str, config: dict, resuming: bool):
  """Writes `config` as the run's config.json (atomically). A resumed run's config is first compared with the
  one it ran with: a changed key that changes what the run computes (the model, tokenizer, data, seed, batch,
  sequence length, optimizer and schedule) is refused before anything is written,
  one line per key; the accepted changes (logging, eval and checkpoint cadence, mesh layout, ...) are appended
  to config_history.jsonl with the step's time."""
  path = os.path.join(workdir, CONFIG)
  if resuming and os.path.exists(path):
    old, new = _flat(read_config(workdir)), _flat(json.loads(json.dumps(config)))
    changed = {k: (old[k], new[k]) for k in sorted(old.keys() & new.keys()) if old[k] != new[k]}
    refused = [k for k in changed if not k.startswith(MAY_CHANGE)]
    if refused:
      lines = "; ".join(f"{k}: {changed[k][0]!r} -> {changed[k][1]!r}" for k in refused)
      raise RunError(f"{workdir}: resuming with a changed config ({lines}); these keys change what the run "
                     f"computes: rerun with the values of {path}, or start a new --workdir")
    if changed and jax.process_index() == 0:
      with open(os.path.join(workdir, HISTORY), "a") as f:
        f.write(json.dumps({"time": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
                            "changed": {k: list(v) for k, v in changed.items()}}) + "\n")
  if jax.process_index() == 0:
    _write_json(path, config)


def _model_config_from(fields: dict, **compute) -> model_lib.ModelConfig:
  return model_lib.ModelConfig(**{**{k: v for k, v in fields.items() if k in _MODEL_FIELDS}, **compute})


def model_config(run_dir: str) -> model_lib.ModelConfig:
  """The ModelConfig of a run directory or a Hugging Face directory."""
  fields = read_config(run_dir)
  if hf.is_hf_dir(run_dir):
    return hf.model_config(fields, os.path.join(run_dir, CONFIG))
  return _model_config_from(fields["model"])


# ModelConfig fields an init_from run may choose for itself, and their values in sources written before the field
# existed (scan_layers: the scan was the only layout).
COMPUTE = {"dtype": "float32", "scan_layers": True, "remat_policy": "none", "attention": "einsum", "query_blocks": 1}


def model_for(config, run_dir: str | None, vocab_size: int, resumed: str | None = None) -> model_lib.ModelConfig:
  """The ModelConfig a run trains: from the preset and the tokenizer (`vocab_size`), or that of the run
  `init_from` names (`run_dir`) with this config's compute choices (dtype, scan, remat). Shapes set in this
  config must agree with the init_from run's. A run being resumed (`resumed`, its workdir) keeps its checkpoints'
  layer layout where model.scan_layers is unset."""
  if resumed and config.model.scan_layers is None and os.path.exists(os.path.join(resumed, CONFIG)):
    config = config.copy_and_resolve_references()
    config.model.scan_layers = read_config(resumed)["model"]["scan_layers"]
  if run_dir is None:
    return resolve_model(config, vocab_size)
  fields = read_config(run_dir)
  if hf.is_hf_dir(run_dir):
    window = hf.sliding_window(fields)
    if window and config.train.seq_len > window:
      raise ConfigError(f"train.seq_len: {config.train.seq_len} is longer than the sliding attention window "
                        f"({window}) of {run_dir}; jaxllm attends to the whole sequence, which is the same model "
                        "only up to the window")
    try:
      fields = dataclasses.asdict(hf.model_config(fields, os.path.join(run_dir, CONFIG)))
    except ValueError as e:
      raise ConfigError(f"init_from: {e}") from e
  else:
    fields = dict(fields["model"])
  for key, value in model_overrides(config).items():
    if key in COMPUTE:  # how the model is computed, not what it is: unset, the source's (or its default)
      fields[key] = fields.get(key, COMPUTE[key]) if value is None else value
    elif value is not None and value != fields[key]:
      raise ConfigError(f"model.{key}: {value} differs from {fields[key]} in the run init_from names ({run_dir})")
  return _model_config_from(fields)


# --------------------------------------------------------------------------------------------- init_from


def resolve(path: str) -> tuple[str, int]:
  """(run directory, step) of `init_from`: a run's workdir (its newest checkpoint), one of its checkpoints
  (`.../checkpoints/N`), or a Hugging Face model directory (step 0)."""
  path = os.path.abspath(path)
  if hf.is_hf_dir(path):
    return path, 0
  if os.path.isdir(os.path.join(path, CHECKPOINTS)):
    step = checkpoint.latest_step(os.path.join(path, CHECKPOINTS))
    if step is None:
      raise FileNotFoundError(f"init_from: {path}/{CHECKPOINTS} holds no finished checkpoint")
    return path, step
  parent, name = os.path.split(path)
  if os.path.basename(parent) == CHECKPOINTS and name.isdigit() and os.path.isdir(path):
    return os.path.dirname(parent), int(name)
  raise FileNotFoundError(f"init_from: {path!r} is neither a run directory (with checkpoints/), a checkpoint "
                          "directory (.../checkpoints/N), nor a Hugging Face model directory (config.json)")


def location(run_dir: str, step: int) -> str:
  """Where a resolved init_from lives, for messages: a run's checkpoint directory, or a Hugging Face model's."""
  return f"{run_dir} (Hugging Face model)" if hf.is_hf_dir(run_dir) else f"{run_dir}/{CHECKPOINTS}/{step}"


def fingerprint(run_dir: str, step: int) -> str:
  """Names one checkpoint exactly: its run, step and commit time (a run retrained in place gets a new one); a
  Hugging Face directory by a hash of its files' names, sizes and modification times."""
  if hf.is_hf_dir(run_dir):
    h = hashlib.sha256()
    for name in sorted(os.listdir(run_dir)):
      if name == CONFIG or ".safetensors" in name:
        s = os.stat(os.path.join(run_dir, name))
        h.update(f"{name}:{s.st_size}:{s.st_mtime_ns};".encode())
    return f"{os.path.abspath(run_dir)}@hf:{h.hexdigest()[:16]}"
  committed = checkpoint.commit_time(os.path.join(run_dir, CHECKPOINTS), step)
  return f"{os.path.abspath(run_dir)}/{CHECKPOINTS}/{step}@{committed}"


def lora_config(run_dir: str) -> dict:
  """The "lora" section of a run's config.json ({} for a Hugging Face directory or a run without one)."""
  if hf.is_hf_dir(run_dir) or not os.path.exists(os.path.join(run_dir, CONFIG)):
    return {}
  return read_config(run_dir).get("lora", {})


def lora_base(run_dir: str) -> tuple[str, int]:
  """(run directory, step) of the params a LoRA run's delta (or a prompt / prefix) applies to: its init_from,
  or, when it continued the delta of another LoRA run (lora.continue_delta), that run's base, recursively."""
  config = read_config(run_dir)
  source = resolve(config["init_from"])
  return lora_base(source[0]) if config.get("lora", {}).get("continue_delta") else source


def continued_base(config, source: tuple[str, int]) -> tuple[str, int]:
  """lora.continue_delta: the base of the LoRA run init_from names, after checking that its delta has this
  config's shape and scale."""
  run_dir = source[0]
  source_lora = lora_config(run_dir)
  if not source_lora.get("enabled"):
    raise ConfigError(f"lora.continue_delta: init_from {run_dir} is not a LoRA run (no delta to continue); set "
                      "lora.continue_delta=False to train a new delta on it")
  for key in ("rank", "alpha", "targets", "rslora"):
    if source_lora.get(key) != config.lora[key]:
      raise ConfigError(f"lora.{key}: {config.lora[key]!r} differs from {source_lora.get(key)!r} of the delta "
                        f"continued from {run_dir}")
  return lora_base(run_dir)


def saved_params(run_dir: str, step: int):
  """The params as saved in a run's checkpoint: a LoRA run's delta ({"a", "b"} dicts), host arrays."""
  return checkpoint.restore_params(os.path.join(run_dir, CHECKPOINTS), step)


def delta(run_dir: str, step: int):
  """A LoRA run's delta at `step`, LoraWeight leaves with its scale."""
  return lora.from_saved(saved_params(run_dir, step), lora_config(run_dir))


def load_params(run_dir: str, step: int):
  """The model params of a run's checkpoint, as host arrays (the caller places them on its mesh). A LoRA run's
  checkpoint holds only its delta: it is put back on the run's own base (its init_from), recursively. A Hugging
  Face directory's params are read from its safetensors."""
  if hf.is_hf_dir(run_dir):
    return hf.load(run_dir)[1]
  kind = peft.kind(read_config(run_dir))
  if kind == "full":
    return saved_params(run_dir, step)
  base = model_lib.relayout(load_params(*lora_base(run_dir)), model_config(run_dir).scan_layers)  # as this run's
  if kind == "lora":
    return lora.merge(base, delta(run_dir, step))
  # a prompt or prefix beside its base's params (model.split_prefix): plain keys and values after a prefix MLP
  entries = jax.tree.map(np.asarray, peft.model_entries(saved_params(run_dir, step)))
  return dict(base, **entries)


def load_run(workdir: str, step: int | None = None):
  """(model config, params, tokenizer) of a training run: its config.json, tokenizer.model and the params of
  checkpoint `step` (default: the newest), on one device whatever mesh saved them; a LoRA run's merged."""
  cfg = model_config(workdir)
  tokenizer = tokenizer_lib.load(workdir)
  directory = os.path.abspath(os.path.join(workdir, CHECKPOINTS))
  step = checkpoint.latest_step(directory) if step is None else step
  if step is None:
    raise FileNotFoundError(f"{workdir}/{CHECKPOINTS}: no checkpoint saved")
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  lc, kind = lora_config(workdir), peft.kind(read_config(workdir))
  if kind == "full":
    return cfg, checkpoint.restore_params_to(directory, step, model_lib.abstract_params(cfg), device), tokenizer
  if kind != "lora":  # a prompt or prefix (small) beside its base
    return cfg, jax.device_put(load_params(workdir, step), device), tokenizer
  abstract = jax.eval_shape(lambda: lora.init(model_lib.abstract_params(cfg), rank=lc["rank"], alpha=lc["alpha"],
                                              targets=lc["targets"], rng=jax.random.key(0), rslora=lc["rslora"]))
  base = model_lib.relayout(load_params(*lora_base(workdir)), cfg.scan_layers)
  params = lora.merge(base, checkpoint.restore_params_to(directory, step, abstract, device))
  return cfg, params, tokenizer


# -------------------------------------------------------------------------------------------- tokenizer


def tokenizer_file(directory: str) -> str:
  """The tokenizer of an init_from directory (a run, or a Hugging Face directory): its sentencepiece
  tokenizer.model or Hugging Face tokenizer.json. Refuses, naming init_from, a directory with neither, or a
  tokenizer with more pieces than the embedding has rows (more rows is fine)."""
  path = tokenizer_lib.find(directory)
  if path is None:
    has = [n for n in ("vocab.json", "merges.txt") if os.path.exists(os.path.join(directory, n))]
    raise ConfigError(f"init_from: {directory} has no tokenizer ({TOKENIZER} or tokenizer.json)"
                      + (f"; only {', '.join(has)}" if has else "") + ": add the model's tokenizer files")
  config = read_config(directory)
  rows = config["vocab_size"] if hf.is_hf_dir(directory) else config.get("model", {}).get("vocab_size")
  try:
    pieces = tokenizer_lib.load(path).vocab_size
  except ImportError:
    raise
  except Exception as e:  # sentencepiece's and tokenizers' own errors on a file they cannot parse
    raise ConfigError(f"init_from: {path} is not a readable tokenizer ({type(e).__name__}: {e})") from e
  if rows and pieces > rows:
    raise ConfigError(f"init_from: {path} has {pieces} pieces, more than the {rows} rows of the model's "
                      "embedding (vocab_size)")
  return path


def prepare_tokenizer(config, workdir: str, texts, *, check, init_from_dir: str | None = None,
                      log=print) -> Tokenizer:
  """The run's tokenizer, saved in the workdir (tokenizer.model, or a Hugging Face tokenizer.json and
  tokenizer_config.json): the workdir's own (a resumed run), the one of the run init_from names, the configured
  path, or one trained on `texts()` (an iterable of strings). Refuses mismatches between them, and (before saving
  it) what `check(tokenizer)` refuses."""
  saved = tokenizer_lib.find(workdir)
  t = config.data.tokenizer
  if t.path and not os.path.exists(t.path):
    raise ConfigError(f"data.tokenizer.path: no file {t.path!r}")
  parent = tokenizer_file(init_from_dir) if init_from_dir else None
  if saved:
    tok, source = tokenizer_lib.load(saved), None
  elif parent:
    tok, source = tokenizer_lib.load(parent), parent
  elif t.path:
    tok, source = tokenizer_lib.load(t.path), t.path
  else:
    start = time.time()
    tok = train_tokenizer(texts(), vocab_size=t.vocab_size, model_type=t.model_type, max_sentences=t.max_sentences,
                          seed=config.seed, character_coverage=t.character_coverage)
    source = f"trained in {time.time() - start:.1f}s"
  for other, key in ((t.path, "data.tokenizer.path"), (parent, "init_from")):
    if other and tokenizer_lib.load(other).sha256 != tok.sha256:
      raise ConfigError(f"{key}: the tokenizer {other!r} differs from this run's ({saved if source is None else source}); "
                        "a run and the checkpoint it starts from must share one tokenizer")
  check(tok)
  if jax.process_index() == 0 and not saved:
    tok.save_to(workdir)
  if source:
    log(f"tokenizer: {tok.vocab_size} pieces ({source})")
  return tok


def write_eval(run_dir: str, task: str, metrics: dict) -> str:
  """RUN/eval/<task>.json (a task file's name without its directory and suffix), written atomically; its path."""
  name = os.path.basename(task).removesuffix(".jsonl")
  path = os.path.join(run_dir, "eval", f"{name}.json")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  _write_json(path, {"task": task, **metrics})
  return path
