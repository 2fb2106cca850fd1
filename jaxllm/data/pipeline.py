"""Pretraining batches from documents: tokenize, pack without padding, shift for next-token loss.

Shape letters: B = batch size, L = seq_len (tokens seen by the model per row).

Each batch is a dict of numpy arrays of shape [B, L]:
  inputs, targets    int32    targets[:, t] is the token after inputs[:, t]
  segment_ids        int32    1, 2, ... per document piece within a row; 0 = padding
  positions          int32    position within the document piece (restarts at 0 in each row)
  loss_mask          float32  1 where the target continues the same document piece

Packing is grain's ConcatThenSplit over rows of L + 1 tokens: documents (each ending in EOS) are
concatenated and cut into rows. A document cut at a row boundary continues in the next row as a
new piece, with a new segment id and positions from 0 again, so the model never attends across
rows. Rows do not overlap: the target of a row's last input is still in that row.

`counters(iterator.get_state())` reads the counts of examples kept, truncated and dropped that the SFT and
preference pipelines keep in their iterator state (all 0 for pretraining).
"""

import functools
from collections.abc import Mapping, Sequence

import grain
import numpy as np

from jaxllm.data.tokenizer import Tokenizer


COUNTERS = ("examples", "truncated", "dropped_too_long", "dropped_no_loss")  # sft.SFTStats's fields


def counters(iterator_state) -> dict[str, int]:
  """The counts of examples in the state of a data iterator (`iter(ds).get_state()`, also after a JSON round
  trip), summed over every counting filter in it (one per shard of grain's zip of shards):

    examples          examples kept (truncated ones included): for preference data, pairs
    truncated         kept but cut to seq_len + 1 tokens
    dropped_too_long  dropped for being longer than seq_len + 1 tokens (overlong="drop")
    dropped_no_loss   dropped for having nothing to learn (no loss-masked target)
    dropped           dropped_too_long + dropped_no_loss

  All 0 for a pretraining dataset (no counting filter). The counts are those of the position the state
  records: for SFT, the packer's (the examples of the packing windows already emitted, and the dropped ones
  read with them); for preference data, the pairs of the rows already emitted and the dropped ones after
  them. A restored iterator therefore counts exactly as the uninterrupted one.
  """
  totals = dict.fromkeys(COUNTERS, 0)

  def walk(node):
    if isinstance(node, Mapping):
      stats = node.get("stats")
      if "parent" in node and isinstance(stats, Mapping) and set(stats) == set(COUNTERS):
        for k in COUNTERS:  # a counting filter (sft.CountAndFilter): its parent counts nothing more
          totals[k] += int(stats[k])
        return
      for value in node.values():
        walk(value)
    elif isinstance(node, (list, tuple)):
      for value in node:
        walk(value)

  walk(iterator_state)
  return totals | {"dropped": totals["dropped_too_long"] + totals["dropped_no_loss"]}


def pretrain_dataset(
    docs: Sequence[str],
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    repeat: bool = True,
    process_index: int = 0,
    process_count: int = 1,
    shuffle_window: int = 1024,
) -> grain.IterDataset:
  """Batches of packed next-token rows from `docs` (a random-access sequence of strings).

  This process reads documents process_index, process_index + process_count, ...; shuffling
  (with `seed`) happens within that shard and differs between epochs. With repeat=False (for
  evaluation) the stream ends after one pass: the last row is padded (segment 0, pad tokens) and
  the last partial batch is dropped. `iter(ds)` supports get_state() / set_state().

  A long document fills many consecutive rows, so with shuffle=True the packed rows are also shuffled
  within windows of `shuffle_window` rows: a batch then mixes many documents.
  """
  ds = records(docs, seed=seed, shuffle=shuffle, repeat=repeat, process_index=process_index,
               process_count=process_count)
  ds = ds.filter(_is_nonempty).map(functools.partial(_tokenize, tokenizer=tokenizer))
  ds = grain.experimental.ConcatThenSplitIterDataset(
      ds.to_iter_dataset(), length_struct={"tokens": seq_len + 1})
  ds = _JsonSafeState(ds)
  if shuffle and shuffle_window > 1:
    ds = grain.experimental.WindowShuffleIterDataset(ds, window_size=shuffle_window, seed=seed)
  ds = ds.map(functools.partial(shift_for_next_token, pad_id=tokenizer.pad_id))
  return ds.batch(batch_size, drop_remainder=True)


def records(source, *, seed: int, shuffle: bool, repeat: bool, process_index: int, process_count: int,
            with_index: bool = False) -> grain.MapDataset:
  """The records of `source` this shard reads (process_index, process_index + process_count, ...), shuffled with
  `seed` and repeated (each epoch reshuffled) as asked. with_index: records become (source index, record)."""
  ds = grain.MapDataset.source(source)
  if with_index:
    ds = ds.map_with_index(_indexed)
  ds = ds[process_index::process_count]
  if shuffle:
    ds = ds.shuffle(seed)
  if repeat:
    ds = ds.repeat()  # reseeds the shuffle each epoch
  return ds


def _indexed(index: int, record):
  return index, record


def shift_for_next_token(row: dict, pad_id: int = 0) -> dict:
  """A packed row of L + 1 tokens (grain's `tokens`, `tokens_segment_ids`, `tokens_positions`)
  -> inputs/targets/segment_ids/positions/loss_mask of length L. Padding becomes pad_id."""
  segment_ids = row["tokens_segment_ids"].astype(np.int32)
  tokens = np.where(segment_ids > 0, row["tokens"], pad_id).astype(np.int32)
  same_piece = (segment_ids[1:] == segment_ids[:-1]) & (segment_ids[1:] > 0)
  return {
      "inputs": tokens[:-1],
      "targets": tokens[1:],
      "segment_ids": segment_ids[:-1],
      "positions": row["tokens_positions"][:-1].astype(np.int32),
      "loss_mask": same_piece.astype(np.float32),
  }


def _is_nonempty(text: str) -> bool:
  return len(text) > 0


def _tokenize(text: str, tokenizer: Tokenizer) -> dict:
  """Document text -> {"tokens": int32 ids followed by EOS}."""
  return {"tokens": np.asarray(tokenizer.encode(text) + [tokenizer.eos_id], np.int32)}


class _JsonSafeState(grain.IterDataset):
  """ConcatThenSplit whose state survives a JSON round trip (as in grain's orbax handler).

  grain 0.2.18 marks "no remainder" with the slice tuple (-1, -1); JSON turns it into a list,
  which no longer compares equal, and restoring such a state silently corrupts the stream.
  """

  def __iter__(self):
    return _JsonSafeStateIterator(self._parent.__iter__())


class _JsonSafeStateIterator(grain.DatasetIterator):

  def __next__(self):
    return next(self._parent)

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    slices = {k: tuple(v) for k, v in state["remainder_slices"].items()}
    self._parent.set_state({**state, "remainder_slices": slices})
