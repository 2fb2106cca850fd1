"""A run's model written out, and a model brought in as a run: the one place where runs meet other formats.

  jaxllm export --workdir runs/sft_lora --out runs/sft_lora_merged [--step N]     # a full jaxllm run directory
  jaxllm hf export --workdir RUN --out DIR [--max-shard-size 2GB] [--dtype bfloat16] [--peft]
  jaxllm hf import --hf DIR --out RUN_DIR                                          # a checkpoint at step 0

A LoRA run is written merged (base + delta), or with --peft as its delta alone in PEFT's adapter layout.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp

from jaxllm import checkpoint, hf, peft as peft_lib, runs, tasks
from jaxllm.data import tokenizer as tokenizer_lib
from jaxllm.errors import ConfigError


def _new_dir(out: str):
  if os.path.exists(out):
    raise FileExistsError(f"--out {out!r} exists; choose a new directory")
  os.makedirs(out)


def _save_run(out: str, config: dict, step: int, params, meta: dict):
  with open(os.path.join(out, runs.CONFIG), "w") as f:
    json.dump(config, f, indent=2)
  ckpt = checkpoint.Checkpointer(os.path.join(out, runs.CHECKPOINTS), keep=1, async_save=False)
  ckpt.save(step, {"params": params}, meta=meta)
  ckpt.close()


def _resolve(workdir: str, step: int | None) -> tuple[str, int]:
  return runs.resolve(workdir if step is None else os.path.join(workdir, runs.CHECKPOINTS, str(step)))


def to_run(workdir: str, out: str, step: int | None = None) -> str:
  """The run's model (a LoRA run: merged) as a full run directory (config, tokenizer, one checkpoint) that
  init_from, generate and other tools read like any pretraining or SFT run."""
  run_dir, step = _resolve(workdir, step)
  _refuse_prefix(run_dir, "export")
  params = jax.tree.map(jnp.asarray, runs.load_params(run_dir, step))
  _new_dir(out)
  config = runs.read_config(run_dir)
  config["lora"]["enabled"], config["exported_from"] = False, runs.fingerprint(run_dir, step)
  tokenizer_lib.load(run_dir).save_to(out)
  _save_run(out, config, step, params, {"exported_from": config["exported_from"]})
  return out


def import_hf(hf_dir: str, out: str) -> str:
  """A Hugging Face directory as a jaxllm run directory (config.json, checkpoints/0, tokenizer.model when the HF
  directory has one)."""
  cfg, params = hf.load(hf_dir)
  _new_dir(out)
  source = runs.fingerprint(hf_dir, 0)
  config = {"model": dataclasses.asdict(cfg), "init_from": "", "lora": {"enabled": False},
            "imported_from": source, "hf_config": hf.read_config(hf_dir)}
  if tokenizer_lib.find(hf_dir):  # sentencepiece's tokenizer.model, or tokenizer.json with its config and template
    tokenizer_lib.load(hf_dir).save_to(out)
  else:
    print(f"note: {hf_dir} has no tokenizer ({runs.TOKENIZER} or tokenizer.json); training from {out} needs one "
          "there")
  _save_run(out, config, 0, params, {"imported_from": source, "model": config["model"]})
  return out


def _hf_template(run_dir: str, depth: int = 0) -> dict:
  """The Hugging Face config.json a run descends from (through init_from), or {}."""
  config = runs.read_config(run_dir)
  if "hf_config" in config or not config.get("init_from") or depth > 32:
    return config.get("hf_config", {})
  source = config["init_from"]
  try:
    return hf.read_config(source) if hf.is_hf_dir(source) else _hf_template(runs.resolve(source)[0], depth + 1)
  except (FileNotFoundError, NotADirectoryError, ConfigError):
    return {}


def to_hf(workdir: str, out: str, *, step: int | None = None, max_shard_size="5GB", dtype="float32",
          peft: bool = False) -> str:
  """The run's model (a LoRA run: merged) as a Hugging Face directory with its tokenizer.model (a reward model's as
  <Family>ForSequenceClassification); `peft`: a LoRA run's delta as a PEFT adapter instead."""
  run_dir, step = _resolve(workdir, step)
  if hf.is_hf_dir(run_dir):
    raise ValueError(f"--workdir {workdir!r} is already a Hugging Face directory")
  if os.path.exists(out):
    raise FileExistsError(f"--out {out!r} exists; choose a new directory")
  cfg = runs.model_config(run_dir)
  if peft:
    return to_peft(run_dir, step, out)
  _refuse_prefix(run_dir, "hf export")
  template = _hf_template(run_dir)
  tok = tokenizer_lib.load(run_dir) if tokenizer_lib.find(run_dir) else None
  if not template and tok is not None:
    template = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
  stage = runs.read_config(run_dir).get("stage", "pretrain")
  score_token = None
  if tasks.TASKS[stage].score_token:  # a reward model: its score head, as a sequence-classification checkpoint
    score_token = tok.token_id(tasks.TASKS[stage].score_token)
  hf.save(out, cfg, runs.load_params(run_dir, step), max_shard_size=max_shard_size, dtype=dtype, hf_config=template,
          score_token=score_token)
  if tok is not None:
    tok.save_to(out)
  return out


def to_peft(run_dir: str, step: int, out: str) -> str:
  """A LoRA run's delta (hf.save_adapter), or a prompt- or prefix-tuned run's prompt or prefix
  (hf.save_prefix_adapter), as a PEFT adapter, its base named by the run's init_from."""
  kind = peft_lib.kind(runs.read_config(run_dir))
  if kind == "full":
    raise ValueError(f"--peft: {run_dir} is not a LoRA, prompt- or prefix-tuned run (it trained every parameter)")
  base = runs.lora_base(run_dir)[0]  # the run's init_from (its base's, if it continued another's delta)
  if hf.is_hf_dir(base):
    base = os.path.abspath(base)
  else:
    print(f"note: the base {base!r} is a jaxllm run; export it too (python -m jaxllm.hf export --workdir {base} "
          "--out BASE) and set base_model_name_or_path in adapter_config.json to BASE")
  cfg = runs.model_config(run_dir)
  if kind != "lora":
    hf.save_prefix_adapter(out, cfg, peft_lib.model_entries(runs.saved_params(run_dir, step)), base=base)
    return out
  lc = runs.lora_config(run_dir)
  hf.save_adapter(out, cfg, runs.delta(run_dir, step), rank=lc["rank"], alpha=lc["alpha"],
                  rslora=lc.get("rslora", False), base=base, dropout=lc.get("dropout", 0.0))
  return out


def _refuse_prefix(run_dir: str, what: str):
  kind = peft_lib.kind(runs.read_config(run_dir))
  if kind in ("prompt", "prefix"):
    raise ValueError(f"{what}: {run_dir} is {kind}-tuned; its {kind} runs ahead of the tokens and cannot be merged "
                     f"into the weights: export it as a PEFT adapter (jaxllm hf export --peft)")


if __name__ == "__main__":  # python -m jaxllm.export: the `jaxllm export` command of jaxllm/cli.py
  import runpy
  import sys

  sys.argv[1:1] = ["export"]
  runpy.run_module("jaxllm.cli", run_name="__main__")
