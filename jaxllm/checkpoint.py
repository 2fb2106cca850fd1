"""Checkpoints with orbax: the train state, the data iterator's position and a small JSON of metadata
(tokenizer hash, model config) are saved together, under one step, every N steps, keeping the newest K."""

from __future__ import annotations

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


def abstract_with_shardings(abstract_tree, shardings):
  """ShapeDtypeStructs carrying shardings: the restore target that places each array where the step wants it."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings)
