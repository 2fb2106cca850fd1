"""Scoring a run (jaxllm/evaluation.py) against log-probs computed by hand from model.forward on one row alone:
loglikelihood (also across a tokenizer boundary, and batched/bucketed against one at a time), the greedy
flag, rolling windows that predict every token once, generate_until against greedy decoding without a cache; the
tasks' metrics (acc, acc_norm, acc_mutual_info, exact_match) against those numbers; eval.tasks during training."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import sft_tiny
from jaxllm import cli, evaluation, metrics as metrics_lib, model, runs, train
from jaxllm.data import chat, sft
from jaxllm.data.sources import DataError
from jaxllm.errors import ConfigError
from tests.conftest import set_fields, sft_config, tiny_config


@pytest.fixture(scope="module")
def scorer(pretrained):
  return evaluation.Scorer.from_run(pretrained, batch_size=4)


@functools.partial(jax.jit, static_argnums=0)
def _log_probs(cfg, params, x_1xT):
  positions_1xT = jnp.arange(x_1xT.shape[1])[None]
  return jax.nn.log_softmax(model.forward(cfg, params, x_1xT, jnp.ones_like(x_1xT), positions_1xT)[0])


def log_probs(s, ids):
  """[len(ids), V] log-probs of the model run on `ids` alone: one row, followed by filler up to a multiple of 32
  tokens (one compiled program) that no position read here attends to (causal)."""
  x = np.zeros((1, -(-len(ids) // 32) * 32), np.int32)
  x[0, :len(ids)] = ids
  return np.asarray(_log_probs(s.cfg, s.params, jnp.asarray(x)))[:len(ids)]


def by_hand(s, ids, scored):
  """(Σ log p of the last `scored` tokens of `ids`, greedy?) from the model run on `ids` alone."""
  logp = log_probs(s, ids[:-1])
  rows = range(len(ids) - 1 - scored, len(ids) - 1)
  return (float(sum(logp[t, ids[t + 1]] for t in rows)),
          all(int(np.argmax(logp[t])) == ids[t + 1] for t in rows))


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
  acc = acc_norm = acc_mi = 0
  for it in items:
    logps, priors = [], []
    for choice in it["choices"]:
      context_ids = scorer.tok.encode(it["context"])
      continuation = scorer.tok.encode(it["context"] + choice)[len(context_ids):]
      logps.append(by_hand(scorer, context_ids + continuation, len(continuation))[0])
      alone = scorer.tok.encode(choice)  # lm-eval's acc_mutual_info: the choice after an empty context (BOS)
      priors.append(by_hand(scorer, [scorer.tok.bos_id] + alone, len(alone))[0])
    acc += int(np.argmax(logps)) == it["answer"]
    acc_norm += int(np.argmax([lp / len(c) for lp, c in zip(logps, it["choices"])])) == it["answer"]
    acc_mi += int(np.argmax(np.subtract(logps, priors))) == it["answer"]
  assert got == pytest.approx({"acc": acc / 3, "acc_norm": acc_norm / 3, "acc_mutual_info": acc_mi / 3, "n": 3})
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps({"context": "x", "choices": ["a", "b"], "answer": 2}) + "\n")
  with pytest.raises(DataError, match=r"bad.jsonl:1.*'answer' must index"):
    evaluation.load_task(str(bad))


def greedy_by_hand(s, ids, max_tokens, ends=()):
  """New ids of greedy decoding by model.forward on the whole row at every step (no cache), until EOS or `ends`
  (left out) or max_tokens."""
  ids, new = list(ids), []
  for _ in range(max_tokens):
    t = int(np.argmax(log_probs(s, ids)[-1, :s.tok.vocab_size]))
    if t in (s.tok.eos_id, *ends):
      break
    new.append(t)
    ids.append(t)
  return new


def first_cut(text, stops):
  return text[:min([text.index(st) for st in stops if st in text], default=len(text))]


def test_generate_until_is_greedy_decoding_by_hand_cut_at_the_stop_strings(scorer):
  contexts = ["The cat sees", "A dog", "", "the old man paints a red apple. My sister finds an old book. The king",
              "The king carries"]
  for stops in ((".",), (" the", "."), ()):
    got = scorer.generate_until(contexts, stops, max_tokens=8)  # 5 rows in batches of 4: a padded second batch
    for context, text in zip(contexts, got):
      ids = (scorer.tok.encode(context) or [scorer.tok.bos_id])[-(scorer.max_length - 8):]  # cut from the left
      new = greedy_by_hand(scorer, ids, 8)
      assert text == first_cut(scorer.tok.decode(new), stops)
  assert any(text for text in got) and not any("." in text for text in scorer.generate_until(contexts, (".",), 8))
  with pytest.raises(ValueError, match="max_tokens=32 must be in"):
    scorer.generate_until(contexts, (".",), max_tokens=32)


def test_exact_match_of_generation_items(scorer, tmp_path):
  prompt = chat.render_prompt([{"role": "user", "content": "what is the cat number 3?"}], scorer.tok)
  end = scorer.tok.token_id(chat.DEFAULT_TEMPLATE.end)
  chat_answer = scorer.tok.decode(greedy_by_hand(scorer, prompt, 6, (end,)))
  plain = first_cut(scorer.tok.decode(greedy_by_hand(scorer, scorer.tok.encode("The cat sees"), 6)), (".",))
  items = [{"context": "The cat sees", "target": f"  {plain.strip()} ", "until": ["."], "max_tokens": 6},
           {"context": "The cat sees", "target": "xq zz", "until": ["."], "max_tokens": 6},
           {"context": "what is the cat number 3?", "target": chat_answer, "chat": True, "until": [], "max_tokens": 6}]
  path = tmp_path / "gen.jsonl"
  path.write_text("".join(json.dumps(it) + "\n" for it in items))
  assert evaluation.evaluate(scorer, evaluation.load_task(str(path))) == {"exact_match": pytest.approx(2 / 3), "n": 3}
  assert plain.strip() and chat_answer.strip()
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps({"context": "x", "target": "y", "until": "."}) + "\n")
  with pytest.raises(DataError, match=r"bad.jsonl:1.*'until' must be a list"):
    evaluation.load_task(str(bad))


def test_next_line_task_is_the_next_short_line_of_held_out_files():
  items = evaluation.load_task("stdlib_next_line")
  held_out = list(evaluation._stdlib_held_out())
  assert len(items) > 100 and items == evaluation.load_task("stdlib_next_line")
  for it in items[::7]:
    assert 0 < len(it["target"]) <= evaluation.NEXT_LINE_CHARS and it["context"].endswith("\n")
    assert 0 < len(it["context"]) <= evaluation.NEXT_LINE_CONTEXT
    following = set()  # the line after each occurrence of the context in a held-out file
    for text in held_out:
      at = text.find(it["context"])
      while at >= 0:
        following.add(text[at + len(it["context"]):].split("\n", 1)[0].strip())
        at = text.find(it["context"], at + 1)
    assert it["target"] in following


def test_embedded_tasks_and_the_command(pretrained, capsys):
  items = evaluation.load_task("chatterbot_mc_en")
  assert len(items) > 50 and all(len(it["choices"]) == 4 and it["chat"] for it in items)
  assert evaluation.load_task("chatterbot_mc_en") == items  # seeded
  held_out = sft.conversations("chatterbot:english", "validation", validation_fraction=0.1)  # SFT's held-out
  pairs = {(c[0]["content"], c[1]["content"]) for c in held_out}
  assert all((it["context"], it["choices"][it["answer"]]) in pairs for it in items)
  listed = cli.main(["eval", "--list"]) == 0 and capsys.readouterr().out
  assert "stdlib_ppl" in listed and "stdlib_next_line" in listed
  assert cli.main(["eval", "--run", pretrained, "--tasks", "chatterbot_mc_en,stdlib_ppl,stdlib_next_line",
                   "--limit", "3", "--max-length", "256"]) == 0
  written = json.load(open(os.path.join(pretrained, "eval", "chatterbot_mc_en.json")))
  assert written["n"] == 3 and 0 <= written["acc"] <= 1 and written["task"] == "chatterbot_mc_en"
  ppl = json.load(open(os.path.join(pretrained, "eval", "stdlib_ppl.json")))
  assert ppl["n"] == 3 and ppl["perplexity"] > 1 and ppl["tokens"] > 100
  lines = json.load(open(os.path.join(pretrained, "eval", "stdlib_next_line.json")))
  assert lines["n"] == 3 and 0 <= lines["exact_match"] <= 1
  assert cli.main(["eval", "--run", pretrained, "--tasks", "nope"]) == 2


def test_eval_tasks_are_scored_at_every_eval_step_of_a_lora_run(pretrained, corpus_dir, qa_jsonl, tmp_path):
  """eval.tasks on a LoRA SFT run without validation batches: rows at steps 0 and 4 hold each task's metrics,
  scored with the merged model (at step 0 the delta is zero: the base's numbers)."""
  files = {"mc": [{"context": "The cat", "choices": [" sees the ball.", " xq zz."], "answer": 0}] * 3,
           "ppl": [{"text": "The cat sees the ball. A dog likes the river."}, {"text": "My sister finds the moon."}]}
  for name, items in files.items():
    (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(it) + "\n" for it in items))
  # test_lora_dpo.py's LoRA SFT config (one compiled step for both), stopped after 4 of its 16 steps
  c = sft_config(corpus_dir, qa_jsonl, pretrained, **{"train.eval_every": 4, "train.eval_batches": 0,
                                                     "train.num_samples": 0})
  c.lora.enabled, c.lora.rank, c.lora.targets, c.lora.dropout = True, 4, "attention,mlp", 0.05
  c.eval.tasks, c.eval.max_items = ",".join(str(tmp_path / f"{name}.jsonl") for name in files), 2
  workdir = str(tmp_path / "run")
  train.run(c, workdir, stop_after=4)
  rows = [r for r in metrics_lib.read_metrics(workdir) if "eval/ppl/perplexity" in r]
  assert [r["step"] for r in rows] == [0, 4]
  assert {"eval/mc/acc", "eval/mc/acc_norm", "eval/mc/acc_mutual_info"} <= set(rows[0])
  for row, run in zip(rows, (pretrained, workdir)):
    scorer = evaluation.Scorer.from_run(run, max_length=c.train.seq_len)  # a LoRA run loads merged
    want = evaluation.evaluate(scorer, evaluation.load_task(str(tmp_path / "ppl.jsonl")))["perplexity"]
    assert row["eval/ppl/perplexity"] == pytest.approx(want, rel=1e-4)
  assert rows[0]["eval/ppl/perplexity"] != pytest.approx(rows[1]["eval/ppl/perplexity"], rel=1e-3)


def test_an_unknown_eval_task_is_refused_before_any_data_is_read(corpus_dir, tmp_path):
  c = tiny_config(corpus_dir, **{"eval.tasks": "stdlib_ppl,nope", "data.sources": str(tmp_path / "none/*.txt")})
  with pytest.raises(ConfigError, match="eval.tasks: 'nope' is neither an embedded task"):
    train.run(c, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


@pytest.mark.skipif(os.environ.get("JAXLLM_SLOW_TESTS") != "1",
                    reason="slow (1-2 min on 2 CPU cores, past CI's budget): run it with JAXLLM_SLOW_TESTS=1 pytest "
                           "tests/test_evaluation.py -k beats_chance")
def test_sft_on_chatterbot_beats_chance_on_answer_selection(tmp_path):
  """Masked SFT from scratch on chatterbot English (configs/sft_tiny.py's data; D=64, 2 layers, V=512, 600 steps
  of 16 rows of 64 tokens) scores acc_mutual_info on chatterbot_mc_en at least 3 binomial standard deviations above
  chance, and the same model untrained (fresh params, the run's tokenizer) within 2 of it. Chance is the mean of
  1/len(choices) over the items. Slow: it runs only with JAXLLM_SLOW_TESTS=1 (numbers: bench/RESULTS.md)."""
  c = set_fields(sft_tiny.get_config(), **{
      "init_from": "", "data.sources": "chatterbot:english", "data.tokenizer.vocab_size": 512,
      "model.d_model": 64, "model.num_layers": 2, "model.mlp_dim": 128, "model.num_heads": 2,
      "model.num_kv_heads": 1, "model.head_dim": 32, "model.remat_policy": "none",
      "train.steps": 600, "train.batch_size": 16, "train.seq_len": 64, "train.log_every": 100,
      "train.eval_every": 600, "train.eval_batches": 0, "train.checkpoint_every": 600, "train.num_samples": 0,
      "optimizer.learning_rate": 3e-3})
  items = evaluation.load_task("chatterbot_mc_en")
  trained_on = {(conv[0]["content"], conv[1]["content"])
                for conv in sft.conversations(c.data.sources, "train", validation_fraction=c.data.validation_fraction)}
  assert not any((it["context"], it["choices"][it["answer"]]) in trained_on for it in items)  # held out
  workdir = str(tmp_path / "sft")
  train.run(c, workdir)
  cfg, params, tok = runs.load_run(workdir)
  scores = {name: evaluation.evaluate(evaluation.Scorer(cfg, p, tok, max_length=256), items)["acc_mutual_info"]
            for name, p in (("untrained", model.init(cfg, jax.random.key(c.seed))), ("trained", params))}
  chance = float(np.mean([1 / len(it["choices"]) for it in items]))
  sd = np.sqrt(chance * (1 - chance) / len(items))
  print(f"chatterbot_mc_en acc_mutual_info over {len(items)} items: untrained {scores['untrained']:.3f}, trained "
        f"{scores['trained']:.3f}; chance {chance:.3f}, binomial sd {sd:.3f}")
  assert abs(scores["untrained"] - chance) <= 2 * sd
  assert scores["trained"] >= chance + 3 * sd
