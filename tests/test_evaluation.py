"""Scoring a run (jaxllm/evaluation.py) against log-probs computed by hand from model.forward on one unpadded
row: loglikelihood (also across a tokenizer boundary, and batched/bucketed against one at a time), the greedy
flag, and rolling windows that predict every token once."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import cli, evaluation, model
from jaxllm.data import sft
from jaxllm.data.sources import DataError


@pytest.fixture(scope="module")
def scorer(pretrained):
  return evaluation.Scorer.from_run(pretrained, batch_size=4)


def by_hand(s, ids, scored):
  """(Σ log p of the last `scored` tokens of `ids`, greedy?) from the model run on `ids` alone."""
  x = jnp.asarray([ids[:-1]], jnp.int32)
  logp = jax.nn.log_softmax(model.forward(s.cfg, s.params, x, jnp.ones_like(x), jnp.arange(len(ids) - 1)[None])[0])
  rows = range(len(ids) - 1 - scored, len(ids) - 1)
  return (float(sum(logp[t, ids[t + 1]] for t in rows)),
          all(int(jnp.argmax(logp[t])) == ids[t + 1] for t in rows))


REQUESTS = [("The cat sees", " the ball."), ("A dog", " likes the river."), ("the old man paints", " a red apple"),
            ("The teach", "er helps the king."),  # the boundary cuts a word: tokens merge across it
            ("", "The moon."), ("My sister finds the garden. The king carries", " an old book.")]


def test_loglikelihood_is_the_sum_of_the_continuations_log_probs(scorer):
  got = scorer.loglikelihood(REQUESTS)
  for (context, continuation), (logp, greedy) in zip(REQUESTS, got):
    context = context.rstrip()  # (none of these ends in a space)
    context_ids = scorer.tok.encode(context) if context else [scorer.tok.bos_id]
    whole = scorer.tok.encode(context + continuation)
    continuation_ids = whole[len(context_ids):] if context else whole
    want_logp, want_greedy = by_hand(scorer, context_ids + continuation_ids, len(continuation_ids))
    assert logp == pytest.approx(want_logp, abs=1e-4) and greedy == want_greedy
  assert all(logp < 0 for logp, _ in got)
  # the boundary case: encoding the pair merges across it, so the context's own tokens are not a prefix
  context, continuation = REQUESTS[3]
  context_ids = scorer.tok.encode(context)
  assert scorer.tok.encode(context + continuation)[:len(context_ids)] != context_ids
  # a context's trailing space moves to the continuation: the same request as without it
  assert scorer.loglikelihood([("The cat sees ", "the ball.")]) == scorer.loglikelihood([("The cat sees", " the ball.")])


def test_batching_and_buckets_do_not_change_the_numbers(scorer, pretrained):
  together = scorer.loglikelihood(REQUESTS)
  alone = [evaluation.Scorer.from_run(pretrained, batch_size=1).loglikelihood([r])[0] for r in REQUESTS[:3]]
  for (a, ga), (b, gb) in zip(together[:3], alone):
    assert a == pytest.approx(b, abs=1e-4) and ga == gb
  assert [evaluation.bucket(n, 512) for n in (1, 31, 32, 33, 100, 600)] == [32, 32, 32, 64, 128, 512]


@pytest.mark.parametrize("n,max_length", [(2, 4), (10, 4), (9, 4), (100, 7), (5, 512)])
def test_rolling_windows_predict_every_token_once(n, max_length):
  windows = evaluation.rolling_windows(n, max_length)
  scored = [t for _, first, end in windows for t in range(first, end)]
  assert scored == list(range(1, n))
  for start, first, end in windows:
    assert end - 1 - start <= max_length and start <= first - 1  # fits, and sees the token before its first
    assert start == max(0, end - 1 - max_length)  # with as much context as fits


def test_rolling_loglikelihood_equals_the_windows_by_hand(scorer, pretrained):
  text = "The cat sees the ball. A dog likes the river. The king carries an old book."
  ids = [scorer.tok.bos_id] + scorer.tok.encode(text)
  short = evaluation.Scorer.from_run(pretrained, max_length=8, batch_size=4)
  want = sum(by_hand(short, ids[start:end], end - first)[0]
             for start, first, end in evaluation.rolling_windows(len(ids), 8))
  assert short.loglikelihood_rolling([text])[0] == pytest.approx(want, abs=1e-3)
  # with room for the whole text it is loglikelihood with an empty context
  long = evaluation.Scorer.from_run(pretrained, max_length=512)
  assert long.loglikelihood_rolling([text])[0] == pytest.approx(long.loglikelihood([("", text)])[0][0], abs=1e-4)
  with pytest.raises(ValueError, match="it needs 1 to max_length=8"):
    short.loglikelihood([("", text)])
  assert len(ids) > 9 and np.isfinite(want)


def test_multiple_choice_accuracy_is_the_argmax_by_hand(scorer, tmp_path):
  items = [{"context": "The cat", "choices": [" sees the ball.", " xq zz qq.", " the the the"], "answer": 0},
           {"context": "A dog", "choices": [" zzzz.", " likes the river."], "answer": 1},
           {"context": "The king", "choices": [" carries an old book.", " paints the moon."], "answer": 1}]
  path = tmp_path / "mc.jsonl"
  path.write_text("".join(json.dumps(it) + "\n" for it in items))
  got = evaluation.evaluate(scorer, evaluation.load_task(str(path)))
  acc = acc_norm = 0
  for it in items:
    logps = []
    for choice in it["choices"]:
      context_ids = scorer.tok.encode(it["context"])
      continuation = scorer.tok.encode(it["context"] + choice)[len(context_ids):]
      logps.append(by_hand(scorer, context_ids + continuation, len(continuation))[0])
    acc += int(np.argmax(logps)) == it["answer"]
    acc_norm += int(np.argmax([lp / len(c.encode()) for lp, c in zip(logps, it["choices"])])) == it["answer"]
  assert got == {"acc": acc / 3, "acc_norm": acc_norm / 3, "n": 3}
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps({"context": "x", "choices": ["a", "b"], "answer": 2}) + "\n")
  with pytest.raises(DataError, match=r"bad.jsonl:1.*'answer' must index"):
    evaluation.load_task(str(bad))


def test_embedded_tasks_and_the_command(pretrained, capsys):
  items = evaluation.load_task("chatterbot_mc_en")
  assert len(items) > 50 and all(len(it["choices"]) == 4 and it["chat"] for it in items)
  assert evaluation.load_task("chatterbot_mc_en") == items  # seeded
  held_out = sft.conversations("chatterbot:english", "validation", validation_fraction=0.1)  # SFT's held-out
  pairs = {(c[0]["content"], c[1]["content"]) for c in held_out}
  assert all((it["context"], it["choices"][it["answer"]]) in pairs for it in items)
  assert cli.main(["eval", "--list"]) == 0 and "stdlib_ppl" in capsys.readouterr().out
  assert cli.main(["eval", "--run", pretrained, "--tasks", "chatterbot_mc_en,stdlib_ppl", "--limit", "3",
                   "--max-length", "256"]) == 0
  written = json.load(open(os.path.join(pretrained, "eval", "chatterbot_mc_en.json")))
  assert written["n"] == 3 and 0 <= written["acc"] <= 1 and written["task"] == "chatterbot_mc_en"
  ppl = json.load(open(os.path.join(pretrained, "eval", "stdlib_ppl.json")))
  assert ppl["n"] == 3 and ppl["perplexity"] > 1 and ppl["tokens"] > 100
  assert cli.main(["eval", "--run", pretrained, "--tasks", "nope"]) == 2
