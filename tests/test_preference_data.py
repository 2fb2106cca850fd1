"""Tests of the preference data: rows of a hand-built pair token by token, over-long policies and their counts,
the chatterbot pairs (negatives, determinism, the split against the SFT split), JSONL pairs and their errors,
sharding and iterator checkpoints."""

import collections
import json

import numpy as np
import pytest

from jaxllm.data import chat, pipeline, preference, sft, sources, tokenizer as tokenizer_lib

SYSTEM, USER, ASSISTANT, END = tokenizer_lib.DEFAULT_SPECIAL_TOKENS
PROMPT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, how are you?"}]
PAIR = {"prompt": PROMPT, "chosen": "I am fine, thank you.", "rejected": "Go away."}


@pytest.fixture(scope="module")
def tokenizer():
  texts = [m["content"] for c in sft.chatterbot_conversations(["english"]) for m in c]
  return tokenizer_lib.train_tokenizer(texts, vocab_size=400)


@pytest.fixture(scope="module")
def splits():
  return {s: preference.pairs("chatterbot", s) for s in ("train", "validation")}


def expected_render(tokenizer, messages):
  """(ids, mask) of the documented template, each piece encoded on its own, mask 1 on assistant content + end."""
  enc, ids, mask = tokenizer.encode, [], []
  marker = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
  for m in messages:
    answer = float(m["role"] == "assistant")
    for piece, weight in [([tokenizer.token_id(marker[m["role"]])], 0.0), (enc("\n"), 0.0),
                          (enc(m["content"]), answer), ([tokenizer.token_id(END)], answer), (enc("\n"), 0.0)]:
      ids += piece
      mask += [weight] * len(piece)
  return ids, mask


def rows(batch, side, seq_len):
  """The real (unpadded) (inputs, targets, loss_mask) of each row of one side, checking the padding layout."""
  out = []
  for r in range(len(batch[f"{side}_inputs"])):
    row = {k: batch[f"{side}_{k}"][r] for k in preference.FEATURES}
    assert all(v.shape == (seq_len,) for v in row.values())
    n = int(row["segment_ids"].sum())
    assert (row["segment_ids"][:n] == 1).all() and (row["segment_ids"][n:] == 0).all()
    np.testing.assert_array_equal(row["positions"], np.r_[np.arange(n), np.zeros(seq_len - n)])
    for k in ("inputs", "targets", "loss_mask"):
      assert (row[k][n:] == 0).all(), k
    out.append(tuple(tuple(row[k][:n].tolist()) for k in ("inputs", "targets", "loss_mask")))
  return out


def one_batch(tokenizer, pairs, seq_len, batch_size=None, with_counts=False, **kwargs):
  """The first batch of `pairs` in order (all of them unless batch_size is given); with_counts: (the batch,
  sft.SFTStats of the counts in the iterator's state after it)."""
  ds = preference.preference_dataset(pairs, tokenizer, seq_len=seq_len, batch_size=batch_size or len(pairs),
                                     seed=0, shuffle=False, repeat=False, **kwargs)
  it = iter(ds)
  batch = next(it)
  if not with_counts:
    return batch
  counts = pipeline.counters(it.get_state())
  return batch, sft.SFTStats(**{k: v for k, v in counts.items() if k != "dropped"})


# --- rows --------------------------------------------------------------------------------------


def test_pair_rows_token_by_token(tokenizer):
  seq_len = 64
  batch = one_batch(tokenizer, [PAIR], seq_len)
  assert {k: v.dtype for k, v in batch.items()} == {
      f"{s}_{k}": np.float32 if k == "loss_mask" else np.int32 for s in preference.SIDES for k in preference.FEATURES
  } | {"pair_index": np.int32, "margin": np.float32}
  assert batch["pair_index"].tolist() == [0]  # its place in the source, for cached reference log-probs
  assert batch["margin"].tolist() == [0.0]    # no "margin" field: 0
  prompt_ids = chat.render_prompt(PROMPT, tokenizer)
  for side in preference.SIDES:
    ids, mask = expected_render(tokenizer, PROMPT + [{"role": "assistant", "content": PAIR[side]}])
    assert len(ids) <= seq_len + 1
    [got] = rows(batch, side, seq_len)
    assert got == (tuple(ids[:-1]), tuple(ids[1:]), tuple(mask[1:]))
    assert list(got[0][:len(prompt_ids)]) == prompt_ids  # both sides share the prompt tokens
    learned = [t for t, m in zip(got[1], got[2]) if m == 1]
    assert tokenizer.decode(learned) == PAIR[side] + END
    assert sum(got[2]) == len(tokenizer.encode(PAIR[side])) + 1
    assert tokenizer.decode(got[0]) == chat.render_text(PROMPT) + f"{ASSISTANT}\n{PAIR[side]}{END}"
  both = preference.concat_sides(batch)
  assert both.keys() == set(preference.FEATURES) and both["inputs"].shape == (2, seq_len)
  np.testing.assert_array_equal(both["targets"][1], batch["rejected_targets"][0])


def test_overlong_pairs_and_counts(tokenizer):
  short = {"prompt": [{"role": "user", "content": "Hi"}], "chosen": "Hello!", "rejected": "No."}
  long_prompt = {"prompt": [{"role": "user", "content": "Please read this. " * 20}], "chosen": "Okay.",
                 "rejected": "I will not read it."}
  long_answer = {"prompt": [{"role": "user", "content": "Story?"}],
                 "chosen": "Once upon a time " * 20, "rejected": "No."}
  seq_len = 32
  full = {name: {side: expected_render(tokenizer, p["prompt"] + [{"role": "assistant", "content": p[side]}])
                 for side in preference.SIDES} for name, p in
          [("short", short), ("long_prompt", long_prompt), ("long_answer", long_answer)]}
  assert max(len(full["short"][s][0]) for s in preference.SIDES) <= seq_len + 1
  assert min(len(full[n]["chosen"][0]) for n in ("long_prompt", "long_answer")) > seq_len + 1

  batch, stats = one_batch(tokenizer, [short, long_prompt, long_answer], seq_len, with_counts=True)
  assert (stats.examples, stats.truncated, stats.dropped_too_long, stats.dropped_no_loss) == (3, 2, 0, 0)
  got = {side: rows(batch, side, seq_len) for side in preference.SIDES}
  ids, mask = full["short"]["chosen"]
  assert got["chosen"][0] == (tuple(ids[:-1]), tuple(ids[1:]), tuple(mask[1:]))
  # long prompt: cut from the left by the same tokens on both sides; the answers are whole.
  longest = max(len(full["long_prompt"][s][0]) for s in preference.SIDES)
  cut = longest - (seq_len + 1)
  for side in preference.SIDES:
    ids, mask = full["long_prompt"][side]
    assert got[side][1] == (tuple(ids[cut:-1]), tuple(ids[cut + 1:]), tuple(mask[cut + 1:]))
  # long answer: the prompt keeps all of itself (it is under (seq_len + 1) // 2 tokens), the answer is cut on
  # the right.
  assert len(chat.render_prompt(long_answer["prompt"], tokenizer)) <= (seq_len + 1) // 2
  ids, mask = full["long_answer"]["chosen"]
  assert got["chosen"][2] == (tuple(ids[:seq_len]), tuple(ids[1:seq_len + 1]), tuple(mask[1:seq_len + 1]))
  ids, mask = full["long_answer"]["rejected"]
  assert got["rejected"][2] == (tuple(ids[:-1]), tuple(ids[1:]), tuple(mask[1:]))  # short: whole

  batch, stats = one_batch(tokenizer, [short, long_prompt, long_answer, short], seq_len, batch_size=2,
                           overlong="drop", with_counts=True)
  assert (stats.examples, stats.truncated, stats.dropped_too_long) == (2, 0, 2)
  assert rows(batch, "chosen", seq_len) == [got["chosen"][0]] * 2
  with pytest.raises(ValueError, match="overlong"):
    preference.preference_dataset([short], tokenizer, seq_len=seq_len, batch_size=1, seed=0, overlong="wrap")


def test_rows_fit_and_share_prompts_on_chatterbot(tokenizer, splits):
  pairs = splits["validation"][:64]
  seq_len = 40
  batch, stats = one_batch(tokenizer, pairs, seq_len, with_counts=True)
  assert stats.examples == 64 and stats.truncated > 0
  for r, (chosen, rejected) in enumerate(zip(rows(batch, "chosen", seq_len), rows(batch, "rejected", seq_len))):
    prompt_len = int(np.argmax(batch["chosen_loss_mask"][r])) + 1  # inputs up to the first answer token
    assert chosen[0][:prompt_len] == rejected[0][:prompt_len]
    assert any(chosen[2]) and any(rejected[2])


# --- chatterbot pairs ----------------------------------------------------------------------------


def key(conv):
  return json.dumps(conv, ensure_ascii=False)


def test_chatterbot_pairs_and_negatives(splits):
  train = sft.conversations("chatterbot", "train")
  pairs = splits["train"]
  assert len(pairs) == len(train)  # one pair per training conversation, in order
  counts = collections.Counter(p["negative"] for p in pairs)
  assert set(counts) == {"random", *preference.HARD_NEGATIVES}
  assert 0.45 * len(pairs) < len(pairs) - counts["random"] <= round(0.5 * len(pairs))
  for conv, p in zip(train, pairs):
    assert p["prompt"] == conv[:1] and p["chosen"] == conv[1]["content"]
    assert " ".join(p["rejected"].casefold().split()) != " ".join(p["chosen"].casefold().split())
    words = p["chosen"].split()
    if p["negative"] == "later_turn":
      assert p["rejected"] in [m["content"] for m in conv[3::2]]
    elif p["negative"] == "shuffled":
      assert sorted(p["rejected"].split()) == sorted(words)
    elif p["negative"] == "truncated":
      assert p["chosen"].startswith(p["rejected"]) and len(p["rejected"].split()) == len(words) // 2
  replies = {}
  for i, conv in enumerate(train):
    replies.setdefault(conv[1]["content"], []).append(i)
  for i, p in enumerate(pairs):
    if p["negative"] in ("random", "nearby"):
      origins = [j for j in replies[p["rejected"]] if train[j][0]["content"] != train[i][0]["content"]]
      assert origins, "a rejected reply comes from another conversation of the split"
      if p["negative"] == "nearby":
        assert min(abs(j - i) for j in origins) <= preference.NEARBY_WINDOW
  assert [p["rejected"] for p in preference.pairs("chatterbot", "train")] == [p["rejected"] for p in pairs]
  other = preference.pairs("chatterbot", "train", seed=1)
  assert sum(a["rejected"] != b["rejected"] for a, b in zip(pairs, other)) > len(pairs) // 2
  easy = preference.pairs("chatterbot:english", "train", hard_fraction=0.0)
  assert {p["negative"] for p in easy} == {"random"}
  with pytest.raises(ValueError, match="hard_fraction"):
    preference.pairs("chatterbot", "train", hard_fraction=1.5)


def test_chatterbot_split_follows_the_sft_split(splits):
  sft_split = {s: sft.conversations("chatterbot", s) for s in ("train", "validation")}
  first_turns = {s: {key(c[:2]) for c in convs} for s, convs in sft_split.items()}
  for s, pairs in splits.items():
    got = {key(p["prompt"] + [{"role": "assistant", "content": p["chosen"]}]) for p in pairs}
    assert got <= first_turns[s]
  train_user_turns = {" ".join(m["content"].casefold().split()) for c in sft_split["train"] for m in c
                      if m["role"] == "user"}
  held_out = splits["validation"]
  assert not {" ".join(p["prompt"][0]["content"].casefold().split()) for p in held_out} & train_user_turns
  assert 0.6 * len(sft_split["validation"]) < len(held_out) < len(sft_split["validation"])
  validation_texts = {m["content"] for c in sft_split["validation"] for m in c}
  train_texts = {m["content"] for c in sft_split["train"] for m in c}
  for p in held_out:  # negatives come from the validation split only
    if p["negative"] in ("random", "nearby", "later_turn"):
      assert p["rejected"] in validation_texts
  assert sum(p["rejected"] in validation_texts - train_texts for p in held_out) > 0.5 * len(held_out)


# --- JSONL pairs ---------------------------------------------------------------------------------


def write(path, lines):
  path.write_text("".join(l + "\n" for l in lines), encoding="utf-8")
  return str(path)


def test_jsonl_pairs(tmp_path):
  records = [{"prompt": f"question {i} 今天", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(30)]
  records += [{"prompt": [{"role": "system", "content": "sys"}, {"role": "user", "content": f"u{i}"}],
               "chosen": [{"role": "assistant", "content": f"c{i}"}], "rejected": f"r{i}", "score": i}
              for i in range(30)]
  path = write(tmp_path / "prefs.jsonl", [json.dumps(r, ensure_ascii=False) for r in records[:30]] + [""]
               + [json.dumps(r) for r in records[30:]])
  splits = {s: preference.pairs(path, s, validation_fraction=0.3) for s in ("train", "validation")}
  got = [p for s in splits.values() for p in (s[i] for i in range(len(s)))]
  expected = [{"prompt": [{"role": "user", "content": r["prompt"]}], "chosen": r["chosen"],
               "rejected": r["rejected"]} for r in records[:30]]
  expected += [{"prompt": r["prompt"], "chosen": r["chosen"][0]["content"], "rejected": r["rejected"]}
               for r in records[30:]]
  assert sorted(map(json.dumps, got)) == sorted(map(json.dumps, expected))
  assert 5 < len(splits["validation"]) < 30


@pytest.mark.parametrize("content,message", [
    ("", ": empty file"),
    ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": oops}', ":2: invalid JSON"),
    ('\n\n{"prompt": "a", "chosen": "b"}', ":3: no 'rejected' field"),
    ('["a"]', ":1: not a JSON object"),
    ('{"prompt": 1, "chosen": "b", "rejected": "c"}', ":1: 'prompt' must be a string or a list"),
    ('{"prompt": [], "chosen": "b", "rejected": "c"}', ":1: 'prompt': a conversation must be a non-empty list"),
    ('{"prompt": [{"role": "bot", "content": "a"}], "chosen": "b", "rejected": "c"}',
     ":1: 'prompt': message 0 has unknown role 'bot'"),
    ('{"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "chosen": "b", '
     '"rejected": "c"}', ":1: 'prompt' must end with a user message"),
    ('{"prompt": "a", "chosen": [{"role": "user", "content": "b"}], "rejected": "c"}',
     ":1: 'chosen' must be a string or a list of one assistant message"),
    ('{"prompt": "a", "chosen": "b", "rejected": null}', ":1: 'rejected' must be a string"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, content, message):
  path = tmp_path / "prefs.jsonl"
  path.write_text(content, encoding="utf-8")
  with pytest.raises(sources.DataError, match=f"prefs.jsonl{message}"):
    preference.pairs(str(path), "train")


# --- sharding and iterator state -----------------------------------------------------------------


def test_shards_are_disjoint_and_cover(tokenizer, splits):
  pairs = splits["validation"][:41]
  seen = []
  for process_index in range(2):
    ds = preference.preference_dataset(pairs, tokenizer, seq_len=48, batch_size=1, seed=3, repeat=False,
                                       process_index=process_index, process_count=2)
    seen.append([r for b in ds for r in zip(rows(b, "chosen", 48), rows(b, "rejected", 48))])
  assert len(seen[0]) == 21 and len(seen[1]) == 20
  everything = [r for b in [one_batch(tokenizer, pairs, 48)] for r in zip(rows(b, "chosen", 48),
                                                                           rows(b, "rejected", 48))]
  assert sorted(seen[0] + seen[1]) == sorted(everything)


@pytest.mark.parametrize("k", [0, 1, 6])
def test_iterator_state_restores_the_stream(tokenizer, splits, k):
  pairs = splits["validation"][:20]  # 5 batches an epoch: k = 6 restores in the second epoch
  make = lambda: preference.preference_dataset(pairs, tokenizer, seq_len=32, batch_size=4, seed=0)
  it = iter(make())
  for _ in range(k):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # as grain's orbax handler stores it
  expected = [next(it) for _ in range(6)]
  fresh = iter(make())
  fresh.set_state(state)
  got = [next(fresh) for _ in range(6)]
  for x, y in zip(got, expected):
    assert x.keys() == y.keys()
    for name in x:
      np.testing.assert_array_equal(x[name], y[name])
  counts = pipeline.counters(it.get_state())
  assert pipeline.counters(fresh.get_state()) == counts
  assert counts["examples"] == 4 * (k + 6) and counts["truncated"] > 0


# --- KTO examples (dpo.kind=kto) -------------------------------------------------------------------


def kto_batch(tokenizer, examples, seq_len, batch_size=None, **kwargs):
  """The first batch of `examples` in order (all of them unless batch_size is given), and the counts in the
  iterator's state after it."""
  it = iter(preference.kto_dataset(examples, tokenizer, seq_len=seq_len, batch_size=batch_size or len(examples),
                                   seed=0, shuffle=False, repeat=False, **kwargs))
  batch = next(it)
  return batch, pipeline.counters(it.get_state())


def previous_other_prompt(prompts, i):
  """By hand: the nearest example before i, cyclically, whose prompt differs."""
  for back in range(1, len(prompts)):
    if prompts[(i - back) % len(prompts)] != prompts[i]:
      return (i - back) % len(prompts)
  return (i - 1) % len(prompts)


def test_kto_jsonl_examples_and_their_kl_completions(tmp_path):
  records = [{"prompt": f"question {i // 2} 今天", "completion": f"answer {i}", "label": i % 3 == 0} for i in range(20)]
  records += [{"prompt": [{"role": "system", "content": "sys"}, {"role": "user", "content": f"u{i}"}],
               "completion": [{"role": "assistant", "content": f"c{i}"}], "label": False, "extra": 1}
              for i in range(4)]
  path = write(tmp_path / "kto.jsonl", [json.dumps(r, ensure_ascii=False) for r in records[:10]] + [""]
               + [json.dumps(r, ensure_ascii=False) for r in records[10:]])
  examples = preference.kto_examples(path, "train", validation_fraction=0.0)
  assert len(examples) == len(records) and "no validation" in examples.split_info
  prompts = [json.dumps(r["prompt"]) for r in records]  # consecutive records share prompts: skipped over
  for i, r in enumerate(records):
    ex = examples[i]
    messages = [{"role": "user", "content": r["prompt"]}] if isinstance(r["prompt"], str) else r["prompt"]
    completion = r["completion"] if isinstance(r["completion"], str) else r["completion"][0]["content"]
    j = previous_other_prompt(prompts, i)
    partner = records[j]["completion"]
    assert ex == {"prompt": messages, "completion": completion, "label": r["label"],
                  "kl_completion": partner if isinstance(partner, str) else partner[0]["content"]}, i
    assert prompts[j] != prompts[i]
  np.testing.assert_array_equal(preference.kl_partners(["a", "a", "b", "a"]), [2, 2, 1, 2])
  np.testing.assert_array_equal(preference.kl_partners(["a", "a", "a"]), [2, 0, 1])  # one prompt: the previous
  splits = {s: preference.kto_examples(path, s, validation_fraction=0.3) for s in ("train", "validation")}
  got = sorted(json.dumps(s[i]["completion"]) for s in splits.values() for i in range(len(s)))
  assert got == sorted(json.dumps(examples[i]["completion"]) for i in range(len(examples)))
  assert 0 < len(splits["validation"]) < len(records)


def test_kto_examples_from_pairs(tmp_path, splits):
  """Chatterbot pairs (and JSONL pairs) as KTO examples: every chosen answer desirable, then every rejected one
  undesirable, each with a mismatched KL completion."""
  pairs = splits["train"]
  examples = preference.kto_examples("chatterbot", "train")
  n = len(pairs)
  assert len(examples) == 2 * n and "desirable and an undesirable" in examples.split_info
  for i in (0, 1, n - 1):
    for k, side, label in ((i, "chosen", True), (n + i, "rejected", False)):
      ex = examples[k]
      assert (ex["prompt"], ex["completion"], ex["label"]) == (pairs[i]["prompt"], pairs[i][side], label)
  prompts = [json.dumps(p["prompt"]) for p in pairs] * 2
  assert all(prompts[j] != prompts[i] for i, j in enumerate(examples.partners))
  path = write(tmp_path / "pairs.jsonl", [json.dumps({"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"})
                                          for i in range(3)])
  from_file = preference.kto_examples(path, "train", validation_fraction=0.0)
  assert [(e["completion"], e["label"], e["kl_completion"]) for e in from_file] == [
      ("c0", True, "r2"), ("c1", True, "c0"), ("c2", True, "c1"), ("r0", False, "c2"), ("r1", False, "r0"),
      ("r2", False, "r1")]


@pytest.mark.parametrize("content,message", [
    ('{"prompt": "a", "completion": "b", "label": true}\n{"prompt": "a", "completion": "b"}', ":2: no 'label' field"),
    ('\n{"prompt": "a", "label": true}', ":2: no 'completion' field"),
    ('{"prompt": "a", "completion": "b", "label": "yes"}', ":1: 'label' must be true .* or false .*, got 'yes'"),
    ('{"prompt": "a", "completion": "b", "label": 1}', ":1: 'label' must be true .* or false .*, got 1"),
    ('{"prompt": "a", "completion": null, "label": false}', ":1: 'completion' must be a string"),
    ('{"prompt": 3, "completion": "b", "label": false}', ":1: 'prompt' must be a string or a list"),
    ('{"prompt": "a", "completion": "b", "label": true}\n[1]', ":2: not a JSON object"),
    ('{"prompt": "a", "completion": "b", "label": true}\n{oops', ":2: invalid JSON"),
])
def test_kto_jsonl_errors_name_file_and_line(tmp_path, content, message):
  path = tmp_path / "kto.jsonl"
  path.write_text(content, encoding="utf-8")
  with pytest.raises(sources.DataError, match=f"kto.jsonl{message}"):
    preference.kto_examples(str(path), "train", validation_fraction=0.0)


def test_kto_rows_token_by_token(tokenizer):
  """Each row: the example's own sequence and its prompt with the KL completion, each fitted on its own (a long KL
  completion truncates only the "kl" sequence and never drops the example), and the label."""
  prompt = [{"role": "user", "content": "Hello, how are you?"}]
  good = {"prompt": prompt, "completion": "I am fine.", "label": True, "kl_completion": "Go away."}
  long_kl = {"prompt": prompt, "completion": "No.", "label": False, "kl_completion": "Once upon a time " * 20}
  long_own = {"prompt": prompt, "completion": "Once upon a time " * 20, "label": True, "kl_completion": "No."}
  seq_len = 40
  batch, counts = kto_batch(tokenizer, [good, long_kl, long_own], seq_len)
  assert batch["label"].tolist() == [1.0, 0.0, 1.0] and batch["example_index"].tolist() == [0, 1, 2]
  assert (counts["examples"], counts["truncated"], counts["dropped"]) == (3, 1, 0)  # long_own's own sequence
  got = {side: rows(batch, side, seq_len) for side in ("completion", "kl")}
  for r, ex in enumerate([good, long_kl]):
    for side, answer in (("completion", ex["completion"]), ("kl", ex["kl_completion"])):
      ids, mask = expected_render(tokenizer, prompt + [{"role": "assistant", "content": answer}])
      if len(ids) > seq_len + 1:  # the long KL completion: the prompt is whole, the answer cut on the right
        ids, mask = ids[:seq_len + 1], mask[:seq_len + 1]
      assert got[side][r] == (tuple(ids[:-1]), tuple(ids[1:]), tuple(mask[1:])), (r, side)
  batch, counts = kto_batch(tokenizer, [good, long_kl, long_own], seq_len, batch_size=2, overlong="drop")
  assert batch["example_index"].tolist() == [0, 1] and counts["dropped_too_long"] == 1
