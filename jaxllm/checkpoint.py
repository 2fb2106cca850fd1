"""Checkpoints with orbax: the train state, the data iterator's position and a small JSON of metadata
(tokenizer hash, model config) are saved together, under one step, every N steps, keeping the newest K."""

from __future__ import annotations

import json
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp


class Checkpointer:
  def __init__(self, directory: str, *, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iterator=None, meta: dict | None = None) -> bool:
    items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta or {})}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, step: int, abstract_state, data_iterator=None) -> tuple[Any, dict]:
    """The state at `step`, placed with `abstract_state`'s shardings; `data_iterator` is moved in place."""
    items = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    out = self.manager.restore(step, args=ocp.args.Composite(**items))
    return out["state"], out["meta"]

  def restore_meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def resolve_run(path: str) -> tuple[str, int]:
  """(run directory, step) of `init_from`: a run's workdir (its newest checkpoint), one of its checkpoints
  (`.../checkpoints/N`), or a Hugging Face model directory (step 0; see jaxllm/hf.py)."""
  path = os.path.abspath(path)
  if _is_hf(path):
    return path, 0
  if os.path.isdir(os.path.join(path, "checkpoints")):
    step = ocp.CheckpointManager(os.path.join(path, "checkpoints")).latest_step()
    if step is None:
      raise FileNotFoundError(f"init_from: {path}/checkpoints holds no finished checkpoint")
    return path, step
  parent, name = os.path.split(path)
  if os.path.basename(parent) == "checkpoints" and name.isdigit() and os.path.isdir(path):
    return os.path.dirname(parent), int(name)
  raise FileNotFoundError(f"init_from: {path!r} is neither a run directory (with checkpoints/), a checkpoint "
                          "directory (.../checkpoints/N), nor a Hugging Face model directory (config.json)")


def _is_hf(path: str) -> bool:
  from jaxllm import hf
  return hf.is_hf_dir(path)


def identity(run_dir: str, step: int) -> str:
  """Names one checkpoint exactly: its run, step and commit time (a run retrained in place gets a new one)."""
  if _is_hf(run_dir):
    from jaxllm import hf
    return hf.identity(run_dir)
  meta_path = os.path.join(run_dir, "checkpoints", str(step), "_CHECKPOINT_METADATA")
  committed = None
  if os.path.exists(meta_path):
    with open(meta_path) as f:
      committed = json.load(f).get("commit_timestamp_nsecs")
  return f"{os.path.abspath(run_dir)}/checkpoints/{step}@{committed}"


def load_params(run_dir: str, step: int):
  """The model params of a run's checkpoint, as host arrays (the caller places them on its mesh). A LoRA run's
  checkpoint holds only its delta: it is put back on the run's own base (its init_from), recursively. A Hugging
  Face directory's params are read from its safetensors."""
  if _is_hf(run_dir):
    from jaxllm import hf
    return hf.load(run_dir)[1]
  params = restore_params(run_dir, step)
  config_path = os.path.join(run_dir, "config.json")
  lora_config = json.load(open(config_path)).get("lora", {}) if os.path.exists(config_path) else {}
  if not lora_config.get("enabled"):
    return params
  from jaxllm import lora
  return lora.merge(load_params(*lora_base(run_dir)), lora.from_saved(params, lora_config))


def lora_base(run_dir: str) -> tuple[str, int]:
  """(run directory, step) of the params a LoRA run's delta applies to: its init_from, or, when it continued
  the delta of another LoRA run (lora.continue_delta), that run's base, recursively."""
  with open(os.path.join(run_dir, "config.json")) as f:
    config = json.load(f)
  source = resolve_run(config["init_from"])
  return lora_base(source[0]) if config.get("lora", {}).get("continue_delta") else source


def restore_params(run_dir: str, step: int):
  """The params as saved in a run's checkpoint (a LoRA run's: its delta, {"a", "b"} dicts), host arrays."""
  manager = ocp.CheckpointManager(os.path.join(run_dir, "checkpoints"))
  return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]["params"]


def abstract_with_shardings(abstract_tree, shardings):
  """ShapeDtypeStructs carrying shardings: the restore target that places each array where the step wants it."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings)
