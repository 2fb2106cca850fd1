"""The SFT stage end to end: init_from a pretrained run, answer-only loss on held-out data, packing that does
not change any example's loss, and the errors of a bad start."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import config as config_lib, losses, metrics as metrics_lib, model as model_lib, runs, tasks, train
from jaxllm.data import sft
from jaxllm.data.tokenizer import Tokenizer
from tests.conftest import ANIMALS, sft_config

def test_sft_from_a_pretrained_run(pretrained, corpus_dir, qa_jsonl, tmp_path, capsys):
  workdir = str(tmp_path / "sft")
  train.run(sft_config(corpus_dir, qa_jsonl, pretrained), workdir)
  out = capsys.readouterr().out
  assert f"initialized from {pretrained}/checkpoints/8" in out
  assert "samples before training" in out and "samples after training" in out and "Q: what is the cat" in out
  assert Tokenizer.from_file(os.path.join(workdir, "tokenizer.model")).sha256 == \
      Tokenizer.from_file(os.path.join(pretrained, "tokenizer.model")).sha256
  rows = metrics_lib.read_metrics(workdir)
  evals = [r["eval/loss"] for r in rows if "eval/loss" in r]
  assert evals[-1] < evals[0] - 0.5  # held-out answer-only loss
  assert all("data/truncated" in r for r in rows if "loss" in r)
  # the model config comes from the pretrained run, not from this config's preset
  assert json.load(open(os.path.join(workdir, "config.json")))["model"]["d_model"] == 32


def test_sft_starts_from_the_pretrained_params(pretrained, corpus_dir, qa_jsonl, tmp_path):
  """The step-0 validation loss of the SFT run equals the answer-only loss of the pretrained params, computed
  here independently on the same batches, by the pretrained run's own (scanned) model: the SFT run loops over
  the layers (sft_config), so its init_from converted the checkpoint's layout."""
  cfg = sft_config(corpus_dir, qa_jsonl, pretrained, **{"train.steps": 1, "train.num_samples": 0,
                                                       "optimizer.warmup_steps": 0})
  workdir = str(tmp_path / "sft0")
  train.run(cfg, workdir)
  step0 = next(r["eval/loss"] for r in metrics_lib.read_metrics(workdir) if r["step"] == 0)
  params = runs.load_params(*runs.resolve(pretrained))
  model_cfg = runs.model_config(pretrained)
  assert model_cfg.scan_layers and not runs.model_config(workdir).scan_layers
  tok = Tokenizer.from_file(os.path.join(pretrained, "tokenizer.model"))
  task = tasks.make(cfg)
  _, val, _ = task.sources()
  total = weight = 0.0
  forward = jax.jit(model_lib.forward, static_argnums=0)
  for b in task.eval_batches(val, tok):
    logits = forward(model_cfg, params, b["inputs"], b["segment_ids"], b["positions"])
    s, w = losses.next_token_loss_sum(logits, b["targets"], b["loss_mask"])
    total, weight = total + float(s), weight + float(w)
    assert set(np.unique(b["loss_mask"])) <= {0.0, 1.0}  # validation: answers only
  assert step0 == pytest.approx(total / weight, rel=1e-5)


def test_packed_and_unpacked_examples_have_the_same_loss(pretrained, corpus_dir, qa_jsonl):
  cfg = sft_config(corpus_dir, qa_jsonl, pretrained)
  model_cfg = runs.model_for(cfg, pretrained, 0)
  params = model_lib.init(model_cfg, jax.random.key(3))
  tok = Tokenizer.from_file(os.path.join(pretrained, "tokenizer.model"))
  convs = [[{"role": "user", "content": f"what is the {a} number 4?"},
            {"role": "assistant", "content": f"the {a} is 4."}] for a in ANIMALS[:3]]
  examples = [sft.make_example(c, tok, seq_len=64) for c in convs]

  def example_loss(inputs, targets, mask, segments=None, positions=None):
    logits = jax.jit(model_lib.forward, static_argnums=0)(model_cfg, params, inputs[None],
                                                          None if segments is None else segments[None],
                                                          None if positions is None else positions[None])
    return float(jnp.sum(losses.token_losses(logits, targets[None]) * mask[None]))

  alone = [example_loss(e["inputs"], e["targets"], e["loss_mask"]) for e in examples]
  cat = lambda key: np.concatenate([e[key] for e in examples])
  segments = np.concatenate([np.full(len(e["inputs"]), i + 1) for i, e in enumerate(examples)])
  positions = np.concatenate([np.arange(len(e["inputs"])) for e in examples])
  packed = [example_loss(cat("inputs"), cat("targets"), np.where(segments == i + 1, cat("loss_mask"), 0),
                         segments, positions) for i in range(len(examples))]
  np.testing.assert_allclose(packed, alone, rtol=1e-5)


def test_bad_starts_fail_before_training(pretrained, corpus_dir, qa_jsonl, tmp_path):
  with pytest.raises(config_lib.ConfigError, match="init_from"):
    config_lib.validate(sft_config(corpus_dir, qa_jsonl, str(tmp_path / "missing")), num_devices=1)
  bad = sft_config(corpus_dir, qa_jsonl, pretrained)
  bad.data.prompt_loss_weight = 1.5
  with pytest.raises(config_lib.ConfigError, match="data.prompt_loss_weight"):
    config_lib.validate(bad, num_devices=1)
  with pytest.raises(config_lib.ConfigError, match="model.d_model"):
    train.run(sft_config(corpus_dir, qa_jsonl, pretrained, **{"model.d_model": 64}), str(tmp_path / "x"))
  other = str(tmp_path / "other.model")
  from jaxllm.data.tokenizer import train_tokenizer
  train_tokenizer(["some other text entirely"] * 20, vocab_size=300).save(other)
  with pytest.raises(config_lib.ConfigError, match="data.tokenizer.path: the tokenizer .* differs"):
    train.run(sft_config(corpus_dir, qa_jsonl, pretrained, **{"data.tokenizer.path": other}), str(tmp_path / "y"))
