"""Supervised fine-tuning data: conversation sources and the grain pipeline of packed, masked rows.

`conversations(spec, split)` returns a random-access sequence of conversations (lists of
{"role", "content"} messages, see chat.py):

  spec "chatterbot[:lang,lang,...]": the dialogs of the `chatterbot-corpus` package (no download),
      all its languages (english, chinese, traditionalchinese, japanese, ...) unless some are named.
      Each YAML `conversations` entry alternates user, assistant, user, ...; a trailing user
      utterance is dropped, entries with fewer than two utterances are skipped, and exact duplicates
      are kept once (english/tech_support.yml is 1,050 entries of ten distinct dialogs).
      Split by crc32 of the conversation's content, so copies never straddle the split.
  otherwise: comma-separated globs (`**` allowed) of .jsonl files, one conversation per non-blank
      line: {"prompt": str, "response": str} or {"messages": [{"role": ..., "content": ...}, ...]}
      with roles system/user/assistant and at least one assistant message. Split by crc32 of
      f"{file name}:{line}", as sources.py does. Every line is validated when the spec is read: errors
      raise DataError naming the file and 1-based line.
The split is split.py's: validation_fraction = 0 means no validation (an empty validation split); a split
that leaves the asked side empty raises DataError saying what to change. The result's `split_info` says how
it was split.

`sft_dataset(...)` tokenizes each conversation with the chat template, shifts it for next-token
prediction per example, and packs whole examples into rows (never splitting one) in the batch
format of the pretraining pipeline (see pipeline.py). Its counts of truncated and dropped examples are
part of its iterator state: `pipeline.counters(iterator.get_state())`.
"""

import dataclasses
import functools
import json
import os
from collections.abc import Sequence

import chatterbot_corpus.corpus
import grain
import numpy as np
import yaml

from jaxllm.data import chat, pipeline
from jaxllm.data import sources
from jaxllm.data import split as split_lib
from jaxllm.data.sources import DataError
from jaxllm.data.tokenizer import Tokenizer

CHATTERBOT = "chatterbot"
OVERLONG_POLICIES = ("truncate", "drop")


# ------------------------------------------------------------------------------------------ sources


def conversations(spec: str, split: str, *, validation_fraction: float = 0.1,
                  bad: sources.BadRecords | None = None) -> Sequence[list[dict]]:
  """The conversations of `split` ("train" or "validation") described by `spec` (see module doc), with the
  `split_info` of the split; bad JSONL lines raise DataError, or with `bad` are skipped and counted."""
  split_lib.check_split(split)
  split_lib.check_fraction(validation_fraction)
  if spec == CHATTERBOT or spec.startswith(CHATTERBOT + ":"):
    languages = [s.strip() for s in spec.partition(":")[2].split(",") if s.strip()]
    convs = chatterbot_conversations(languages or None)
    keys = [json.dumps(c, ensure_ascii=False) for c in convs]
    source, how = convs, "by conversation (crc32 of its content)"
  else:
    source = sources.jsonl_records(spec, _to_messages, what="conversations", bad=bad)
    keys, how = source.split_keys(), "by line (crc32 of 'file name:line')"
  mask = split_lib.in_validation(split_lib.buckets(keys), validation_fraction)
  keep = split_lib.select(mask, split)
  if not len(keep) and (split == "train" or validation_fraction > 0):
    raise DataError(f"spec {spec!r} has no conversations in split {split!r} (validation_fraction="
                    f"{validation_fraction}, {len(keys):,} conversations): {split_lib.fix(split)}")
  if validation_fraction == 0:
    how = "no validation (validation_fraction=0)"
  info = f"{how}: {split_lib.describe(int((~mask).sum()), int(mask.sum()), 'conversations')}"
  if isinstance(source, sources.JsonlRecords):
    return source.select(keep, info)
  return split_lib.SplitList((source[i] for i in keep), info)


def chatterbot_languages() -> list[str]:
  """The languages (directories) of the installed chatterbot-corpus, sorted."""
  return sorted(os.listdir(_chatterbot_dir()))


def chatterbot_conversations(languages: Sequence[str] | None = None) -> list[list[dict]]:
  """All chatterbot-corpus conversations of `languages` (default all), in language/file order."""
  available = chatterbot_languages()
  for language in languages or ():
    if language not in available:
      raise DataError(f"chatterbot-corpus has no language {language!r} (it has {', '.join(available)})")
  out, seen = [], set()
  for language in sorted(set(languages or available)):
    for utterances in _chatterbot_language(language):
      messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": u}
                  for i, u in enumerate(utterances)]
      key = json.dumps(messages, ensure_ascii=False)
      if key not in seen:
        seen.add(key)
        out.append(messages)
  return out


def _chatterbot_dir() -> str:
  return chatterbot_corpus.corpus.DATA_DIRECTORY


@functools.lru_cache(maxsize=None)
def _chatterbot_language(language: str) -> tuple[tuple[str, ...], ...]:
  """The usable utterance lists of one language: even-length, >= 2 strings (a file parses once)."""
  loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
  root = os.path.join(_chatterbot_dir(), language)
  paths = sorted(os.path.join(d, f) for d, _, files in os.walk(root) for f in files
                 if f.endswith((".yml", ".yaml")))
  out = []
  for path in paths:
    with open(path, encoding="utf-8") as f:
      data = yaml.load(f, Loader=loader)
    for entry in (data or {}).get("conversations") or ():
      # A few entries are plain strings (a YAML indentation slip upstream): skipped.
      if isinstance(entry, list) and len(entry) >= 2 and all(isinstance(u, str) for u in entry):
        out.append(tuple(entry[:len(entry) // 2 * 2]))
  return tuple(out)


def _to_messages(record) -> list[dict]:
  """A JSONL record ({"prompt", "response"} or {"messages"}) -> messages; ValueError if invalid."""
  if not isinstance(record, dict):
    raise ValueError("not a JSON object")
  if "messages" in record:
    messages = record["messages"]
    chat.check_messages(messages)
    if not any(m["role"] == "assistant" for m in messages):
      raise ValueError("no assistant message (nothing to learn)")
    if not any(m["content"].strip() for m in messages if m["role"] == "assistant"):
      raise sources.EmptyRecord("every assistant message is empty")
    return [{"role": m["role"], "content": m["content"]} for m in messages]
  if "prompt" in record or "response" in record:
    for field in ("prompt", "response"):
      if not isinstance(record.get(field), str):
        raise ValueError(f"no string {field!r} field")
    if not record["response"].strip():
      raise sources.EmptyRecord("empty 'response'")
    return chat.from_pair(record["prompt"], record["response"])
  raise ValueError("expected a 'messages' list or 'prompt' and 'response' strings")


# ----------------------------------------------------------------------------------------- pipeline


@dataclasses.dataclass
class SFTStats:
  """Counts of the examples a CountAndFilter has read: the "stats" of its iterator state, which
  `pipeline.counters` sums over a dataset's state (its fields are pipeline.COUNTERS)."""
  examples: int = 0          # examples kept (truncated ones included)
  truncated: int = 0         # longer than seq_len + 1 tokens, cut to the first seq_len + 1
  dropped_too_long: int = 0  # longer than seq_len + 1 tokens, dropped (overlong="drop")
  dropped_no_loss: int = 0   # loss mask all zero (after any truncation), or a single token: dropped

  @property
  def dropped(self) -> int:
    return self.dropped_too_long + self.dropped_no_loss


assert tuple(f.name for f in dataclasses.fields(SFTStats)) == pipeline.COUNTERS

# The "status" of an example (make_example, preference.make_pair_example).
KEPT, TRUNCATED, TOO_LONG, NO_LOSS = range(4)
_COUNTED_AS = {TRUNCATED: "truncated", TOO_LONG: "dropped_too_long", NO_LOSS: "dropped_no_loss"}
_FEATURES = ("inputs", "targets", "loss_mask")


def sft_dataset(
    convs: Sequence[list[dict]],
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    prompt_loss_weight: float = 0.0,
    shuffle: bool = True,
    repeat: bool = True,
    process_index: int = 0,
    process_count: int = 1,
    overlong: str = "truncate",
    template: chat.ChatTemplate = chat.DEFAULT_TEMPLATE,
    packing_bins: int = 16,
) -> grain.IterDataset:
  """Batches of packed, masked rows from `convs` in the pretraining batch format:

    inputs, targets, segment_ids, positions (int32) and loss_mask (float32), each [batch_size, seq_len].

  A conversation of n + 1 tokens (chat.render) is one example of n (input, target) pairs; its
  loss_mask is the render mask of each target token. Whole examples are packed first-fit into
  `packing_bins` rows at a time (segment ids 1, 2, ... per example, positions from 0 in each, the
  rest of the row padding: segment 0, pad_id, mask 0); rows are shuffled within those bins.
  Examples longer than seq_len + 1 tokens are cut to their first seq_len + 1 (overlong="truncate")
  or dropped ("drop"); examples with nothing to learn are dropped. `pipeline.counters(it.get_state())`
  counts them (an iterator `it` of this dataset): the examples of the packing windows already emitted.

  Sharding, shuffling, epochs and repeat=False behave as in `pretrain_dataset`: process_index reads
  conversations process_index, process_index + process_count, ...; with repeat=False the last
  partial batch is dropped. `iter(ds)` supports get_state() / set_state(), also after a JSON round trip.
  """
  if overlong not in OVERLONG_POLICIES:
    raise ValueError(f"overlong must be one of {OVERLONG_POLICIES}, got {overlong!r}")
  if not 0.0 <= prompt_loss_weight <= 1.0:
    raise ValueError(f"prompt_loss_weight must be in [0, 1], got {prompt_loss_weight}")
  chat.check_tokenizer(tokenizer, template)  # fail now, not in a worker thread
  ds = pipeline.records(convs, seed=seed, shuffle=shuffle, repeat=repeat, process_index=process_index,
                        process_count=process_count)
  ds = ds.map(functools.partial(
      make_example, tokenizer=tokenizer, template=template, seq_len=seq_len,
      prompt_loss_weight=prompt_loss_weight, overlong=overlong))
  ds = CountAndFilter(ds.to_iter_dataset())
  ds = grain.experimental.FirstFitPackIterDataset(
      ds, length_struct={k: seq_len for k in _FEATURES}, num_packing_bins=packing_bins,
      seed=seed, shuffle_bins=shuffle, padding_struct={"inputs": tokenizer.pad_id,
                                                       "targets": tokenizer.pad_id, "loss_mask": 0})
  ds = ds.map(_to_batch_format)
  return ds.batch(batch_size, drop_remainder=True)


def make_example(messages: list[dict], tokenizer: Tokenizer, *, seq_len: int,
                 template: chat.ChatTemplate = chat.DEFAULT_TEMPLATE, prompt_loss_weight: float = 0.0,
                 overlong: str = "truncate") -> dict:
  """One conversation -> {"inputs", "targets", "loss_mask"} of length <= seq_len and a "status"
  (kept, truncated, too long, no loss); a dropped example has empty features."""
  ids, mask = chat.render(messages, tokenizer, template, prompt_loss_weight=prompt_loss_weight)
  status = KEPT
  if len(ids) > seq_len + 1:
    if overlong == "drop":
      ids, mask, status = [], [], TOO_LONG
    else:
      ids, mask, status = ids[:seq_len + 1], mask[:seq_len + 1], TRUNCATED
  if status != TOO_LONG and not any(mask[1:]):
    ids, mask, status = [], [], NO_LOSS
  ids = np.asarray(ids, np.int32)
  return {"inputs": ids[:-1], "targets": ids[1:], "loss_mask": np.asarray(mask[1:], np.float32),
          "status": status}


def _to_batch_format(row: dict) -> dict:
  """A packed row (grain's per-feature segment ids and positions) -> the pipeline's batch fields."""
  return {
      "inputs": row["inputs"].astype(np.int32),
      "targets": row["targets"].astype(np.int32),
      "segment_ids": row["inputs_segment_ids"].astype(np.int32),
      "positions": row["inputs_positions"].astype(np.int32),
      "loss_mask": row["loss_mask"].astype(np.float32),
  }


class CountAndFilter(grain.IterDataset):
  """Drops the examples marked as dropped (a "status" other than KEPT or TRUNCATED) and removes the status
  of the others, counting every status. The counts are part of the iterator state, {"parent": ...,
  "stats": SFTStats fields}, so they are checkpointed and restored with it and `pipeline.counters` reads
  them from it.

  The iterator reads one kept example ahead of the one it returns, so that its state already counts the
  dropped examples that follow (at the end of a pass: all of them); the state is that of the position just
  before the example read ahead, so restoring it reads that example again."""

  def __iter__(self):
    return _CountAndFilterIterator(self._parent.__iter__())


class _CountAndFilterIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator):
    super().__init__(parent)
    self._counts = dict.fromkeys(pipeline.COUNTERS, 0)
    self._ahead = None  # (state before it, example): the next kept example, read ahead
    self._exhausted = False

  def _state(self) -> dict:
    return {"parent": self._parent.get_state(), "stats": dict(self._counts)}

  def _read(self):
    """Reads up to the next kept example, counting it and the dropped ones before it: (the state just before
    it, the example), or None at the end of the parent."""
    while not self._exhausted:
      before = self._state()
      try:
        example = next(self._parent)
      except StopIteration:
        self._exhausted = True
        break
      status = int(example.pop("status"))
      if status != KEPT:
        self._counts[_COUNTED_AS[status]] += 1
      if status in (KEPT, TRUNCATED):
        self._counts["examples"] += 1
        return before, example
    return None

  def __next__(self):
    if self._ahead is None:  # the first call, or after set_state
      self._ahead = self._read()
    if self._ahead is None:
      raise StopIteration
    example = self._ahead[1]
    self._ahead = self._read()
    return example

  def get_state(self):
    return dict(self._ahead[0]) if self._ahead is not None else self._state()

  def set_state(self, state):
    self._parent.set_state(state["parent"])
    self._counts = {k: int(state["stats"][k]) for k in pipeline.COUNTERS}
    self._ahead, self._exhausted = None, False
