"""Bad input data, for each stage's reader: a fixture file with one line of every kind of fault among good ones.
Strict (data.on_bad_record=error) stops at the first with its file and line; lenient (skip) skips exactly the
bad lines, counts them per category, keeps every good record, and fails above data.max_bad_fraction. The rows
built from a lenient source are exact: no empty row, none longer than seq_len, masks as the good records'."""

import json

import pytest

from jaxllm import tasks
from jaxllm.data import chat, pipeline, preference, sft, sources, tokenizer as tokenizer_lib
from tests.conftest import tiny_config
from tests.test_sft_data import expected_example, unpack

GOOD_SFT = [{"prompt": f"question {i}?", "response": f"answer number {i}."} for i in range(40)]
GOOD_PAIRS = [{"prompt": f"question {i}?", "chosen": f"good {i}.", "rejected": f"bad {i}."} for i in range(40)]
GOOD_DOCS = [{"text": f"document {i} says hello to the world."} for i in range(40)]
OVERLONG_SFT = {"prompt": "tell me everything.", "response": "word " * 400}

# (category, raw line bytes) per stage: at the 1-based lines BAD_AT of the file
BAD_AT = (3, 9, 17, 25)
BAD = {
    "pretrain": [("malformed_json", b'{"text": "unterminated'), ("invalid_utf8", b'{"text": "caf\xe9 \xff"}'),
                 ("missing_field", b'{"body": "no text field"}'), ("empty", b'{"text": "   "}')],
    "sft": [("malformed_json", b'{"prompt": "a", "response": }'), ("invalid_utf8", b'{"prompt": "\xc3\x28", "response": "b"}'),
            ("missing_field", b'{"prompt": "no response"}'), ("empty", b'{"prompt": "a", "response": ""}')],
    "dpo": [("malformed_json", b'[1, 2'), ("invalid_utf8", b'\xff\xfe{"prompt": "a"}'),
            ("missing_field", b'{"prompt": "a", "chosen": "b"}'), ("empty", b'{"prompt": "a", "chosen": "", "rejected": "c"}')],
}
GOOD = {"pretrain": GOOD_DOCS, "sft": GOOD_SFT + [OVERLONG_SFT], "dpo": GOOD_PAIRS}


def _write(path, stage, kinds=None):
  """The stage's good records with the bad lines of `kinds` (default all) at BAD_AT; returns their lines."""
  good = [json.dumps(r).encode() for r in GOOD[stage]]
  lines, where = list(good), {}
  for at, (category, raw) in zip(BAD_AT, BAD[stage]):
    if kinds is None or category in kinds:
      lines.insert(at - 1, raw)
  for i, line in enumerate(lines, 1):
    for category, raw in BAD[stage]:
      if line == raw:
        where[category] = i
  path.write_bytes(b"\n".join(lines) + b"\n")
  return where


def _read(stage, path, bad=None):
  both = []
  for split in ("train", "validation"):
    if stage == "pretrain":
      both.append(sources.documents(str(path), split, validation_fraction=0.2, bad=bad))
    elif stage == "sft":
      both.append(sft.conversations(str(path), split, validation_fraction=0.2, bad=bad))
    else:
      both.append(preference.pairs(str(path), split, validation_fraction=0.2, bad=bad))
  return both


MESSAGES = {"malformed_json": "invalid JSON", "invalid_utf8": "not valid UTF-8", "empty": "empty",
            "missing_field": "field"}


@pytest.mark.parametrize("stage", ["pretrain", "sft", "dpo"])
@pytest.mark.parametrize("category", list(MESSAGES))
def test_strict_stops_at_the_file_and_line(tmp_path, stage, category):
  path = tmp_path / "data.jsonl"
  line = _write(path, stage, kinds={category})[category]
  with pytest.raises(sources.DataError, match=f"data.jsonl:{line}: .*{MESSAGES[category]}"):
    _read(stage, path)


@pytest.mark.parametrize("stage", ["pretrain", "sft", "dpo"])
def test_lenient_skips_and_counts_each_category(tmp_path, stage):
  path = tmp_path / "data.jsonl"
  where = _write(path, stage)
  bad = sources.BadRecords()
  train, val = _read(stage, path, bad)
  assert bad.counts() == dict.fromkeys(sources.BAD_CATEGORIES, 1)
  assert {line for (_, line) in bad.bad} == set(where.values())
  assert sum(bad.lines.values()) == len(GOOD[stage]) + 4
  # every good record is kept, in one split or the other, and nothing else
  got = [train[i] for i in range(len(train))] + [val[i] for i in range(len(val))]
  if stage == "pretrain":
    want = [r["text"] for r in GOOD[stage]]
  elif stage == "sft":
    want = [chat.from_pair(r["prompt"], r["response"]) for r in GOOD[stage]]
  else:
    want = [{"prompt": [{"role": "user", "content": r["prompt"]}], "chosen": r["chosen"], "rejected": r["rejected"]}
            for r in GOOD[stage]]
  key = lambda x: json.dumps(x, sort_keys=True)
  assert sorted(map(key, got)) == sorted(map(key, want))
  bad.check(4 / (len(GOOD[stage]) + 4))  # at the limit: fine
  with pytest.raises(sources.DataError, match="(?s)data.max_bad_fraction=0.05.*data.jsonl:3"):
    bad.check(0.05)


def test_lenient_text_files(tmp_path):
  (tmp_path / "ok.txt").write_text("a fine document.\n")
  (tmp_path / "blank.txt").write_text("  \n")
  (tmp_path / "latin1.txt").write_bytes(b"caf\xe9\n")
  with pytest.raises(sources.DataError, match="latin1.txt: not valid utf-8"):
    sources.documents(str(tmp_path / "*.txt"), "train", validation_fraction=0.01)
  bad = sources.BadRecords()
  docs = sources.documents(str(tmp_path / "*.txt"), "train", validation_fraction=0.01, bad=bad)
  assert [docs[i] for i in range(len(docs))] == ["a fine document.\n"]
  assert bad.counts() == {"invalid_utf8": 1, "malformed_json": 0, "missing_field": 0, "empty": 1}


def test_rows_from_a_lenient_source_are_exact(tmp_path):
  """SFT rows built from the lenient fixture: no all-padding row, every row seq_len long, and the packed
  examples are exactly the good records' (the over-long one truncated to seq_len + 1 tokens)."""
  path = tmp_path / "data.jsonl"
  _write(path, "sft")
  train, val = _read("sft", path, sources.BadRecords())
  convs = [train[i] for i in range(len(train))] + [val[i] for i in range(len(val))]
  tok = tokenizer_lib.train_tokenizer([m["content"] for c in convs for m in c], vocab_size=300)
  seq_len = 48
  it = iter(sft.sft_dataset(convs, tok, seq_len=seq_len, batch_size=1, seed=0, shuffle=False, repeat=False))
  batches = list(it)
  counts = pipeline.counters(it.get_state())
  got = unpack(batches, seq_len)  # checks the layout: no all-padding row, segments contiguous, padding masked
  assert sorted(got) == sorted(expected_example(tok, c, seq_len) for c in convs)
  assert counts["truncated"] == 1 and counts["dropped"] == 0
  assert all(b["loss_mask"].sum(axis=1).min() > 0 for b in batches)


def test_loaders_follow_the_config(tmp_path):
  path = tmp_path / "data.jsonl"
  _write(path, "pretrain")
  c = tiny_config(tmp_path, **{"data.sources": str(path), "data.validation_fraction": 0.2})
  with pytest.raises(sources.DataError, match="data.jsonl:3: invalid JSON"):
    tasks.make(c).sources()
  c.data.on_bad_record, c.data.max_bad_fraction = "skip", 0.1
  train, _, bad = tasks.make(c).sources()
  assert len(bad.bad) == 4 and len(train) > 0
  c.data.max_bad_fraction = 0.01
  with pytest.raises(sources.DataError, match="4 of 44 records are bad"):
    tasks.make(c).sources()


def test_a_lenient_run_logs_the_counts(tmp_path):
  from jaxllm import metrics as metrics_lib, train
  path = tmp_path / "data.jsonl"
  _write(path, "pretrain")
  c = tiny_config(tmp_path, **{"data.sources": str(path), "data.validation_fraction": 0.2, "train.steps": 2,
                               "train.eval_batches": 0, "train.num_samples": 0, "data.on_bad_record": "skip",
                               "data.max_bad_fraction": 0.1})
  train.run(c, str(tmp_path / "run"))
  rows = [r for r in metrics_lib.read_metrics(str(tmp_path / "run")) if "loss" in r]
  assert len(rows) == 2
  assert all(r[f"data/bad_{k}"] == 1 for r in rows for k in sources.BAD_CATEGORIES)
