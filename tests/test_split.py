"""Tests of the train/validation split (jaxllm.data.split and its use by the sources): the bucket against crc32
by hand, no validation at validation_fraction = 0, the paragraph fallback of small text corpora and its
split_info, the unchanged split of a corpus of many files; the counters in an SFT iterator's state; the
tokenizer's error for a vocabulary too small for the corpus's characters."""

import json
import os
import re
import zlib

import grain
import pytest

from jaxllm.data import chat, pipeline, preference, sft, sources, split, tokenizer as tokenizer_lib


def write(path, text):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text, encoding="utf-8")
  return str(path)


def texts(docs):
  return [docs[i] for i in range(len(docs))]


def paragraphs(n, name):
  return "".join(f"{name} paragraph {i} first line\nand its second line\n\n" for i in range(n))


# --- the split function ----------------------------------------------------------------------------


def test_bucket_and_indices_match_crc32_by_hand():
  keys = [f"doc{i}.txt:{i % 7}" for i in range(500)] + ["Lib/os.py", "今天.jsonl:3", ""]
  by_hand = [zlib.crc32(k.encode("utf-8")) % 10_000 for k in keys]
  assert [split.bucket(k) for k in keys] == by_hand
  for fraction in (0.0, 0.02, 0.1, 0.5, 1.0):
    validation = [i for i, b in enumerate(by_hand) if b < fraction * 10_000]
    train = [i for i, b in enumerate(by_hand) if not b < fraction * 10_000]
    assert split.indices(keys, "validation", fraction).tolist() == validation
    assert split.indices(keys, "train", fraction).tolist() == train
  with pytest.raises(ValueError, match="split"):
    split.indices(keys, "test", 0.1)


def test_zero_fraction_means_no_validation(tmp_path):
  spec = write(tmp_path / "one.txt", "a single document")
  assert len(sources.documents(spec, "validation", validation_fraction=0.0)) == 0
  train = sources.documents(spec, "train", validation_fraction=0.0)
  assert texts(train) == ["a single document"]
  assert train.split_info.startswith("no validation (validation_fraction=0)")
  lines = [json.dumps({"prompt": f"q{i}", "chosen": f"c{i}", "rejected": f"r{i}", "response": f"a{i}"})
           for i in range(20)]
  spec = write(tmp_path / "records.jsonl", "\n".join(lines) + "\n")
  for read, what in ((sft.conversations, "conversations"), (preference.pairs, "pairs")):
    validation = read(spec, "validation", validation_fraction=0.0)
    assert len(validation) == 0 and "no validation" in validation.split_info
    assert len(read(spec, "train", validation_fraction=0.0)) == 20
  assert len(preference.pairs("chatterbot:english", "validation", validation_fraction=0.0)) == 0
  assert len(sft.conversations("chatterbot:english", "train", validation_fraction=0.0)) == len(
      sft.chatterbot_conversations(["english"]))


@pytest.mark.parametrize("files", [1, 5])
def test_a_few_text_files_are_split_by_paragraph(tmp_path, files):
  for f in range(files):
    write(tmp_path / f"book{f}.txt", "\n\n" * (f == 0) + paragraphs(300 // files, f"book{f}"))
  spec = str(tmp_path / "*.txt")
  keys = [f"book{f}.txt:0" for f in range(files)]
  assert not split.indices(keys, "validation", 0.02).size  # by file, validation would be empty
  got = {s: sources.documents(spec, s, validation_fraction=0.02) for s in split.SPLITS}
  assert got["train"].split_info == got["validation"].split_info
  info = got["train"].split_info
  assert info.startswith(f"by paragraph (too few files for validation_fraction=0.02: {files} train, 0 validation)")
  assert len(got["train"]) > 0 and len(got["validation"]) > 0
  assert f"{len(got['validation'])} documents" in info and f"{len(got['train'])} documents" in info
  # paragraph i of a file starts on line 3 i + 1 (+ 2 in book0, which opens with blank lines)
  for s, docs in got.items():
    for text in texts(docs):
      [(name, i)] = re.findall(r"(book\d+) paragraph (\d+) first line", text)
      line = 3 * int(i) + 1 + 2 * (name == "book0")
      assert (zlib.crc32(f"{name}.txt:{line}".encode()) % 10_000 < 200) == (s == "validation"), (name, line)
  # the pieces of each file concatenate back to it
  pieces = sorted((int(d.file_ids[i]), int(d.offsets[i]), d[i]) for d in got.values() for i in range(len(d)))
  for f in range(files):
    assert "".join(t for fid, _, t in pieces if got["train"].paths[fid].endswith(f"book{f}.txt")) == open(
        tmp_path / f"book{f}.txt").read()


def test_a_corpus_too_small_even_by_paragraph_says_what_to_do(tmp_path):
  spec = write(tmp_path / "tiny.txt", "one paragraph only\n")
  train = sources.documents(spec, "train", validation_fraction=0.02)  # train alone still reads
  assert texts(train) == ["one paragraph only\n"] and "leaves validation empty" in train.split_info
  with pytest.raises(sources.DataError, match=r"no documents in split 'validation'.*raise data\.validation_fraction"
                                              r", or set it to 0 for no validation"):
    sources.documents(spec, "validation", validation_fraction=0.02)
  with pytest.raises(sources.DataError, match=r"no documents in split 'train'.*lower data\.validation_fraction"):
    sources.documents(spec, "train", validation_fraction=1.0)
  spec = write(tmp_path / "one.jsonl", json.dumps({"prompt": "a", "response": "b"}) + "\n")
  with pytest.raises(sources.DataError, match=r"no conversations in split 'validation'.*data\.validation_fraction"):
    sft.conversations(spec, "validation", validation_fraction=0.02)


def test_many_files_keep_their_split_by_file(tmp_path):
  for i in range(300):
    write(tmp_path / f"doc{i:03d}.txt", f"document {i}\n\nwith a second paragraph\n")
  by_hand = {s: [f"doc{i:03d}.txt" for i in range(300)
                 if (zlib.crc32(f"doc{i:03d}.txt:0".encode()) % 10_000 < 500) == (s == "validation")]
             for s in split.SPLITS}
  assert 5 < len(by_hand["validation"]) < 30
  for s in split.SPLITS:
    docs = sources.documents(str(tmp_path / "*.txt"), s, validation_fraction=0.05)
    assert [os.path.basename(docs.paths[f]) for f in docs.file_ids] == by_hand[s]
    assert (docs.offsets == sources.WHOLE_FILE).all()
    assert docs.split_info == (f"by file: {len(by_hand['train'])} files train, "
                               f"{len(by_hand['validation'])} files validation")


# --- counters --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
  texts = [f"question {i} about the cat and the dog, answer {i} about the moon." for i in range(50)]
  return tokenizer_lib.train_tokenizer(texts, vocab_size=300)


def test_counters_of_an_sft_dataset(tokenizer):
  convs = [chat.from_pair(f"question {i}", "an answer about the moon " * (i % 5) + "yes") for i in range(24)]
  convs += [[{"role": "user", "content": "anyone?"}]]  # nothing to learn: dropped
  seq_len = 32
  lengths = [len(chat.render(c, tokenizer)[0]) for c in convs]
  truncated = sum(n > seq_len + 1 for n in lengths[:-1])
  assert 0 < truncated < 24
  make = lambda: sft.sft_dataset(convs, tokenizer, seq_len=seq_len, batch_size=2, seed=0, repeat=False,
                                 packing_bins=4)
  it = iter(make())
  assert pipeline.counters(it.get_state()) == dict.fromkeys(pipeline.COUNTERS + ("dropped",), 0)
  next(it)
  state = json.loads(json.dumps(it.get_state()))
  rest = list(it)
  want = {"examples": 24, "truncated": truncated, "dropped_too_long": 0, "dropped_no_loss": 1, "dropped": 1}
  assert pipeline.counters(it.get_state()) == want
  fresh = iter(make())
  fresh.set_state(state)
  assert pipeline.counters(fresh.get_state()) == pipeline.counters(state)
  assert len(list(fresh)) == len(rest)
  assert pipeline.counters(fresh.get_state()) == want
  # shards zipped as the loaders do: the counts add up
  shard = lambda p: sft.sft_dataset(convs, tokenizer, seq_len=seq_len, batch_size=1, seed=0, repeat=False,
                                    process_index=p, process_count=2, packing_bins=2)
  zipped, alone = iter(grain.experimental.ZipIterDataset([shard(0), shard(1)])), [iter(shard(p)) for p in range(2)]
  for _ in range(3):
    next(zipped), next(alone[0]), next(alone[1])
  counts = [pipeline.counters(it.get_state()) for it in alone]
  assert counts[0]["examples"] > 0 and counts[1]["examples"] > 0
  assert pipeline.counters(zipped.get_state()) == {k: counts[0][k] + counts[1][k] for k in counts[0]}
  pretrain = iter(pipeline.pretrain_dataset(["a b c"] * 8, tokenizer, seq_len=8, batch_size=1, seed=0, shuffle=False))
  next(pretrain)
  assert set(pipeline.counters(pretrain.get_state()).values()) == {0}


# --- tokenizer -------------------------------------------------------------------------------------


def test_a_vocabulary_too_small_for_chinese_is_one_line_error():
  text = [chat.render_text(c) for c in sft.chatterbot_conversations(["chinese"])]
  with pytest.raises(sources.DataError) as e:
    tokenizer_lib.train_tokenizer(text, vocab_size=300)
  message = str(e.value)
  assert "\n" not in message and "data.tokenizer.vocab_size=300" in message
  needed = int(message.split("vocab_size >= ")[1].split()[0])
  assert needed > 1000
  with pytest.raises(sources.DataError, match=r"data.tokenizer.character_coverage must be in \[0.98, 1\]"):
    tokenizer_lib.train_tokenizer(text, vocab_size=300, character_coverage=0.5)
  with pytest.raises(sources.DataError, match="data.tokenizer.character_coverage"):
    tokenizer_lib.train_tokenizer(text, vocab_size=300, character_coverage=1.5)
