"""Prompt tuning and prefix tuning (jaxllm/peft.py, model.split_prefix) against independent computations: the
frozen model run on explicitly prepended embeddings, attention in numpy with the extra keys and values, and
generation by full recomputation; then trained end to end."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import generate, metrics as metrics_lib, model as model_lib, peft, runs, train
from jaxllm.errors import ConfigError
from tests.conftest import sft_config
from tests.test_model import _np_forward

CFG = model_lib.ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                            mlp_dim=64, tie_embeddings=True)
P = 3


@pytest.fixture(scope="module")
def params():
  return model_lib.init(CFG, jax.random.key(0))


@pytest.fixture(scope="module")
def fwd():
  return jax.jit(model_lib.forward, static_argnums=0)


def _prompt(d=CFG.d_model):
  return jax.random.normal(jax.random.key(7), (P, d)) / np.sqrt(d)


def test_prompt_tuning_equals_prepended_embeddings(params, fwd):
  """The prompt as P new vocabulary rows, prepended as tokens: the frozen model run on them by hand. A packed row's
  every document sees the prompt as if it alone followed it."""
  prompt = _prompt()
  tokens = jax.random.randint(jax.random.key(1), (1, 7), 0, CFG.vocab_size)
  got = fwd(CFG, dict(params, prompt=prompt), tokens)
  wide_cfg = dataclasses.replace(CFG, vocab_size=CFG.vocab_size + P)
  wide = dict(params, embed={"embedding": jnp.concatenate([params["embed"]["embedding"], prompt])})
  virtual = jnp.arange(CFG.vocab_size, CFG.vocab_size + P)[None]
  want = fwd(wide_cfg, wide, jnp.concatenate([virtual, tokens], axis=1))[:, P:, :CFG.vocab_size]
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)

  segments, positions = jnp.array([[1, 1, 1, 2, 2, 2, 2]]), jnp.array([[0, 1, 2, 0, 1, 2, 3]])
  packed = fwd(CFG, dict(params, prompt=prompt), tokens, segments, positions)
  np.testing.assert_allclose(packed[:, :3], got[:, :3], atol=1e-5, rtol=1e-5)
  alone = fwd(CFG, dict(params, prompt=prompt), tokens[:, 3:])
  np.testing.assert_allclose(packed[:, 3:], alone, atol=1e-5, rtol=1e-5)


def test_prefix_tuning_equals_numpy_attention_with_extra_keys(params, fwd):
  """The prefix's keys and values ahead of every layer's own (unrotated, seen by every document); the tokens' RoPE
  positions shifted by P by hand."""
  k, v = (jax.random.normal(jax.random.key(i), (CFG.num_layers, P, CFG.num_kv_heads, CFG.head_dim)) for i in (2, 3))
  tokens = jax.random.randint(jax.random.key(4), (1, 8), 0, CFG.vocab_size)
  segments = jnp.array([[1, 1, 1, 1, 2, 2, 2, 0]])
  positions = jnp.array([[0, 1, 2, 3, 0, 1, 2, 0]])
  got = fwd(CFG, dict(params, prefix={"k": k, "v": v}), tokens, segments, positions)[0]
  want = _np_forward(CFG, params, np.asarray(tokens[0]), np.asarray(segments[0]), np.asarray(positions[0]) + P,
                     prefix=(np.asarray(k), np.asarray(v)))
  np.testing.assert_allclose(got, want, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_generation_with_a_prefix_equals_full_recomputation(params, fwd, kind):
  """KV-cache generation (the prefix in the first cache slots, left-padded prompts of two lengths) against
  greedy decoding by re-running the whole sequence through `forward` for every new token."""
  if kind == "prompt":
    extra = {"prompt": _prompt()}
  else:
    extra = {"prefix": {n: jax.random.normal(jax.random.key(i), (CFG.num_layers, P, CFG.num_kv_heads,
                                                                 CFG.head_dim)) for i, n in enumerate("kv")}}
  p = dict(params, **extra)
  prompts = [[5, 9, 2, 7], [11, 3]]
  got = generate.generate(CFG, p, prompts, max_new_tokens=5, rng=jax.random.key(0), temperature=0.0)
  for prompt, out in zip(prompts, got):
    seq = list(prompt)
    for _ in range(5):
      seq.append(int(jnp.argmax(fwd(CFG, p, jnp.array([seq]))[0, -1])))
    assert out == seq[len(prompt):]


def _prefix_of(trainable):
  return peft.prefix_kv(jax.tree.map(jnp.asarray, trainable))


def test_prefix_mlp_is_a_tanh_mlp_in_peft_layout():
  """The reparameterisation against numpy: tanh(E·W1 + b1)·W2 + b2, read as [P, L, 2, K, E] (PEFT's layout)."""
  rng = np.random.default_rng(0)
  l, p, k, e, d, h = 2, 3, 2, 4, 8, 5
  m = {"embedding": rng.normal(size=(p, d)), "w1": rng.normal(size=(d, h)), "b1": rng.normal(size=h),
       "w2": rng.normal(size=(h, l, 2, k, e)), "b2": rng.normal(size=(l, 2, k, e))}
  flat = np.tanh(m["embedding"] @ m["w1"] + m["b1"]) @ m["w2"].reshape(h, -1) + m["b2"].reshape(-1)
  want = flat.reshape(p, l, 2, k, e)
  got = _prefix_of({"prefix_mlp": m})
  np.testing.assert_allclose(got["k"], want[:, :, 0].transpose(1, 0, 2, 3), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got["v"], want[:, :, 1].transpose(1, 0, 2, 3), rtol=1e-5, atol=1e-5)


def test_prefix_config_errors(corpus_dir, qa_jsonl, pretrained):
  from jaxllm import config as config_lib
  both = sft_config(corpus_dir, qa_jsonl, pretrained, **{"prompt_tuning.num_tokens": 4, "lora.enabled": True})
  with pytest.raises(ConfigError, match="choose one parameter-efficient method"):
    config_lib.validate(both, num_devices=1)
  no_base = sft_config(corpus_dir, qa_jsonl, "", **{"prefix_tuning.num_tokens": 4})
  with pytest.raises(ConfigError, match="prefix_tuning.num_tokens: .*init_from"):
    config_lib.validate(no_base, num_devices=1)


def _held_out_losses(workdir):
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  return [r["eval/loss"] for r in rows if "eval/loss" in r]


def test_sft_through_a_prompt_trains_only_it_and_resumes(pretrained, corpus_dir, qa_jsonl, tmp_path):
  """SFT through a prompt (init from a text's embeddings) on the frozen pretrained run: the held-out answer loss
  falls, the checkpoint holds only the prompt and names its base, load_run gives the untouched base plus the
  prompt (what generate and eval use), and a resumed run trains it further."""
  overrides = {"prompt_tuning.num_tokens": 4, "prompt_tuning.init_text": "the answer is",
               "optimizer.learning_rate": 3e-2, "train.steps": 10, "train.eval_every": 5}
  workdir = str(tmp_path / "prompt")
  train.run(sft_config(corpus_dir, qa_jsonl, pretrained, **overrides), workdir)
  losses = _held_out_losses(workdir)
  assert losses[-1] < losses[0] - 0.1, losses

  saved = runs.saved_params(workdir, 10)
  assert list(saved) == ["prompt"] and saved["prompt"].shape == (4, 32)
  _, loaded, _ = runs.load_run(workdir)
  base = model_lib.relayout(runs.load_params(*runs.resolve(pretrained)), False)  # scanned; this run loops
  for path, x in jax.tree_util.tree_leaves_with_path(base):  # the base, untouched
    np.testing.assert_array_equal(np.asarray(x), np.asarray(_at(loaded, path)))
  np.testing.assert_array_equal(loaded["prompt"], saved["prompt"])

  train.run(sft_config(corpus_dir, qa_jsonl, pretrained, **dict(overrides, **{"train.steps": 11})), workdir)
  assert not np.array_equal(runs.saved_params(workdir, 11)["prompt"], saved["prompt"])


def test_dpo_through_a_prefix_mlp(pretrained, corpus_dir, pref_jsonl, tmp_path):
  """DPO through a prefix produced by its MLP (the reference: the frozen base without it) learns the
  preferences; the checkpoint holds the MLP tree, load_run the plain keys and values it produces."""
  from tests.test_lora_dpo import dpo_config
  c = dpo_config(corpus_dir, pref_jsonl, pretrained, use_lora=False,
                 **{"prefix_tuning.num_tokens": 4, "prefix_tuning.hidden": 16, "optimizer.learning_rate": 3e-2})
  workdir = str(tmp_path / "prefix")
  train.run(c, workdir)
  evals = [r for r in metrics_lib.read_metrics(workdir) if "eval/loss" in r]
  assert evals[-1]["eval/loss"] < evals[0]["eval/loss"] - 0.05 and evals[-1]["eval/rewards/accuracy"] > 0.8, evals
  saved = runs.saved_params(workdir, c.train.steps)
  assert list(saved) == ["prefix_mlp"]
  cfg, loaded, _ = runs.load_run(workdir)
  want = _prefix_of(saved)
  assert loaded["prefix"]["k"].shape == (cfg.num_layers, 4, cfg.num_kv_heads, cfg.head_dim)
  np.testing.assert_allclose(loaded["prefix"]["k"], want["k"], rtol=1e-6)
  np.testing.assert_allclose(loaded["prefix"]["v"], want["v"], rtol=1e-6)


def _at(tree, path):
  for key in path:
    tree = tree[key.key]
  return tree
