"""LoRA and DPO as stages of the same loop: a LoRA run trains and saves only its delta on a frozen base, and DPO
starts exactly at log 2 with the reference (the LoRA base, or a frozen copy) and learns the preferences."""

import json
import os

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxllm import config as config_lib, export, lora, metrics as metrics_lib, model as model_lib, runs, tasks, train
from tests.conftest import sft_config, tiny_config


def dpo_config(corpus_dir, pref_jsonl, init_from, *, use_lora, **overrides):
  c = tiny_config(corpus_dir, **{"train.steps": 12, "train.eval_every": 6, "train.num_samples": 0,
                                 "train.seq_len": 40, "optimizer.warmup_steps": 0, **overrides}).unlock()
  c.stage, c.init_from = "dpo", init_from
  c.data.sources, c.data.overlong, c.data.hard_fraction = str(pref_jsonl), "truncate", 0.5
  c.dpo = ml_collections.ConfigDict(dict(kind="sigmoid", beta=0.5, label_smoothing=0.0, gamma=0.0,
                                         cache_reference=False, rpo_alpha=0.0))
  c.lora.enabled, c.lora.rank, c.lora.alpha = use_lora, 4, 8.0
  c.optimizer.learning_rate = 1e-2
  return c


def _state_params(workdir):
  mngr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
  return mngr.restore(mngr.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]["params"]


def lora_sft_config(corpus_dir, qa_jsonl, init_from):
  c = sft_config(corpus_dir, qa_jsonl, init_from)
  c.lora.enabled, c.lora.rank, c.lora.targets, c.lora.dropout = True, 4, "attention,mlp", 0.05
  return c


@pytest.fixture(scope="module")
def lora_sft_run(pretrained, corpus_dir, qa_jsonl, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("lora_sft"))
  train.run(lora_sft_config(corpus_dir, qa_jsonl, pretrained), workdir)
  return workdir


def test_lora_sft_trains_and_saves_only_the_delta(lora_sft_run, pretrained, tmp_path):
  workdir = lora_sft_run
  rows = metrics_lib.read_metrics(workdir)
  evals = [r["eval/loss"] for r in rows if "eval/loss" in r]
  assert evals[-1] < evals[0] - 0.3
  saved = _state_params(workdir)
  paths = {lora.path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(saved)}
  assert paths and all(p.endswith(("/a", "/b")) for p in paths), paths  # only A and B, no base weight
  full = _state_params(pretrained)  # scanned; the LoRA run loops over the layers (sft_config)
  n = lambda tree: sum(np.asarray(x).size for x in jax.tree.leaves(tree))
  assert n(saved) < 0.25 * n(full)  # D=32 is tiny; the small preset's share is tested in test_lora.py
  # A LoRA run's checkpoint names its base; load_run puts the delta back on it.
  cfg, params, tok = runs.load_run(workdir)
  full = model_lib.relayout(full, cfg.scan_layers)
  assert jax.tree.structure(params) == jax.tree.structure(full)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(full)))
  # init_from a LoRA run reads its merged model; export writes that model as a full run
  as_init = runs.load_params(*runs.resolve(workdir))
  out = export.to_run(workdir, str(tmp_path / "merged"))
  exported = runs.load_run(out)[1]
  for a, b, e in zip(jax.tree.leaves(params), jax.tree.leaves(as_init), jax.tree.leaves(exported)):
    np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(e, b)
  assert not json.load(open(os.path.join(out, "config.json")))["lora"]["enabled"]


def test_continue_the_delta_of_a_lora_run(lora_sft_run, pretrained, corpus_dir, qa_jsonl, tmp_path, capsys):
  """lora.continue_delta: the new run starts from the saved delta on the same base (its step-0 validation loss
  is the source run's last), trains it further, and its checkpoint loads as base + the new delta."""
  c = lora_sft_config(corpus_dir, qa_jsonl, lora_sft_run)
  c.lora.continue_delta, c.train.steps = True, 4
  workdir = str(tmp_path / "continued")
  train.run(c, workdir)
  assert f"its LoRA delta, on its base {pretrained}" in capsys.readouterr().out
  source_eval = [r["eval/loss"] for r in metrics_lib.read_metrics(lora_sft_run) if "eval/loss" in r]
  evals = [r for r in metrics_lib.read_metrics(workdir) if "eval/loss" in r]
  assert evals[0]["step"] == 0 and evals[0]["eval/loss"] == pytest.approx(source_eval[-1], rel=1e-5)
  assert runs.lora_base(workdir) == runs.resolve(pretrained)
  delta = lora.from_saved(runs.saved_params(*runs.resolve(workdir)), c.lora)
  start = lora.from_saved(runs.saved_params(*runs.resolve(lora_sft_run)), c.lora)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(delta), jax.tree.leaves(start)))
  want = lora.merge(model_lib.relayout(runs.load_params(*runs.resolve(pretrained)), False), delta)  # as the runs
  got = runs.load_params(*runs.resolve(workdir))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), got, want)
  c.lora.rank = 8
  with pytest.raises(config_lib.ConfigError, match="lora.rank: 8 differs from 4"):
    train.run(c, str(tmp_path / "other_rank"))
  c.lora.rank, c.init_from = 4, pretrained
  with pytest.raises(config_lib.ConfigError, match="lora.continue_delta: init_from .* is not a LoRA run"):
    train.run(c, str(tmp_path / "not_lora"))


def test_lora_resume_refuses_a_changed_base(pretrained, corpus_dir, qa_jsonl, tmp_path):
  c = sft_config(corpus_dir, qa_jsonl, pretrained, **{"train.steps": 4, "train.checkpoint_every": 2})
  c.lora.enabled = True
  workdir = str(tmp_path / "lora")
  train.run(c, workdir, stop_after=2)
  meta_file = os.path.join(workdir, "checkpoints", "2", "meta", "metadata")
  meta = json.load(open(meta_file))
  meta["init_from"] = meta["init_from"].replace("@", "@0")  # as if the base run had been retrained
  json.dump(meta, open(meta_file, "w"))
  with pytest.raises(ValueError, match="was trained on top of"):
    train.run(c, workdir)


@pytest.fixture(scope="module")
def dpo_runs(pretrained, corpus_dir, pref_jsonl, tmp_path_factory):
  """name -> workdir of a 12-step DPO run: with LoRA, with LoRA and cached reference log-probs, full."""
  cache = {}

  def get(name):
    if name not in cache:
      c = dpo_config(corpus_dir, pref_jsonl, pretrained, use_lora=name != "full")
      c.dpo.cache_reference = name == "lora+cache"
      cache[name] = str(tmp_path_factory.mktemp(name.replace("+", "_")))
      train.run(c, cache[name])
    return cache[name]

  return get


@pytest.mark.parametrize("name", ["lora", "full"])
def test_dpo_starts_at_log2_and_learns_the_preferences(dpo_runs, name):
  workdir = dpo_runs(name)
  rows = metrics_lib.read_metrics(workdir)
  first = next(r for r in rows if r["step"] == 1 and "loss" in r)
  # step 1: policy == reference (LoRA: B = 0, so merged == base; full: the reference is a copy of the start)
  assert first["loss"] == pytest.approx(np.log(2), abs=1e-5)
  assert first["rewards/margin"] == pytest.approx(0.0, abs=1e-5)
  evals = [r for r in rows if "eval/loss" in r]
  assert evals[0]["eval/rewards/accuracy"] == 0.5 and evals[0]["eval/loss"] == pytest.approx(np.log(2), abs=1e-5)
  assert evals[-1]["eval/rewards/accuracy"] > 0.8
  assert evals[-1]["eval/rewards/margin"] > 0 and evals[-1]["eval/loss"] < np.log(2)
  assert "eval/kl_estimate" in evals[-1]


def test_dpo_and_lora_config_errors(corpus_dir, pref_jsonl, pretrained):
  c = dpo_config(corpus_dir, pref_jsonl, "", use_lora=False)
  with pytest.raises(config_lib.ConfigError, match="init_from"):
    config_lib.validate(c, num_devices=1)
  c = dpo_config(corpus_dir, pref_jsonl, pretrained, use_lora=True)
  c.dpo.kind = "nope"
  with pytest.raises(config_lib.ConfigError, match="dpo.kind"):
    config_lib.validate(c, num_devices=1)
  c = dpo_config(corpus_dir, pref_jsonl, pretrained, use_lora=True)
  c.lora.targets = "attention,("
  with pytest.raises(config_lib.ConfigError, match="lora.targets"):
    config_lib.validate(c, num_devices=1)


def test_cached_reference_logps_equal_recomputed(pretrained, corpus_dir, pref_jsonl, dpo_runs, capsys):
  from jaxllm import losses, model as model_lib
  from jaxllm.data import chat
  from jaxllm.data.tokenizer import Tokenizer

  c = dpo_config(corpus_dir, pref_jsonl, pretrained, use_lora=False, **{"train.seq_len": 96})  # no truncation
  run_dir, step = runs.resolve(pretrained)
  params = runs.load_params(run_dir, step)
  model_cfg = runs.model_for(c, run_dir, 0)
  tok = Tokenizer.from_file(os.path.join(run_dir, "tokenizer.model"))
  task = tasks.make(c)
  pairs, _, _ = task.sources()
  chosen, rejected = task.reference_logps(model_cfg, params, pairs, tok)
  forward = jax.jit(model_lib.forward, static_argnums=0)
  for i in (0, 7, len(pairs) - 1):  # recomputed one pair at a time, unpadded, from the rendered conversation
    for side, cached in (("chosen", chosen[i]), ("rejected", rejected[i])):
      ids, mask = chat.render(pairs[i]["prompt"] + [{"role": "assistant", "content": pairs[i][side]}], tok)
      ids, mask = np.asarray(ids)[None], np.asarray(mask, np.float32)[None]
      assert ids.shape[1] <= 97
      logits = forward(model_cfg, params, ids[:, :-1])
      want = float(losses.sequence_logprobs(logits, ids[:, 1:], mask[:, 1:])[0])
      assert cached == pytest.approx(want, rel=1e-5, abs=1e-4), (i, side)
  # a run with the cache trains as the run without it, and a restart reads the cache instead of recomputing
  with_cache, without = dpo_runs("lora+cache"), dpo_runs("lora")
  a = [r["loss"] for r in metrics_lib.read_metrics(with_cache) if "loss" in r]
  b = [r["loss"] for r in metrics_lib.read_metrics(without) if "loss" in r]
  np.testing.assert_allclose(a, b, rtol=1e-4)
  assert any(f.startswith("reference_logps-") for f in os.listdir(with_cache))
  c = dpo_config(corpus_dir, pref_jsonl, pretrained, use_lora=True)
  c.dpo.cache_reference = True
  capsys.readouterr()
  train.run(c, with_cache)
  assert "read from" in capsys.readouterr().out
