"""Tests of the SFT data: chat-template masks against hand-built expectations, packing against the
unpacked examples, overlong policies and their counts, conversation sources (chatterbot, JSONL) and
iterator checkpoints."""

import json
import zlib

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxllm.data import chat, pipeline, sft, sources, tokenizer as tokenizer_lib

SYSTEM, USER, ASSISTANT, END = tokenizer_lib.DEFAULT_SPECIAL_TOKENS
MULTI_TURN = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hello, how are you?"},
    {"role": "assistant", "content": "I am fine."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "It is 4, of course."},
]
CHINESE = [
    {"role": "system", "content": "你是一个乐于助人的助手。"},
    {"role": "user", "content": "今天天气怎么样？"},
    {"role": "assistant", "content": "今天天气很好，我们去公园散步吧。"},
]


@pytest.fixture(scope="module")
def english():
  return sft.chatterbot_conversations(["english"])


@pytest.fixture(scope="module")
def tokenizer(english):
  texts = [m["content"] for c in english for m in c]
  return tokenizer_lib.train_tokenizer(texts, vocab_size=400)


def expected_pieces(tokenizer, messages):
  """[(ids, is_answer)] per piece of the documented template, each piece encoded on its own."""
  enc = tokenizer.encode
  marker = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
  pieces = []
  for m in messages:
    answer = m["role"] == "assistant"
    pieces += [([tokenizer.token_id(marker[m["role"]])], False), (enc("\n"), False),
               (enc(m["content"]), answer), ([tokenizer.token_id(END)], answer), (enc("\n"), False)]
  return pieces


def expected_render(tokenizer, messages, weight=0.0):
  pieces = expected_pieces(tokenizer, messages)
  ids = [t for piece, _ in pieces for t in piece]
  mask = [1.0 if answer else weight for piece, answer in pieces for _ in piece]
  return ids, mask


# --- chat template -----------------------------------------------------------------------------


def test_multi_turn_mask_token_by_token(tokenizer):
  ids, mask = chat.render(MULTI_TURN, tokenizer)
  expected_ids, expected_mask = expected_render(tokenizer, MULTI_TURN)
  assert ids == expected_ids
  assert mask == expected_mask
  assert tokenizer.decode(ids) == (
      "<|system|>\nBe brief.<|end|>\n<|user|>\nHello, how are you?<|end|>\n"
      "<|assistant|>\nI am fine.<|end|>\n<|user|>\nWhat is 2 + 2?<|end|>\n"
      "<|assistant|>\nIt is 4, of course.<|end|>\n")
  assert tokenizer.decode(ids) == chat.render_text(MULTI_TURN)
  answer_ids = [t for t, m in zip(ids, mask) if m == 1]
  assert tokenizer.decode(answer_ids) == "I am fine.<|end|>It is 4, of course.<|end|>"
  assert sum(mask) == len(tokenizer.encode("I am fine.")) + len(tokenizer.encode("It is 4, of course.")) + 2
  assert answer_ids.count(tokenizer.token_id(END)) == 2


@pytest.mark.parametrize("weight", [0.0, 0.3, 1.0])
def test_prompt_loss_weight(tokenizer, weight):
  ids, mask = chat.render(MULTI_TURN, tokenizer, prompt_loss_weight=weight)
  assert (ids, mask) == expected_render(tokenizer, MULTI_TURN, weight)
  if weight == 1.0:
    assert mask == [1.0] * len(ids)
  with pytest.raises(ValueError, match="prompt_loss_weight"):
    chat.render(MULTI_TURN, tokenizer, prompt_loss_weight=1.5)


def test_pairs_and_prompts(tokenizer):
  pair = chat.from_pair("Hi there", "Hello!")
  assert pair == [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]
  assert chat.render(pair, tokenizer) == expected_render(tokenizer, pair)
  prompt = chat.render_prompt(MULTI_TURN[:4], tokenizer)
  assert prompt == (expected_render(tokenizer, MULTI_TURN[:4])[0] + [tokenizer.token_id(ASSISTANT)]
                    + tokenizer.encode("\n"))
  full, mask = chat.render(MULTI_TURN, tokenizer)
  assert full[:len(prompt)] == prompt  # training sees exactly what generation is prompted with
  assert mask[len(prompt)] == 1 and mask[len(prompt) - 1] == 0
  first_prompt = chat.render_prompt(MULTI_TURN[:2], tokenizer)
  assert not any(mask[:len(first_prompt)]) and mask[len(first_prompt)] == 1


def test_chinese_round_trip(tokenizer):
  ids, mask = chat.render(CHINESE, tokenizer)
  assert tokenizer.decode(ids) == (
      "<|system|>\n你是一个乐于助人的助手。<|end|>\n<|user|>\n今天天气怎么样？<|end|>\n"
      "<|assistant|>\n今天天气很好，我们去公园散步吧。<|end|>\n")
  answer = tokenizer.decode([t for t, m in zip(ids, mask) if m])
  assert answer == "今天天气很好，我们去公园散步吧。<|end|>"
  assert (ids, mask) == expected_render(tokenizer, CHINESE)


def test_bad_messages_and_tokenizers(tokenizer, english):
  with pytest.raises(ValueError, match="unknown role 'tool'"):
    chat.render([{"role": "tool", "content": "x"}], tokenizer)
  with pytest.raises(ValueError, match="message 1 has no string 'content'"):
    chat.render([{"role": "user", "content": "x"}, {"role": "assistant", "content": 5}], tokenizer)
  with pytest.raises(ValueError, match=r"chat marker '<\|tool\|>'"):
    chat.check_tokenizer(tokenizer, chat.ChatTemplate(system="<|tool|>"))
  texts = [m["content"] for c in english[:200] for m in c]
  no_end = tokenizer_lib.train_tokenizer(texts, vocab_size=400, special_tokens=(SYSTEM, USER, ASSISTANT))
  with pytest.raises(ValueError, match=r"chat marker '<\|end\|>'"):
    chat.render(MULTI_TURN, no_end)
  with pytest.raises(ValueError, match=r"chat marker '<\|end\|>'"):
    sft.sft_dataset(english, no_end, seq_len=32, batch_size=1, seed=0)


# --- pipeline ----------------------------------------------------------------------------------


def unpack(batches, seq_len):
  """Every example of the packed rows as (inputs, targets, loss_mask) tuples, checking the row layout:
  segments 1..k in order and contiguous, positions 0..n-1 in each, then padding (segment 0) only."""
  examples = []
  for batch in batches:
    assert {k: (v.shape[1:], v.dtype) for k, v in batch.items()} == {
        k: ((seq_len,), np.float32 if k == "loss_mask" else np.int32)
        for k in ("inputs", "targets", "segment_ids", "positions", "loss_mask")}
    for r in range(len(batch["inputs"])):
      row = {k: v[r] for k, v in batch.items()}
      segment_ids = row["segment_ids"]
      assert segment_ids[0] == 1, "all-padding row"
      used = int(np.sum(segment_ids > 0))
      assert (segment_ids[used:] == 0).all() and (segment_ids[:used] > 0).all()
      assert (row["inputs"][used:] == 0).all() and (row["targets"][used:] == 0).all()
      assert (row["loss_mask"][used:] == 0).all() and (row["positions"][used:] == 0).all()
      assert (np.diff(segment_ids[:used]) >= 0).all() and (np.diff(segment_ids[:used]) <= 1).all()
      for s in range(1, segment_ids[used - 1] + 1):
        where = np.flatnonzero(segment_ids == s)
        np.testing.assert_array_equal(row["positions"][where], np.arange(len(where)))
        examples.append(tuple(tuple(row[k][where].tolist()) for k in ("inputs", "targets", "loss_mask")))
  return examples


def expected_example(tokenizer, messages, seq_len, weight=0.0):
  ids, mask = expected_render(tokenizer, messages, weight)
  ids, mask = ids[:seq_len + 1], mask[:seq_len + 1]
  return tuple(ids[:-1]), tuple(ids[1:]), tuple(mask[1:])


def all_batches(ds):
  return list(iter(ds))


@pytest.mark.parametrize("seq_len,weight", [(24, 0.0), (128, 0.0), (128, 0.5)])
def test_packed_rows_hold_the_unpacked_examples(tokenizer, english, seq_len, weight):
  convs = english[:120] + [CHINESE, MULTI_TURN]
  ds = sft.sft_dataset(convs, tokenizer, seq_len=seq_len, batch_size=1, seed=0, shuffle=False,
                       repeat=False, prompt_loss_weight=weight, packing_bins=4)
  it = iter(ds)
  got = unpack(list(it), seq_len)
  stats = sft.SFTStats(**{k: v for k, v in pipeline.counters(it.get_state()).items() if k != "dropped"})
  expected = [expected_example(tokenizer, c, seq_len, weight) for c in convs]
  expected = [e for e in expected if any(e[2])]  # dropped: nothing to learn after truncation
  assert sorted(got) == sorted(expected)
  lengths = [len(expected_render(tokenizer, c)[0]) for c in convs]
  assert stats.examples == len(expected) and stats.dropped_too_long == 0
  assert stats.truncated == sum(n > seq_len + 1 for n in lengths) - stats.dropped_no_loss
  if seq_len == 128:
    assert len(got) > 1.5 * len(all_batches(ds))  # several examples per row
    assert stats.truncated == stats.dropped_no_loss == 0
  else:
    assert stats.truncated > 0


def test_shuffled_batches_and_shards(tokenizer, english):
  convs = english[:101]
  expected = {expected_example(tokenizer, c, 48) for c in convs}
  seen = []
  for process_index in range(2):
    ds = sft.sft_dataset(convs, tokenizer, seq_len=48, batch_size=1, seed=3, repeat=False,
                         process_index=process_index, process_count=2)
    seen.append(unpack(all_batches(ds), 48))
    assert len(seen[-1]) == len(set(seen[-1]))
  assert len(seen[0]) == 51 and not set(seen[0]) & set(seen[1])
  assert set(seen[0]) | set(seen[1]) == expected
  batches = all_batches(sft.sft_dataset(convs, tokenizer, seq_len=48, batch_size=4, seed=3, repeat=False))
  assert all(b["inputs"].shape == (4, 48) for b in batches)
  examples = unpack(batches, 48)
  assert set(examples) <= expected and len(examples) == len(set(examples)) > len(convs) // 2
  in_order = unpack(all_batches(sft.sft_dataset(convs, tokenizer, seq_len=48, batch_size=1, seed=3,
                                                shuffle=False, repeat=False)), 48)
  assert examples != in_order[:len(examples)]


def test_overlong_policies_and_counts(tokenizer):
  short = chat.from_pair("Hi", "Hello!")
  long_answer = chat.from_pair("Tell me a story.", "Once upon a time " * 20)
  long_prompt = chat.from_pair("Please read this. " * 20, "Okay.")
  no_answer = [{"role": "user", "content": "Anyone there?"}]
  convs = [short, long_answer, long_prompt, no_answer]
  seq_len = 32
  lengths = [len(expected_render(tokenizer, c)[0]) for c in convs]
  assert lengths[0] <= seq_len + 1 < min(lengths[1], lengths[2])

  def run(overlong, weight=0.0):
    it = iter(sft.sft_dataset(convs, tokenizer, seq_len=seq_len, batch_size=1, seed=0, shuffle=False,
                              repeat=False, overlong=overlong, prompt_loss_weight=weight))
    got = sorted(unpack(list(it), seq_len))
    return got, sft.SFTStats(**{k: v for k, v in pipeline.counters(it.get_state()).items() if k != "dropped"})

  got, stats = run("truncate")
  assert got == sorted(expected_example(tokenizer, c, seq_len) for c in (short, long_answer))
  assert (stats.examples, stats.truncated, stats.dropped_too_long, stats.dropped_no_loss) == (2, 1, 0, 2)
  assert stats.dropped == 2
  got, stats = run("drop")
  assert got == [expected_example(tokenizer, short, seq_len)]
  assert (stats.examples, stats.truncated, stats.dropped_too_long, stats.dropped_no_loss) == (1, 0, 2, 1)
  got, stats = run("truncate", weight=0.5)  # with prompt loss, nothing is loss-free
  assert (stats.examples, stats.truncated, stats.dropped_no_loss) == (4, 2, 0)
  assert len(got) == 4
  with pytest.raises(ValueError, match="overlong"):
    sft.sft_dataset(convs, tokenizer, seq_len=seq_len, batch_size=1, seed=0, overlong="wrap")
  # The boundary: n + 1 tokens fit in seq_len = n.
  n = lengths[0] - 1
  assert sft.make_example(short, tokenizer, seq_len=n)["status"] == sft.KEPT
  truncated = sft.make_example(short, tokenizer, seq_len=n - 1)
  assert truncated["status"] == sft.TRUNCATED and len(truncated["inputs"]) == n - 1


# --- iterator state ----------------------------------------------------------------------------


def assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def small_dataset(tokenizer, english):
  # 40 conversations, about one per row (half are truncated), 4 bins per packing window: an epoch
  # is about 20 batches, so restoring at k=13 checks batches of the next epoch too.
  return sft.sft_dataset(english[:40], tokenizer, seq_len=48, batch_size=2, seed=0, packing_bins=4)


@pytest.mark.parametrize("k", [0, 1, 5, 13])
def test_iterator_state_restores_the_stream(tokenizer, english, k):
  it = iter(small_dataset(tokenizer, english))
  for _ in range(k):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # as grain's orbax handler stores it
  expected = [next(it) for _ in range(8)]
  fresh = iter(small_dataset(tokenizer, english))
  fresh.set_state(state)
  assert_same_batches([next(fresh) for _ in range(8)], expected)
  counts = pipeline.counters(it.get_state())
  assert pipeline.counters(fresh.get_state()) == counts and counts["examples"] > 0


def test_iterator_state_through_orbax(tokenizer, english, tmp_path):
  ds = small_dataset(tokenizer, english)
  stream = [b for _, b in zip(range(10), ds)]
  manager = ocp.CheckpointManager(tmp_path / "ckpt")
  it = iter(ds)
  for _ in range(3):
    next(it)
  manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  manager.wait_until_finished()
  manager.close()
  manager = ocp.CheckpointManager(tmp_path / "ckpt")
  restored = iter(ds)
  manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
  assert_same_batches([next(restored) for _ in range(7)], stream[3:])


# --- sources -----------------------------------------------------------------------------------


def has_chinese(conv):
  return any("\u4e00" <= ch <= "\u9fff" for m in conv for ch in m["content"])


def test_chatterbot_split_is_deterministic_and_disjoint():
  key = lambda c: json.dumps(c, ensure_ascii=False)
  train = sft.conversations("chatterbot", "train")
  validation = sft.conversations("chatterbot", "validation")
  assert [key(c) for c in sft.conversations("chatterbot", "validation")] == [key(c) for c in validation]
  train_keys, validation_keys = {key(c) for c in train}, {key(c) for c in validation}
  assert len(train_keys) == len(train) and len(validation_keys) == len(validation)  # deduplicated
  assert not train_keys & validation_keys
  assert 0.05 < len(validation) / (len(train) + len(validation)) < 0.15
  for c in validation:
    assert zlib.crc32(key(c).encode()) % 10_000 < 1000
  assert any(map(has_chinese, train)) and any(map(has_chinese, validation))
  for c in train[:200] + validation[:200]:
    assert [m["role"] for m in c] == ["user", "assistant"] * (len(c) // 2)
  chinese = sft.conversations("chatterbot:chinese", "validation")
  assert chinese and all(map(has_chinese, chinese))
  assert {key(c) for c in chinese} <= validation_keys
  both = sft.conversations("chatterbot:english, chinese", "train", validation_fraction=0.5)
  assert any(map(has_chinese, both)) and not all(map(has_chinese, both))
  with pytest.raises(sources.DataError, match="no language 'klingon'"):
    sft.conversations("chatterbot:klingon", "train")


def write(path, lines):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(l + "\n" for l in lines), encoding="utf-8")
  return str(path)


def test_jsonl_pairs_and_chats(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  pairs = [{"prompt": f"question {i} 今天", "response": f"answer {i}"} for i in range(60)]
  write(tmp_path / "pairs.jsonl", [json.dumps(p, ensure_ascii=False) for p in pairs] + [""])
  chats = [{"messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": f"u{i}"},
                         {"role": "assistant", "content": f"a{i}"}], "id": i} for i in range(40)]
  write(tmp_path / "sub" / "chats.jsonl", ["", *map(json.dumps, chats)])
  spec = "*.jsonl, **/chats.jsonl"
  splits = {s: sft.conversations(spec, s, validation_fraction=0.3) for s in ("train", "validation")}
  got = {s: [c[i] for i in range(len(c))] for s, c in splits.items()}
  expected = [chat.from_pair(p["prompt"], p["response"]) for p in pairs] + [c["messages"] for c in chats]
  assert sorted(map(json.dumps, got["train"] + got["validation"])) == sorted(map(json.dumps, expected))
  expected_validation = [c["messages"] for i, c in enumerate(chats)
                         if zlib.crc32(f"chats.jsonl:{i + 2}".encode()) % 10_000 < 3000]
  assert [c for c in got["validation"] if c[0]["role"] == "system"] == expected_validation
  assert 5 < len(expected_validation) < 25
  with pytest.raises(IndexError):
    splits["train"][len(splits["train"])]


@pytest.mark.parametrize("content,message", [
    ("", ": empty file"),
    ('{"prompt": "a", "response": "b"}\n{"prompt": oops}', ":2: invalid JSON"),
    ('{"prompt": "a"}', ":1: no string 'response'"),
    ('{"prompt": 1, "response": "b"}', ":1: no string 'prompt'"),
    ('\n\n{"text": "a"}', ":3: expected a 'messages' list"),
    ('["a"]', ":1: not a JSON object"),
    ('{"messages": []}', ":1: a conversation must be a non-empty list"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}',
     ":1: message 1 has unknown role 'bot'"),
    ('{"messages": [{"role": "user", "content": ["a"]}, {"role": "assistant", "content": "b"}]}',
     ":1: message 0 has no string 'content'"),
    ('{"messages": [{"role": "user", "content": "a"}]}', ":1: no assistant message"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, content, message):
  path = tmp_path / "data.jsonl"
  path.write_text(content, encoding="utf-8")
  with pytest.raises(sources.DataError, match=f"data.jsonl{message}"):
    sft.conversations(str(path), "train")


def test_spec_errors(tmp_path):
  with pytest.raises(sources.DataError, match="matches no file"):
    sft.conversations(f"{tmp_path}/none/*.jsonl", "train")
  (tmp_path / "a.txt").write_text("text")
  with pytest.raises(sources.DataError, match="a.txt: unsupported file type"):
    sft.conversations(str(tmp_path / "a.txt"), "train")
  path = write(tmp_path / "one.jsonl", ['{"prompt": "a", "response": "b"}'])
  with pytest.raises(sources.DataError, match="no conversations in split 'validation'.*data.validation_fraction"):
    sft.conversations(path, "validation", validation_fraction=0.01)
  assert len(sft.conversations(path, "validation", validation_fraction=0.0)) == 0  # no validation
  with pytest.raises(ValueError, match="split"):
    sft.conversations(path, "test")
