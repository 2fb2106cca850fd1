"""Preference data for DPO: (prompt, chosen, rejected) pairs and the grain pipeline of their rows.

`pairs(spec, split)` returns a random-access sequence of pairs {"prompt": messages, "chosen": str,
"rejected": str}, where the prompt is a conversation ending in a user message (chat.py) and the two answers
are candidate assistant replies to it:

  spec "chatterbot[:lang,...]": built from the SFT conversations of the same spec and split
      (`sft.conversations`), so with the same validation_fraction in both stages a held-out pair comes from a
      conversation SFT never trained on. Validation also leaves out the conversations whose first user turn is
      a user turn of a training conversation (short questions recur: about 27% with the defaults), so no
      held-out prompt was trained on, in SFT or DPO. One pair per conversation: its first user turn, the real
      reply as chosen, and a rejected reply that is, for a fraction 1 - hard_fraction of the pairs, "random":
      the reply of another conversation of the split (any language of the spec), and for the rest a hard
      negative, one of these chosen uniformly among those that apply (falling back to "random" if none does):
        "nearby"      the reply of a conversation at most 16 places away in the split, in the same language
                      (the corpus lists each topic file's dialogs together, so almost always the same topic)
        "later_turn"  the reply to a later user turn of the same conversation (multi-turn dialogs)
        "shuffled"    the real reply with its words shuffled (replies of >= 3 whitespace-separated words)
        "truncated"   the real reply cut after the first half of its words (replies of >= 4 words)
      Rejected replies come from the same split only and never equal the chosen reply, nor come from a
      conversation with the same first user turn (compared casefolded, whitespace-normalised). Each pair also
      has a "negative" key naming its kind. Deterministic given (spec, split, validation_fraction, seed,
      hard_fraction).
  otherwise: comma-separated globs (`**` allowed) of .jsonl files, one pair per non-blank line with
      "prompt" (a string, the user turn, or a list of messages ending with a user message) and "chosen" and
      "rejected" (each a string, or a list of one assistant message). Split by crc32 of f"{file name}:{line}"
      as sft.py does; every line is validated when the spec is read: errors raise DataError naming the file
      and 1-based line.
The split is split.py's: validation_fraction = 0 means no validation (no validation pairs); a split that leaves
the asked side empty raises DataError saying what to change. The result's `split_info` says how it was split.

`preference_dataset(...)` renders prompt + answer with the chat template for both answers and puts each pair
in one row of a chosen batch and the same row of a rejected batch (no packing); see its docstring.

KTO (dpo.kind=kto) reads unpaired examples instead. `kto_examples(spec, split)` returns a random-access sequence of
{"prompt": messages, "completion": str, "label": bool (true = desirable), "kl_completion": str}:

  spec "chatterbot[:...]", or JSONL files of pairs (the first record has "chosen"/"rejected"): the pairs above,
      each split into two examples: the chosen answer desirable, the rejected one undesirable (all the chosen
      answers of the split in order, then all the rejected ones). The split is the pairs'.
  otherwise: JSONL files of one example per non-blank line: "prompt" (as for pairs), "completion" (a string, or a
      list of one assistant message) and "label" (true or false). Split by line as for pairs; every line is
      validated when the spec is read: errors raise DataError naming the file and 1-based line.

"kl_completion" is another example's answer to mismatch with this prompt for KTO's KL estimate: as TRL's
KTOTrainer, the completions shifted by one (example i takes the completion of example i - 1 of the split,
cyclically), skipping back over examples with the same prompt so that the pair is always mismatched (unless every
example of the split has the same prompt). It is fixed per example, so the reference's log-probs of it can be cached.
TRL rotates within chunks of one device batch and reads them in order, so its mismatched answers come from the same
batch; here the training stream is shuffled, so they come from the same split, generally from other batches (the
estimate's expectation, over prompts and answers drawn independently, is the same).
`kto_dataset(...)` puts one example per row: its own sequence and the mismatched one; see its docstring.
"""

import functools
import json
import re
from collections.abc import Sequence

import grain
import numpy as np

from jaxllm.data import chat, pipeline, sft, sources
from jaxllm.data import split as split_lib
from jaxllm.data.sources import DataError
from jaxllm.data.tokenizer import Tokenizer

HARD_NEGATIVES = ("nearby", "later_turn", "shuffled", "truncated")
NEARBY_WINDOW = 16  # "nearby" negatives come from conversations at most this many places away
SIDES = ("chosen", "rejected")
FEATURES = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


# ------------------------------------------------------------------------------------------ sources


def pairs(spec: str, split: str, *, validation_fraction: float = 0.1, seed: int = 0,
          hard_fraction: float = 0.5, bad: sources.BadRecords | None = None) -> Sequence[dict]:
  """The preference pairs of `split` ("train" or "validation") described by `spec` (see module doc).
  `seed` and `hard_fraction` only shape the chatterbot pairs; bad JSONL lines raise DataError, or with `bad`
  are skipped and counted."""
  if not 0.0 <= hard_fraction <= 1.0:
    raise ValueError(f"hard_fraction must be in [0, 1], got {hard_fraction}")
  if spec == sft.CHATTERBOT or spec.startswith(sft.CHATTERBOT + ":"):
    return chatterbot_pairs(spec, split, validation_fraction=validation_fraction, seed=seed,
                            hard_fraction=hard_fraction)
  return _jsonl_split(spec, split, _to_pair, "pairs", validation_fraction=validation_fraction, bad=bad)


def _jsonl_split(spec: str, split: str, convert, what: str, *, validation_fraction: float,
                 bad: sources.BadRecords | None) -> sources.JsonlRecords:
  """The records of `split` of the JSONL files of `spec`, each checked by `convert`, split by line."""
  split_lib.check_split(split)
  split_lib.check_fraction(validation_fraction)
  source = sources.jsonl_records(spec, convert, what=what, bad=bad)
  mask = split_lib.in_validation(split_lib.buckets(source.split_keys()), validation_fraction)
  keep = split_lib.select(mask, split)
  if not len(keep) and (split == "train" or validation_fraction > 0):
    raise DataError(f"spec {spec!r} has no {what} in split {split!r} (validation_fraction={validation_fraction}, "
                    f"{len(mask):,} {what}): {split_lib.fix(split)}")
  how = ("no validation (validation_fraction=0)" if validation_fraction == 0 else
         "by line (crc32 of 'file name:line')")
  return source.select(keep, f"{how}: {split_lib.describe(int((~mask).sum()), int(mask.sum()), what)}")


def chatterbot_pairs(spec: str, split: str, *, validation_fraction: float = 0.1, seed: int = 0,
                     hard_fraction: float = 0.5) -> list[dict]:
  """Pairs from the chatterbot conversations of `spec` and `split` (see module doc), with a `split_info`."""
  convs = sft.conversations(spec, split, validation_fraction=validation_fraction)
  info = f"as SFT, {convs.split_info}"
  if split == "validation" and not convs:  # validation_fraction = 0: no validation
    return split_lib.SplitList([], f"{info}; 0 pairs")
  if split == "validation":  # held out: no prompt that SFT or DPO training sees as a user turn
    try:
      train = sft.conversations(spec, "train", validation_fraction=validation_fraction)
      seen = {_normalise(m["content"]) for c in train for m in c if m["role"] == "user"}
    except DataError:  # validation_fraction = 1: no training conversations
      seen = set()
    held_out = len(convs)
    convs = [c for c in convs if _normalise(c[0]["content"]) not in seen]
    info += f"; {held_out - len(convs):,} whose first user turn is a training user turn left out"
  language_of = _chatterbot_language_of(spec)
  languages = [language_of[json.dumps(c, ensure_ascii=False)] for c in convs]
  prompts = [_normalise(c[0]["content"]) for c in convs]
  answers = [_normalise(c[1]["content"]) for c in convs]
  n = len(convs)
  rng = np.random.default_rng(seed)
  hard = np.zeros(n, bool)
  hard[rng.permutation(n)[:round(hard_fraction * n)]] = True

  def usable(i, text, j=None):  # may `text` (the reply of conversation j, if any) be i's rejected reply?
    return _normalise(text) != answers[i] and (j is None or (j != i and prompts[j] != prompts[i]))

  def other_reply(i, candidates):  # the first usable one from a random start in `candidates`, else None
    start = int(rng.integers(len(candidates))) if candidates else 0
    for t in range(len(candidates)):
      j = candidates[(start + t) % len(candidates)]
      if usable(i, convs[j][1]["content"], j):
        return convs[j][1]["content"]
    return None

  def negative(i, kind):
    conv, reply = convs[i], convs[i][1]["content"]
    words = reply.split()
    if kind == "nearby":
      near = [j for j in range(max(0, i - NEARBY_WINDOW), min(n, i + NEARBY_WINDOW + 1))
              if languages[j] == languages[i]]
      return other_reply(i, near)
    if kind == "later_turn":
      later = [m["content"] for m in conv[3::2] if usable(i, m["content"])]
      return later[int(rng.integers(len(later)))] if later else None
    if kind == "shuffled" and len(words) >= 3:
      for _ in range(8):
        text = " ".join(words[k] for k in rng.permutation(len(words)))
        if usable(i, text):
          return text
    if kind == "truncated" and len(words) >= 4:
      text = reply[:[m.end() for m in re.finditer(r"\S+", reply)][len(words) // 2 - 1]]
      return text if usable(i, text) else None
    return None

  out = []
  for i, conv in enumerate(convs):
    rejected, kind = None, "random"
    if hard[i]:
      for kind in rng.permutation(HARD_NEGATIVES):
        if (rejected := negative(i, str(kind))) is not None:
          break
    if rejected is None:
      rejected, kind = other_reply(i, range(n)), "random"
    if rejected is not None:  # else a tiny split where every other reply is unusable: no pair
      out.append({"prompt": conv[:1], "chosen": conv[1]["content"], "rejected": rejected,
                  "negative": str(kind)})
  if not out:
    raise DataError(f"spec {spec!r} split {split!r}: too few conversations to draw rejected replies from "
                    f"(validation_fraction={validation_fraction}): {split_lib.fix(split)}")
  return split_lib.SplitList(out, f"{info}; {len(out):,} pairs")


def _normalise(text: str) -> str:
  return " ".join(text.casefold().split())


def _chatterbot_language_of(spec: str) -> dict[str, str]:
  """{conversation JSON: language} over the spec's languages (first language wins, as in the dedup)."""
  languages = [s.strip() for s in spec.partition(":")[2].split(",") if s.strip()]
  out = {}
  for language in sorted(set(languages or sft.chatterbot_languages())):
    for conv in sft.chatterbot_conversations([language]):
      out.setdefault(json.dumps(conv, ensure_ascii=False), language)
  return out


def _to_pair(record) -> dict:
  """A JSONL record -> {"prompt": messages, "chosen": str, "rejected": str}; ValueError if invalid."""
  if not isinstance(record, dict):
    raise ValueError("not a JSON object")
  for field in ("prompt", *SIDES):
    if field not in record:
      hint = "; this is an unpaired KTO record, which dpo.kind=kto reads" if "completion" in record else ""
      raise ValueError(f"no {field!r} field (expected 'prompt', 'chosen' and 'rejected'{hint})")
  out = {"prompt": _prompt_messages(record["prompt"])}
  for field in SIDES:
    out[field] = _answer(record, field)
  if "margin" in record:  # optional: how much better chosen is (a reward model's margin loss)
    if not isinstance(record["margin"], (int, float)) or isinstance(record["margin"], bool):
      raise ValueError(f"'margin' must be a number, got {record['margin']!r}")
    out["margin"] = float(record["margin"])
  return out


def _prompt_messages(prompt) -> list[dict]:
  """A record's "prompt" (the user turn, or a list of messages ending with a user message) -> messages."""
  if isinstance(prompt, str):
    return [{"role": "user", "content": prompt}]
  if not isinstance(prompt, list):
    raise ValueError("'prompt' must be a string or a list of messages")
  try:
    chat.check_messages(prompt)
  except ValueError as e:
    raise ValueError(f"'prompt': {e}") from None
  if prompt[-1]["role"] != "user":
    raise ValueError("'prompt' must end with a user message")
  return [{"role": m["role"], "content": m["content"]} for m in prompt]


def _answer(record: dict, field: str) -> str:
  """A record's answer `field`: a string, or a list of one assistant message."""
  answer = record[field]
  if (isinstance(answer, list) and len(answer) == 1 and isinstance(answer[0], dict)
      and answer[0].get("role") == "assistant"):
    answer = answer[0].get("content")
  if not isinstance(answer, str):
    raise ValueError(f"{field!r} must be a string or a list of one assistant message")
  if not answer.strip():
    raise sources.EmptyRecord(f"empty {field!r}")
  return answer


# ------------------------------------------------------------------------------------ KTO examples


def kto_examples(spec: str, split: str, *, validation_fraction: float = 0.1, seed: int = 0,
                 hard_fraction: float = 0.5, bad: sources.BadRecords | None = None) -> "KTOExamples":
  """The unpaired examples of `split` described by `spec`, each with its "kl_completion" (see module doc).
  `seed` and `hard_fraction` only shape the chatterbot pairs; bad JSONL lines raise DataError, or with `bad` are
  skipped and counted."""
  is_chatterbot = spec == sft.CHATTERBOT or spec.startswith(sft.CHATTERBOT + ":")
  if is_chatterbot or _holds_pairs(spec):
    paired = pairs(spec, split, validation_fraction=validation_fraction, seed=seed, hard_fraction=hard_fraction,
                   bad=bad)
    source = Unpaired(paired)
    info = f"{paired.split_info}; each pair as a desirable and an undesirable example"
  else:
    source = _jsonl_split(spec, split, _to_kto, "examples", validation_fraction=validation_fraction, bad=bad)
    info = source.split_info
  keys = [json.dumps(source[i]["prompt"], ensure_ascii=False, sort_keys=True) for i in range(len(source))]
  return KTOExamples(source, kl_partners(keys), info)


def _to_kto(record) -> dict:
  """A JSONL record -> {"prompt": messages, "completion": str, "label": bool}; ValueError if invalid."""
  if not isinstance(record, dict):
    raise ValueError("not a JSON object")
  for field in ("prompt", "completion", "label"):
    if field not in record:
      raise ValueError(f"no {field!r} field (expected 'prompt', 'completion' and 'label', or a file of pairs "
                       f"with 'prompt', 'chosen' and 'rejected')")
  if not isinstance(record["label"], bool):
    raise ValueError(f"'label' must be true (desirable) or false (undesirable), got {record['label']!r}")
  return {"prompt": _prompt_messages(record["prompt"]), "completion": _answer(record, "completion"),
          "label": record["label"]}


def _holds_pairs(spec: str) -> bool:
  """Whether the JSONL files of `spec` hold pairs: the first record that parses (in the first file) has "chosen"
  or "rejected" and no "completion". Anything else is read as KTO examples, whose checks name a bad line."""
  for path in sources.match_globs(spec)[:1]:
    with open(path, "rb") as f:
      for _, line in zip(range(100), f):
        try:
          record = json.loads(line)
        except ValueError:
          continue
        if isinstance(record, dict):
          return ("chosen" in record or "rejected" in record) and "completion" not in record
  return False


def kl_partners(prompt_keys: Sequence[str]) -> np.ndarray:
  """[N] int: for example i, the nearest example before it (cyclically) whose prompt key differs, i.e. the previous
  example with runs of equal prompts skipped; the previous one when every prompt is the same."""
  n = len(prompt_keys)
  partners = (np.arange(n) - 1) % max(n, 1)
  starts = [i for i in range(n) if prompt_keys[i] != prompt_keys[i - 1]]
  if not starts:  # one prompt (or none): no mismatched pair exists
    return partners.astype(np.int64)
  first = starts[0]
  run_start = first
  for t in range(n):  # one pass from the start of a run, so every run is seen from its beginning
    i = (first + t) % n
    if prompt_keys[i] != prompt_keys[i - 1]:
      run_start = i
    partners[i] = (run_start - 1) % n
  return partners.astype(np.int64)


class Unpaired(Sequence):
  """Pairs as unpaired examples: the chosen answers of all the pairs (desirable), then the rejected ones."""

  def __init__(self, pairs: Sequence[dict]):
    self.pairs = pairs

  def __len__(self) -> int:
    return 2 * len(self.pairs)

  def __getitem__(self, i: int) -> dict:
    i = range(len(self))[i]
    n = len(self.pairs)
    pair, desirable = self.pairs[i % n], i < n
    return {"prompt": pair["prompt"], "completion": pair["chosen" if desirable else "rejected"], "label": desirable}


class KTOExamples(Sequence):
  """Examples {"prompt", "completion", "label"} of `source` with "kl_completion", the completion of example
  partners[i]; random access and picklable, as a grain source. `split_info` describes the split."""

  def __init__(self, source: Sequence[dict], partners: np.ndarray, split_info: str = ""):
    self.source, self.partners, self.split_info = source, np.asarray(partners, np.int64), split_info

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, i: int) -> dict:
    i = range(len(self))[i]
    return {**self.source[i], "kl_completion": self.source[int(self.partners[i])]["completion"]}


# ----------------------------------------------------------------------------------------- pipeline


def preference_dataset(
    pairs: Sequence[dict],
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    repeat: bool = True,
    process_index: int = 0,
    process_count: int = 1,
    overlong: str = "truncate",
    template: chat.ChatTemplate = chat.DEFAULT_TEMPLATE,
) -> grain.IterDataset:
  """Batches of pairs, one pair per row: for each side s in (chosen, rejected), numpy arrays [batch_size, seq_len]

    s_inputs, s_targets, s_segment_ids, s_positions (int32) and s_loss_mask (float32)

  Row b of both sides is pair b: chat.render(prompt + [assistant: answer]) shifted for next-token prediction as in
  sft.make_example, the loss mask 1 on the answer's tokens and its <|end|>, 0 on the prompt; then padding
  (segment 0, pad_id, position 0, mask 0); segment id 1 and positions 0, 1, ... on real tokens. The two sides
  share the prompt tokens exactly. `concat_sides` stacks them into one [2·batch_size, seq_len] batch.

  A pair is over-long when either side has more than seq_len + 1 tokens. overlong="truncate" cuts the prompt
  from the left, the same for both sides, so that the longer answer fits while the prompt keeps at least
  min(its length, (seq_len + 1) // 2) tokens; answers that still do not fit are cut on the right (losing their
  <|end|>). overlong="drop" drops the pair. `pipeline.counters(it.get_state())` (an iterator `it` of this dataset)
  counts them, in pairs: examples (pairs kept), truncated, dropped_too_long (dropped_no_loss stays 0: an answer
  always keeps a token).

  Sharding, shuffling, epochs and repeat=False behave as in `sft_dataset`: process_index reads pairs
  process_index, process_index + process_count, ...; with repeat=False the last partial batch is dropped.
  `iter(ds)` supports get_state() / set_state(), also after a JSON round trip; the counts are restored with it.
  """
  return _rows_dataset(pairs, make_pair_example, tokenizer, seq_len=seq_len, batch_size=batch_size, seed=seed,
                       shuffle=shuffle, repeat=repeat, process_index=process_index, process_count=process_count,
                       overlong=overlong, template=template)


def kto_dataset(
    examples: Sequence[dict],
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    repeat: bool = True,
    process_index: int = 0,
    process_count: int = 1,
    overlong: str = "truncate",
    template: chat.ChatTemplate = chat.DEFAULT_TEMPLATE,
) -> grain.IterDataset:
  """Batches of KTO examples (`kto_examples`), one example per row: numpy arrays [batch_size, seq_len]

    s_inputs, s_targets, s_segment_ids, s_positions (int32) and s_loss_mask (float32)

  for s = "completion" (the prompt and the example's own completion) and s = "kl" (the same prompt and its
  "kl_completion"), laid out as a preference pair's sides; and [batch_size] "label" (float32: 1 desirable,
  0 undesirable) and "example_index" (int32, the example's place in `examples`, for cached reference log-probs).

  Each sequence is fitted to seq_len + 1 tokens on its own, as a pair's are: overlong="truncate" cuts the prompt
  from the left (keeping at least half the row), then the answer on the right; overlong="drop" drops an example
  whose own sequence is too long. The "kl" sequence only enters the KL estimate and is always truncated, never
  dropped. The counts (`pipeline.counters`) are of examples and their own sequences. Sharding, shuffling, epochs,
  repeat and iterator state as in `preference_dataset`.
  """
  return _rows_dataset(examples, make_kto_example, tokenizer, seq_len=seq_len, batch_size=batch_size, seed=seed,
                       shuffle=shuffle, repeat=repeat, process_index=process_index, process_count=process_count,
                       overlong=overlong, template=template)


def _rows_dataset(records, make_example, tokenizer, *, seq_len, batch_size, seed, shuffle, repeat, process_index,
                  process_count, overlong, template) -> grain.IterDataset:
  if overlong not in sft.OVERLONG_POLICIES:
    raise ValueError(f"overlong must be one of {sft.OVERLONG_POLICIES}, got {overlong!r}")
  chat.check_tokenizer(tokenizer, template)  # fail now, not in a worker thread
  ds = pipeline.records(records, seed=seed, shuffle=shuffle, repeat=repeat, process_index=process_index,
                        process_count=process_count, with_index=True)
  ds = ds.map(_with_index)  # the record's place in `records`, for cached reference log-probs
  ds = ds.map(functools.partial(make_example, tokenizer=tokenizer, seq_len=seq_len, template=template,
                                overlong=overlong))
  # sft's counting filter: drops what make_example marked as dropped; its counts live in the iterator state.
  ds = sft.CountAndFilter(ds.to_iter_dataset())
  return ds.batch(batch_size, drop_remainder=True)


def _with_index(indexed: tuple[int, dict]) -> dict:
  return {**indexed[1], "index": indexed[0]}


def make_pair_example(pair: dict, tokenizer: Tokenizer, *, seq_len: int,
                      template: chat.ChatTemplate = chat.DEFAULT_TEMPLATE, overlong: str = "truncate") -> dict:
  """One pair -> the padded [seq_len] features of both sides (see preference_dataset), its `pair_index` (its
  place in the source, -1 if unknown) and a "status" (kept, truncated, too long) with sft.make_example's codes;
  a dropped pair has empty features."""
  prompt_ids = chat.render_prompt(pair["prompt"], tokenizer, template)  # ends with "<|assistant|>\n"
  answers = {side: chat.render_answer(pair["prompt"], pair[side], tokenizer, template) for side in SIDES}
  status, prompt_ids, answers = _fit(prompt_ids, answers, seq_len, overlong)
  if status == sft.TOO_LONG:
    return {"status": status}
  rows = _rows(prompt_ids, answers, tokenizer, seq_len)
  if rows is None:
    return {"status": sft.NO_LOSS}
  return {"status": status, "pair_index": np.int32(pair.get("index", -1)),  # the pair's place in `pairs`
          "margin": np.float32(pair.get("margin", 0.0)), **rows}


def make_kto_example(example: dict, tokenizer: Tokenizer, *, seq_len: int,
                     template: chat.ChatTemplate = chat.DEFAULT_TEMPLATE, overlong: str = "truncate") -> dict:
  """One KTO example -> the padded [seq_len] features of its "completion" and "kl" sequences (see kto_dataset), its
  "label", `example_index` (-1 if unknown) and the "status" of its own sequence; a dropped example has no features."""
  prompt_ids = chat.render_prompt(example["prompt"], tokenizer, template)
  own = {"completion": chat.render_answer(example["prompt"], example["completion"], tokenizer, template)}
  status, own_prompt, own = _fit(prompt_ids, own, seq_len, overlong)
  if status == sft.TOO_LONG:
    return {"status": status}
  kl_answer = chat.render_answer(example["prompt"], example["kl_completion"], tokenizer, template)
  _, kl_prompt, kl = _fit(prompt_ids, {"kl": kl_answer}, seq_len, "truncate")
  rows, kl_rows = _rows(own_prompt, own, tokenizer, seq_len), _rows(kl_prompt, kl, tokenizer, seq_len)
  if rows is None or kl_rows is None:
    return {"status": sft.NO_LOSS}
  return {"status": status, "example_index": np.int32(example.get("index", -1)),
          "label": np.float32(bool(example["label"])), **rows, **kl_rows}


def _fit(prompt_ids: list[int], answers: dict, seq_len: int, overlong: str):
  """(status, prompt ids, answers) with prompt + the longest answer fitted to seq_len + 1 tokens (see
  preference_dataset); status TOO_LONG (nothing else) when it does not fit and overlong="drop"."""
  budget, longest = seq_len + 1, max(len(a) for a, _ in answers.values())
  if len(prompt_ids) + longest <= budget:
    return sft.KEPT, prompt_ids, answers
  if overlong == "drop":
    return sft.TOO_LONG, None, None
  keep = max(budget - longest, min(len(prompt_ids), budget // 2))
  answers = {side: (ids[:budget - keep], mask[:budget - keep]) for side, (ids, mask) in answers.items()}
  return sft.TRUNCATED, prompt_ids[len(prompt_ids) - keep:], answers


def _rows(prompt_ids: list[int], answers: dict, tokenizer: Tokenizer, seq_len: int) -> dict | None:
  """The padded [seq_len] next-token features of prompt + each answer, prefixed by its side; None if a side has
  no loss-masked target."""
  out = {}
  for side, (answer_ids, answer_mask) in answers.items():
    ids = np.asarray(prompt_ids + answer_ids, np.int32)
    mask = np.asarray([0.0] * len(prompt_ids) + answer_mask, np.float32)
    if not mask[1:].any():
      return None
    n = len(ids) - 1
    pad = lambda x, value: np.pad(x, (0, seq_len - n), constant_values=value)
    out |= {
        f"{side}_inputs": pad(ids[:-1], tokenizer.pad_id),
        f"{side}_targets": pad(ids[1:], tokenizer.pad_id),
        f"{side}_loss_mask": pad(mask[1:], 0.0),
        f"{side}_segment_ids": pad(np.ones(n, np.int32), 0),
        f"{side}_positions": pad(np.arange(n, dtype=np.int32), 0),
    }
  return out


def concat_sides(batch: dict) -> dict:
  """A preference batch -> {inputs, targets, loss_mask, segment_ids, positions} of [2B, L]: the B chosen rows,
  then the B rejected rows, for one forward pass (split the [2B] log-probs as [:B] chosen, [B:] rejected)."""
  return {k: np.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]]) for k in FEATURES}

