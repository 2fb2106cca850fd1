"""Checkpoints with orbax: the train state, the data iterator's position and a small JSON of metadata
(tokenizer hash, model config) are saved together, under one step, every N steps, keeping the newest K.

A save is written under a temporary name and renamed to `N/` when complete (orbax's commit), so a process killed
mid-save leaves only a temporary directory: never listed, never restored, and removed at the next start. A save
that fails (a full or failing disk) raises CheckpointError at the next save or wait, never silently."""

from __future__ import annotations

import json
import os
import shutil
import threading
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

_RETIRED = ".orbax-checkpoint-tmp-retired"  # orbax's temporary-name marker: not a step; removed at the next start


class CheckpointError(RuntimeError):
  """A checkpoint could not be written; the newest committed one is intact."""


class Checkpointer:
  def __init__(self, directory: str, *, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.keep = keep
    # Retention is ours (_retire_old), not orbax's max_to_keep: its deletion can be cut short by a kill and leave
    # a half-deleted step that still lists as committed.
    options = ocp.CheckpointManagerOptions(create=True, cleanup_tmp_directories=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options)
    self._in_flight = None  # the step of the save not yet known to be committed
    self._deleting = []     # threads removing retired checkpoints

  def latest_step(self) -> int | None:
    """The newest committed step; waits for a save in flight (never lists one still being written)."""
    self.wait()
    return self.manager.latest_step()

  def save(self, step: int, state, data_iterator=None, meta: dict | None = None) -> bool:
    """Starts saving `step` (in the background if async) after the previous save has committed."""
    self.wait()
    items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta or {})}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    self._in_flight = step
    try:
      return self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    except Exception as e:
      self._in_flight = None
      raise self._error(step, e) from e

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
    """Blocks until the save in flight has committed, then retires old checkpoints. Raises CheckpointError if
    that save failed."""
    step, self._in_flight = self._in_flight, None
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      raise self._error(step, e) from e
    self._retire_old()

  def close(self):
    self.wait()
    self.manager.close()
    for thread in self._deleting:
      thread.join()

  def _error(self, step, cause: Exception) -> CheckpointError:
    try:
      self.manager.reload()  # the committed steps on disk: the failed one is not among them
      latest = f"the newest committed checkpoint is {self.manager.latest_step()}"
    except Exception as e:  # the directory itself is gone or unreadable
      latest = f"the directory cannot be listed either ({e})"
    return CheckpointError(f"checkpoint {step} could not be written to {self.directory}: {type(cause).__name__}: "
                           f"{cause}\n({latest}; the same command resumes from the newest committed checkpoint "
                           "once the directory is writable)")

  def _retire_old(self):
    """Deletes the committed checkpoints older than the newest `keep`, each first renamed to a temporary name in
    one atomic step: a kill while deleting leaves no half-deleted checkpoint that would list as committed."""
    old = self.manager.all_steps()[:-self.keep]
    if not old:
      return
    self._deleting = [t for t in self._deleting if t.is_alive()]
    if jax.process_index() == 0:
      for step in old:
        path = os.path.join(self.directory, str(step))
        os.rename(path, path + _RETIRED)
        thread = threading.Thread(target=shutil.rmtree, args=(path + _RETIRED,), kwargs={"ignore_errors": True})
        thread.start()
        self._deleting.append(thread)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"checkpoint retire {old[-1]}")
    self.manager.reload()


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


def location(run_dir: str, step: int) -> str:
  """Where a resolved init_from lives, for messages: a run's checkpoint directory, or a Hugging Face model's."""
  return f"{run_dir} (Hugging Face model)" if _is_hf(run_dir) else f"{run_dir}/checkpoints/{step}"


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
