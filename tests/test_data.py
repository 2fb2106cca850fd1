"""Tests of jaxllm.data: tokenizer round trips, packing against a plain-python packer, seeded
shuffling and sharding, iterator checkpoints (also through orbax), and document sources."""

import json
import os
import pickle
import zlib

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxllm.data import pipeline, sources, tokenizer as tokenizer_lib

PAD, EOS = 0, 1


class FakeTokenizer:
  """Whitespace-separated integers -> ids; lets tests know every token in advance."""
  pad_id, eos_id = PAD, EOS

  def encode(self, text):
    return [int(word) for word in text.split()]


@pytest.fixture(scope="session")
def stdlib_texts():
  docs = sources.documents("stdlib", "train")
  return [docs[i] for i in range(40)]


@pytest.fixture(scope="session")
def tokenizer(stdlib_texts):
  return tokenizer_lib.train_tokenizer(stdlib_texts, vocab_size=512)


# --- tokenizer ---------------------------------------------------------------------------------

ROUND_TRIP_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "今天天气很好，我们去公园散步吧。",
    "Mixed: café, naïve, 東京 and Ελληνικά 123456789",
    "def f(x):\n\tif x:\n\t\treturn  x   *  2\n\n\n    # comment\t\t end\n",
    "   leading and trailing spaces   ",
    "\n\nstarts with newlines and ends with a tab\t",
    "emoji 😀🎉 and a ZWJ family 👨‍👩‍👧",
    " ",
    "",
]


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_tokenizer_round_trip_is_exact(tokenizer, text):
  ids = tokenizer.encode(text)
  assert tokenizer.decode(ids) == text
  assert all(0 <= i < tokenizer.vocab_size for i in ids)


def test_tokenizer_ids_and_special_tokens(tokenizer):
  assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 2, 3)
  assert tokenizer.vocab_size == 512
  special_ids = [tokenizer.token_id(t) for t in tokenizer_lib.DEFAULT_SPECIAL_TOKENS]
  assert len(set(special_ids)) == len(special_ids)
  for token, token_id in zip(tokenizer_lib.DEFAULT_SPECIAL_TOKENS, special_ids):
    assert tokenizer.encode(token) == [token_id]
    assert tokenizer.decode([token_id]) == token
  chat = "<|user|>hi<|end|>"
  assert tokenizer.encode(chat)[0] == special_ids[1]
  assert tokenizer.encode(chat)[-1] == special_ids[3]
  with pytest.raises(KeyError, match="not in the tokenizer vocabulary"):
    tokenizer.token_id("<|no such token|>")


def test_tokenizer_decode_skips_pad_and_out_of_range(tokenizer):
  ids = tokenizer.encode("hello world")
  padded = [tokenizer.pad_id] + ids + [tokenizer.pad_id, tokenizer.vocab_size, 10**6]
  assert tokenizer.decode(padded) == "hello world"
  assert tokenizer.decode(np.asarray(ids, np.int32)) == "hello world"


def test_tokenizer_save_load_pickle(tokenizer, tmp_path):
  path = str(tmp_path / "tok.model")
  tokenizer.save(path)
  for copy in (tokenizer_lib.Tokenizer.from_file(path), pickle.loads(pickle.dumps(tokenizer))):
    assert copy.sha256 == tokenizer.sha256
    assert copy.encode("今天 x = 1") == tokenizer.encode("今天 x = 1")


def test_tokenizer_training_is_deterministic():
  texts = ["the cat sat on the mat\nthe dog sat on the log\n" * 3, "numbers 12345 and more 67890"]
  a = tokenizer_lib.train_tokenizer(texts, vocab_size=300)
  b = tokenizer_lib.train_tokenizer(texts, vocab_size=300)
  c = tokenizer_lib.train_tokenizer(texts, vocab_size=290)
  assert a.model_bytes == b.model_bytes and a.sha256 == b.sha256
  assert a.sha256 != c.sha256


# --- packing -----------------------------------------------------------------------------------


def expected_rows(doc_ids, row_len):
  """Plain-python concat-then-split: each document's ids + EOS, concatenated, cut into rows of
  row_len; segments count the document pieces within a row, positions restart per piece."""
  stream = [t for ids in doc_ids if ids for t in ids + [EOS]]
  rows = []
  for start in range(0, len(stream), row_len):
    tokens = stream[start:start + row_len]
    segment_ids, positions, segment, position = [], [], 1, 0
    for t in tokens:
      segment_ids.append(segment)
      positions.append(position)
      position += 1
      if t == EOS:
        segment, position = segment + 1, 0
    pad = row_len - len(tokens)
    rows.append((tokens + [PAD] * pad, segment_ids + [0] * pad, positions + [0] * pad))
  return rows


def random_docs(rng, n, max_len=30):
  """Texts of n documents with distinct ids >= 10 (some empty), and their id lists."""
  doc_ids = [list(range(10 + 1000 * d, 10 + 1000 * d + rng.integers(0, max_len))) for d in range(n)]
  return [" ".join(map(str, ids)) for ids in doc_ids], doc_ids


def batches(ds, n=None):
  it = iter(ds)
  return list(it) if n is None else [next(it) for _ in range(n)]


def test_shift_for_next_token_by_hand():
  row = {
      "tokens": np.array([5, 6, 1, 7, 8, 9, 1, 4, 0, 0]),
      "tokens_segment_ids": np.array([1, 1, 1, 2, 2, 2, 2, 3, 0, 0]),
      "tokens_positions": np.array([0, 1, 2, 0, 1, 2, 3, 0, 0, 0]),
  }
  out = pipeline.shift_for_next_token(row, pad_id=-1)
  np.testing.assert_array_equal(out["inputs"], [5, 6, 1, 7, 8, 9, 1, 4, -1])
  np.testing.assert_array_equal(out["targets"], [6, 1, 7, 8, 9, 1, 4, -1, -1])
  np.testing.assert_array_equal(out["segment_ids"], [1, 1, 1, 2, 2, 2, 2, 3, 0])
  np.testing.assert_array_equal(out["positions"], [0, 1, 2, 0, 1, 2, 3, 0, 0])
  np.testing.assert_array_equal(out["loss_mask"], [1, 1, 0, 1, 1, 1, 0, 0, 0])
  assert {k: v.dtype for k, v in out.items()} == {
      "inputs": np.int32, "targets": np.int32, "segment_ids": np.int32, "positions": np.int32,
      "loss_mask": np.float32}


@pytest.mark.parametrize("seq_len,batch_size", [(8, 1), (7, 3), (33, 2)])
def test_packing_matches_plain_python(seq_len, batch_size):
  texts, doc_ids = random_docs(np.random.default_rng(seq_len), 25, max_len=3 * seq_len)
  ds = pipeline.pretrain_dataset(texts, FakeTokenizer(), seq_len=seq_len, batch_size=batch_size,
                                 seed=0, shuffle=False, repeat=False)
  got = batches(ds)
  rows = expected_rows(doc_ids, seq_len + 1)
  assert len(got) == len(rows) // batch_size  # only the last partial batch is dropped
  for b, batch in enumerate(got):
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        k: ((batch_size, seq_len), np.float32 if k == "loss_mask" else np.int32)
        for k in ("inputs", "targets", "segment_ids", "positions", "loss_mask")}
    for r in range(batch_size):
      tokens, segment_ids, positions = map(np.array, rows[b * batch_size + r])
      mask = (segment_ids[1:] == segment_ids[:-1]) & (segment_ids[1:] > 0)
      np.testing.assert_array_equal(batch["inputs"][r], tokens[:-1])
      np.testing.assert_array_equal(batch["targets"][r], tokens[1:])
      np.testing.assert_array_equal(batch["segment_ids"][r], segment_ids[:-1])
      np.testing.assert_array_equal(batch["positions"][r], positions[:-1])
      np.testing.assert_array_equal(batch["loss_mask"][r], mask)
    np.testing.assert_array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])


def test_packing_loses_no_tokens_at_end_of_input():
  texts, doc_ids = random_docs(np.random.default_rng(1), 30)
  got = batches(pipeline.pretrain_dataset(texts, FakeTokenizer(), seq_len=5, batch_size=1,
                                          seed=0, shuffle=False, repeat=False))
  row_tokens = [np.append(b["inputs"][0], b["targets"][0, -1]) for b in got]
  stream = [t for row in row_tokens for t in row if t != PAD]
  assert stream == [t for ids in doc_ids if ids for t in ids + [EOS]]


# --- shuffling and sharding --------------------------------------------------------------------


def one_token_docs(n):
  return [str(10 + d) for d in range(n)]


def epoch_orders(seed, n=20, epochs=3):
  """With one-token documents and rows of 2n tokens, row e holds epoch e: doc, EOS, doc, ..."""
  ds = pipeline.pretrain_dataset(one_token_docs(n), FakeTokenizer(), seq_len=2 * n - 1,
                                 batch_size=1, seed=seed, shuffle_window=1)
  return [list(np.append(b["inputs"][0], b["targets"][0, -1])[::2]) for b in batches(ds, epochs)]


def test_shuffle_is_seeded_and_differs_per_epoch():
  all_docs = list(range(10, 30))
  first, second, third = epoch_orders(seed=0)
  assert sorted(first) == sorted(second) == sorted(third) == all_docs
  assert first != all_docs
  assert first != second and second != third
  assert epoch_orders(seed=0) == [first, second, third]
  assert epoch_orders(seed=7)[0] != first


def test_rows_of_long_documents_are_shuffled_across_documents():
  """Two documents of 400 tokens each: without the row shuffle the first rows all come from one."""
  docs = [" ".join(["10"] * 400), " ".join(["11"] * 400)]
  first_rows = lambda window: [int(b["inputs"][0, 0]) for b in batches(pipeline.pretrain_dataset(
      docs, FakeTokenizer(), seq_len=7, batch_size=1, seed=0, repeat=False, shuffle_window=window), 16)]
  assert len(set(first_rows(1))) == 1
  assert set(first_rows(64)) == {10, 11}


def test_sharding_is_disjoint_and_complete():
  n = 21
  seen = []
  for process_index in range(2):
    ds = pipeline.pretrain_dataset(one_token_docs(n), FakeTokenizer(), seq_len=3, batch_size=1,
                                   seed=3, repeat=False, process_index=process_index,
                                   process_count=2)
    tokens = np.concatenate([np.append(b["inputs"][0], b["targets"][0, -1]) for b in batches(ds)])
    seen.append({int(t) for t in tokens if t not in (PAD, EOS)})
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(range(10, 10 + n))
  assert len(seen[0]) == 11


# --- iterator state ----------------------------------------------------------------------------


def assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


@pytest.mark.parametrize("k", [0, 1, 4, 9])
def test_iterator_state_restores_the_stream(tokenizer, stdlib_texts, k):
  texts = [t[:3000] for t in stdlib_texts]
  ds = pipeline.pretrain_dataset(texts, tokenizer, seq_len=64, batch_size=2, seed=0)
  it = iter(ds)
  for _ in range(k):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # as grain's orbax handler stores it
  expected = [next(it) for _ in range(5)]
  fresh = iter(ds)
  fresh.set_state(state)
  assert_same_batches([next(fresh) for _ in range(5)], expected)


def test_iterator_state_through_orbax(tmp_path):
  texts, _ = random_docs(np.random.default_rng(0), 40)
  ds = pipeline.pretrain_dataset(texts, FakeTokenizer(), seq_len=16, batch_size=2, seed=1)
  stream = batches(ds, 8)
  manager = ocp.CheckpointManager(tmp_path / "ckpt")
  it = iter(ds)
  for step in range(4):  # checkpoint `step` holds the state after `step` batches
    manager.save(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
    next(it)
  manager.close()

  manager = ocp.CheckpointManager(tmp_path / "ckpt")
  assert manager.all_steps() == [0, 1, 2, 3]
  for step in (0, 3):  # step 0: a state without a partly packed document
    restored = iter(ds)
    args = ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored))
    manager.restore(step, args=args)
    assert_same_batches([next(restored) for _ in range(4)], stream[step:step + 4])


# --- sources -----------------------------------------------------------------------------------


def test_stdlib_split_is_deterministic_and_disjoint():
  train = sources.documents("stdlib", "train")
  validation = sources.documents("stdlib", "validation")
  root, _ = sources.stdlib_files()
  train_files = [os.path.relpath(train.paths[i], root) for i in train.file_ids]
  validation_files = [os.path.relpath(validation.paths[i], root) for i in validation.file_ids]
  assert len(validation_files) > 0 and len(train_files) > 20 * len(validation_files)
  assert not set(train_files) & set(validation_files)
  assert train_files == sorted(train_files)
  assert "os.py" in train_files or "os.py" in validation_files
  for rel in validation_files:
    assert zlib.crc32(rel.encode()) % 10_000 < 200
  for rel in train_files + validation_files:
    parts = rel.split("/")
    assert not {"site-packages", "test", "tests", "idle_test"} & set(parts), rel
  again = sources.documents("stdlib", "validation")
  np.testing.assert_array_equal(again.file_ids, validation.file_ids)
  assert again.paths == validation.paths


def write(path, text):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text, encoding="utf-8")
  return str(path)


def test_glob_of_text_and_jsonl_files(tmp_path):
  write(tmp_path / "a.txt", "first document\nwith two lines")
  write(tmp_path / "sub" / "b.md", "# markdown 今天")
  lines = [f"line {i} ünïcode 今天" for i in range(200)]
  write(tmp_path / "sub" / "deeper" / "c.jsonl",
        "\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(lines)) + "\n\n")
  spec = f"{tmp_path}/*.txt, {tmp_path}/**/*.md,{tmp_path}/**/*.jsonl"
  splits = {s: sources.documents(spec, s, validation_fraction=0.3) for s in ("train", "validation")}
  texts = {s: [docs[i] for i in range(len(docs))] for s, docs in splits.items()}
  assert sorted(texts["train"] + texts["validation"]) == sorted(
      ["first document\nwith two lines", "# markdown 今天"] + lines)
  expected_validation = [t for i, t in enumerate(lines)
                         if zlib.crc32(f"c.jsonl:{i + 1}".encode()) % 10_000 < 3000]
  assert [t for t in texts["validation"] if t.startswith("line")] == expected_validation
  assert 20 < len(expected_validation) < 100
  copy = pickle.loads(pickle.dumps(splits["train"]))
  assert [copy[i] for i in range(len(copy))] == texts["train"]
  with pytest.raises(IndexError):
    splits["train"][len(splits["train"])]


@pytest.mark.parametrize("name,content,message", [
    ("empty.txt", "", "empty.txt: empty file"),
    ("empty.jsonl", "\n", "empty.jsonl: empty file"),
    ("bad.jsonl", '{"text": "ok"}\n{"text": oops}\n', "bad.jsonl:2: invalid JSON"),
    ("notext.jsonl", '{"text": "a"}\n\n{"body": "b"}\n', "notext.jsonl:3: no string 'text'"),
    ("number.jsonl", '{"text": 5}\n', "number.jsonl:1: no string 'text'"),
    ("list.jsonl", '["text"]\n', "list.jsonl:1: no string 'text'"),
    ("data.csv", "a,b\n", "data.csv: unsupported file type"),
])
def test_source_errors_name_the_file(tmp_path, name, content, message):
  write(tmp_path / name, content)
  with pytest.raises(sources.DataError, match=message):
    sources.documents(str(tmp_path / name), "train")


def test_source_errors_for_globs_and_empty_splits(tmp_path):
  with pytest.raises(sources.DataError, match="nothing/\\*.txt"):
    sources.documents(f"{tmp_path}/nothing/*.txt", "train")
  path = write(tmp_path / "one.txt", "only document")
  with pytest.raises(sources.DataError, match="no documents in split 'validation'.*data.validation_fraction"):
    sources.documents(path, "validation", validation_fraction=0.02)
  assert len(sources.documents(path, "validation", validation_fraction=0.0)) == 0  # no validation
  with pytest.raises(ValueError, match="split"):
    sources.documents(path, "test")
