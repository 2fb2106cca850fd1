"""The reward model (stage=reward): the Bradley-Terry loss and its gradient against numpy, the score read at each
answer's last token (right and left padding, truncation) against the model run on the answer alone, the margin
field, and a short run that ranks held-out pairs well above chance."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tests.conftest import set_fields, tiny_config
from jaxllm import export, metrics, model, rejection_sample, runs, train
from jaxllm.data.sources import DataError
from jaxllm.errors import ConfigError, RunError
from jaxllm import safetensors_io as st
from jaxllm.data import chat, preference
from jaxllm.tasks import reward


def test_bradley_terry_loss_and_gradient_against_numpy():
  rng = np.random.default_rng(0)
  c, r, m = rng.normal(size=6), rng.normal(size=6), np.abs(rng.normal(size=6))
  coef = 0.3
  d = c - r - m
  want = np.sum(np.log1p(np.exp(-d)) + coef * (c + r) ** 2)
  total, count, sums = reward.bradley_terry_sum(jnp.asarray(c), jnp.asarray(r), jnp.asarray(m), coef)
  assert float(total) == pytest.approx(want, rel=1e-5) and float(count) == 6
  assert float(sums["accuracy"]) == np.sum(c > r) and float(sums["margin"]) == pytest.approx(np.sum(c - r), rel=1e-5)
  sigma = 1 / (1 + np.exp(d))  # σ(−d): d/dd of log(1 + e^−d) is −σ(−d)
  grad_c, grad_r = jax.grad(lambda a, b: reward.bradley_terry_sum(a, b, jnp.asarray(m), coef)[0], (0, 1))(
      jnp.asarray(c), jnp.asarray(r))
  np.testing.assert_allclose(grad_c, -sigma + 2 * coef * (c + r), rtol=1e-5)
  np.testing.assert_allclose(grad_r, sigma + 2 * coef * (c + r), rtol=1e-5)
  assert float(reward.bradley_terry_sum(jnp.ones(2), jnp.ones(2))[2]["accuracy"]) == 1.0  # ties count 0.5 each


def test_last_answer_index():
  mask = np.array([[0, 0, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 0]], np.float32)
  assert reward.last_answer_index(jnp.asarray(mask)).tolist() == [3, 5, 4]


@pytest.fixture(scope="module")
def scoring(pretrained):
  return runs.load_run(pretrained)  # (model config, params, tokenizer)


def _alone(cfg, params, ids, end_id):
  """The <|end|> logit at the last token of `ids`, the model run on `ids` alone (no padding, one row)."""
  x = jnp.asarray([ids], jnp.int32)
  out = model.forward(cfg, params, x, jnp.ones_like(x), jnp.arange(len(ids))[None])
  return float(out[0, -1, end_id])


def test_the_score_is_the_end_logit_at_the_answers_last_token(scoring):
  cfg, params, tok = scoring
  end_id = tok.token_id(chat.DEFAULT_TEMPLATE.end)
  pairs = [{"prompt": [{"role": "user", "content": "what is the cat number 3?"}], "chosen": "the cat is 3.",
            "rejected": "the dog sees the moon and the garden."},
           {"prompt": [{"role": "user", "content": "who?"}], "chosen": "a bird.", "rejected": "the king."}]
  rows = [preference.make_pair_example(p, tok, seq_len=64) for p in pairs]
  assert all(r["status"] == 0 for r in rows)  # kept whole: the prompt is not cut
  batch = {k: np.stack([r[k] for r in rows]) for k in rows[0] if k != "status"}
  chosen, rejected = reward.scores(cfg, params, batch, end_id)
  for i, p in enumerate(pairs):
    prompt = chat.render_prompt(p["prompt"], tok)
    for side, got in (("chosen", chosen[i]), ("rejected", rejected[i])):
      answer = tok.encode(p[side])  # the answer's tokens without <|end|>: its last token is where the score is
      assert float(got) == pytest.approx(_alone(cfg, params, prompt + answer, end_id), abs=1e-4)
  # left padding (segment 0, positions from 0 on the real tokens) reads the same position's score
  ids = chat.render_prompt(pairs[1]["prompt"], tok) + tok.encode(pairs[1]["chosen"])
  pad = 7
  left = {"inputs": np.array([[tok.pad_id] * pad + ids]), "segment_ids": np.array([[0] * pad + [1] * len(ids)]),
          "positions": np.array([[0] * pad + list(range(len(ids)))]),
          "loss_mask": np.array([[0.0] * (pad + len(ids) - 2) + [1.0, 1.0]], np.float32)}
  left = {f"{s}_{k}": v for s in preference.SIDES for k, v in left.items()}
  got = reward.scores(cfg, params, left, end_id)[0][0]
  assert float(got) == pytest.approx(_alone(cfg, params, ids, end_id), abs=1e-4)
  # a truncated answer (no <|end|> left) is scored at its last kept token
  cut = preference.make_pair_example(pairs[0], tok, seq_len=16)  # half the row for the answers: both cut
  assert cut["status"] != 0 and cut["chosen_loss_mask"][-1] == 1.0
  assert int(reward.last_answer_index(jnp.asarray(cut["chosen_loss_mask"][None]))[0]) == len(cut["chosen_inputs"]) - 1


def test_margin_field_is_read_and_checked(tmp_path):
  path = tmp_path / "p.jsonl"
  path.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b", "margin": 2}) + "\n"
                  + json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n")
  pairs = preference.pairs(str(path), "train", validation_fraction=0)
  assert [p.get("margin") for p in (pairs[0], pairs[1])] == [2.0, None]
  path.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"}) + "\n")
  with pytest.raises(Exception, match=r"p.jsonl:1.*'margin' must be a number"):
    preference.pairs(str(path), "train", validation_fraction=0)


@pytest.fixture(scope="module")
def reward_run(pretrained, corpus_dir, pref_jsonl, tmp_path_factory):
  """A reward model trained to prefer the unrelated sentence to the right answer (the opposite of what the
  pretrained <|end|> logit prefers, so that held-out accuracy starts far below chance and must be learned)."""
  root = tmp_path_factory.mktemp("rm")
  flipped = root / "flipped.jsonl"
  rows = [json.loads(line) for line in open(pref_jsonl)]
  flipped.write_text("".join(json.dumps({**r, "chosen": r["rejected"], "rejected": r["chosen"]}) + "\n" for r in rows))
  c = set_fields(tiny_config(corpus_dir), **{"train.steps": 30, "train.eval_every": 30, "train.num_samples": 0,
                                            "train.seq_len": 40, "train.batch_size": 8, "train.checkpoint_every": 30,
                                            "optimizer.learning_rate": 3e-3})
  c.stage, c.init_from = "reward", pretrained
  c.data.sources, c.data.hard_fraction, c.data.overlong, c.data.validation_fraction = str(flipped), 0.0, "drop", 0.2
  c.reward = ml_collections.ConfigDict({"center_coef": 0.01})
  train.run(c, str(root / "run"))
  return str(root / "run")


def test_a_reward_model_ranks_held_out_pairs_and_exports(reward_run, tmp_path):
  rows = [r for r in metrics.read_metrics(reward_run) if "eval/accuracy" in r]
  assert rows[0]["step"] == 0 and rows[-1]["step"] == 30 and rows[0]["eval/accuracy"] < 0.2, rows
  assert rows[-1]["eval/accuracy"] >= 0.9 and rows[-1]["eval/margin"] > 1.0, rows
  # exported as a sequence classifier: the body, and score.weight = the <|end|> column of the output embedding
  out = export.to_hf(reward_run, str(tmp_path / "hf"))
  config = json.load(open(os.path.join(out, "config.json")))
  assert config["architectures"] == ["LlamaForSequenceClassification"] and config["num_labels"] == 1
  cfg, params, tok = runs.load_run(reward_run)
  reader = st.Reader(st.files_of(out))
  end_id = tok.token_id(chat.DEFAULT_TEMPLATE.end)
  column = params["embed"]["embedding"][end_id] if cfg.tie_embeddings else params["lm_head"]["kernel"][:, end_id]
  np.testing.assert_array_equal(reader.get("score.weight"), np.asarray(column)[None])
  assert "lm_head.weight" not in reader and "model.norm.weight" in reader
  np.testing.assert_array_equal(reader.get("model.embed_tokens.weight"), params["embed"]["embedding"])


def test_transformers_loads_the_reward_model_with_the_same_scores(reward_run, tmp_path):
  """The exported sequence classifier in transformers ([hf] extra): its score of a sequence (read at its last
  token) equals the <|end|> logit jaxllm's model gives there."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  out = export.to_hf(reward_run, str(tmp_path / "hf"))
  hf_model = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
  cfg, params, tok = runs.load_run(reward_run)
  end_id = tok.token_id(chat.DEFAULT_TEMPLATE.end)
  for seed in range(3):
    ids = np.random.default_rng(seed).integers(3, cfg.vocab_size, (1, 12 + seed))
    want = float(model.forward(cfg, params, ids)[0, -1, end_id])
    with torch.no_grad():
      got = float(hf_model(input_ids=torch.tensor(ids)).logits[0, 0])
    assert got == pytest.approx(want, abs=1e-4), (seed, got, want)


# ---- rejection sampling


def _sample(pretrained, reward_run, prompts, out, **overrides):
  argv = ["--policy", pretrained, "--reward", reward_run, "--prompts", str(prompts), "--samples", "4",
          "--out", str(out), "--max-new-tokens", "8", "--max-prompt-tokens", "32", "--batch-prompts", "2",
          "--shard-prompts", "2", "--seed", "3"]
  for key, value in overrides.items():
    argv += [f"--{key.replace('_', '-')}", str(value)]
  return rejection_sample.run(rejection_sample.parser().parse_args(argv))


def test_best_of_n_keeps_the_argmax_by_an_independent_score_and_resumes(pretrained, reward_run, qa_jsonl, tmp_path):
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text("".join(line for line in open(qa_jsonl).readlines()[:5]))  # 5 prompts: shards of 2, 2, 1
  counts = _sample(pretrained, reward_run, prompts, tmp_path / "a")
  assert counts["shards"] == 3 and counts["best"] == 5
  best = [json.loads(line) for line in open(tmp_path / "a" / "best.jsonl")]
  pairs = [json.loads(line) for line in open(tmp_path / "a" / "pairs.jsonl")]
  assert [b["prompt"] for b in best] == [json.loads(line)["prompt"] for line in open(prompts)]
  cfg, params, tok = runs.load_run(reward_run)
  end_id = tok.token_id(chat.DEFAULT_TEMPLATE.end)
  for b in best:
    assert len(b["scores"]) == 4 and b["score"] == pytest.approx(max(b["scores"]), abs=1e-5)
    ids = chat.render_prompt([{"role": "user", "content": b["prompt"]}], tok) + tok.encode(b["response"])
    assert b["score"] == pytest.approx(_alone(cfg, params, ids, end_id), abs=1e-3)  # the model on it alone
  for p in pairs:
    row = next(b for b in best if b["prompt"] == p["prompt"])
    assert p["chosen"] == row["response"] and p["rejected_score"] == pytest.approx(min(row["scores"]), abs=1e-5)
    assert p["margin"] == pytest.approx(p["chosen_score"] - p["rejected_score"])
  # the same seed gives the same files; an interrupted job (its last shard and the merged files missing, a
  # half-written shard left behind) resumes to them, without duplicates or gaps
  _sample(pretrained, reward_run, prompts, tmp_path / "b")
  for name in ("best.jsonl", "pairs.jsonl"):
    assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text()
  shards = tmp_path / "b" / "shards"
  for name in ("best.jsonl", "pairs.jsonl", "shards/best-00002.jsonl", "shards/pairs-00002.jsonl"):
    os.remove(tmp_path / "b" / name)
  (shards / "best-00002.jsonl.tmp").write_text('{"partial": ')
  assert _sample(pretrained, reward_run, prompts, tmp_path / "b")["sampled_now"] == 1
  for name in ("best.jsonl", "pairs.jsonl"):
    assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text()
  with pytest.raises(RunError, match="other arguments.*samples"):
    _sample(pretrained, reward_run, prompts, tmp_path / "b", samples=3)


def test_an_empty_answer_is_never_chosen():
  """rejection_sample._records: SFT and preference readers refuse empty responses, so the best and the worst are
  taken among the non-empty answers; a prompt with no other answer gets no record."""
  _records = rejection_sample._records
  prompt = [{"role": "user", "content": "q"}]
  sft, pair = _records(prompt, ["", "good", "  ", "bad", "ok"], np.array([9.0, 2.0, 8.0, -1.0, 0.5]))
  assert (sft["response"], sft["score"], sft["scores"]) == ("good", 2.0, [9.0, 2.0, 8.0, -1.0, 0.5])
  assert (pair["chosen"], pair["rejected"], pair["margin"]) == ("good", "bad", 3.0)
  sft, pair = _records(prompt, ["", "only", ""], np.array([5.0, 1.0, 7.0]))
  assert sft["response"] == "only" and pair is None
  assert _records(prompt, ["", " \n"], np.array([1.0, 2.0])) == (None, None)


def test_rejection_sampling_refusals(pretrained, reward_run, tmp_path):
  prompts = tmp_path / "p.jsonl"
  prompts.write_text(json.dumps({"prompt": "hi"}) + "\n" + json.dumps({"text": "no prompt"}) + "\n")
  with pytest.raises(DataError, match="p.jsonl:2"):
    _sample(pretrained, reward_run, prompts, tmp_path / "x")
  prompts.write_text(json.dumps({"prompt": "hi"}) + "\n")
  with pytest.raises(ConfigError, match="not a reward model"):
    _sample(pretrained, pretrained, prompts, tmp_path / "y")
  with pytest.raises(ConfigError, match="best-of-N needs N >= 2"):
    _sample(pretrained, reward_run, prompts, tmp_path / "z", samples=1)
