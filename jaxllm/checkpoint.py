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

  def close_after_error(self):
    """Closes while another error is on its way out: stops orbax's background work (which would otherwise print
    its own errors at interpreter exit) and lets the caller's error be the one reported."""
    try:
      self.close()
    except Exception:  # the save that failed already raised; the run's error says what happened
      pass

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


def latest_step(directory: str) -> int | None:
  """The newest committed step in a checkpoint directory (None if it holds none)."""
  return ocp.CheckpointManager(os.path.abspath(directory)).latest_step()


def commit_time(directory: str, step: int) -> int | None:
  """When checkpoint `step` was committed (orbax's nanosecond timestamp), or None if it was not recorded."""
  meta_path = os.path.join(directory, str(step), "_CHECKPOINT_METADATA")
  if not os.path.exists(meta_path):
    return None
  with open(meta_path) as f:
    return json.load(f).get("commit_timestamp_nsecs")


def restore_params(directory: str, step: int):
  """The params as saved in checkpoint `step` of `directory` (a LoRA run's: its delta, {"a", "b"} dicts), host
  arrays."""
  manager = ocp.CheckpointManager(os.path.abspath(directory))
  return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]["params"]


def restore_params_to(directory: str, step: int, abstract_params, sharding):
  """Only the params of checkpoint `step` (the optimizer state stays on disk), as arrays of `abstract_params`'
  shapes placed with `sharding`, whatever mesh saved them."""
  manager = ocp.CheckpointManager(os.path.abspath(directory))
  if step not in manager.all_steps():
    raise FileNotFoundError(f"{directory}: no checkpoint {step} (steps: {sorted(manager.all_steps())})")
  target = {"params": jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                                   abstract_params)}
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True)))
  manager.close()
  return restored["state"]["params"]


def abstract_with_shardings(abstract_tree, shardings):
  """ShapeDtypeStructs carrying shardings: the restore target that places each array where the step wants it."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings)
