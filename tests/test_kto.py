"""KTO: the loss and its metrics against a float64 numpy computation written from the paper (eq. 7) and TRL's
KTOTrainer, its gradient signs and the reference point (clamped at 0, no gradient); the Task's loss on a tiny model
against log-probs by hand; the options refused before any data; one short LoRA run with cached reference log-probs
on unpaired JSONL whose held-out loss goes down."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxllm import config as config_lib, losses, metrics as metrics_lib, model as model_lib, tasks, train
from tests.conftest import ANIMALS, tiny_config


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _np_kto(pol, ref, pol_kl, ref_kl, label, beta, wd, wu):
  """(mean loss, metrics, z0) in float64: Ethayarajh et al. 2024, eq. 7, as TRL's KTOTrainer computes it."""
  r = pol - ref
  z0 = max(0.0, float(np.mean(pol_kl - ref_kl)))
  loss = np.where(label, wd * (1 - _sigmoid(beta * (r - z0))), wu * (1 - _sigmoid(beta * (z0 - r))))
  rewards = beta * r
  metrics = {"kl": z0, "rewards/desirable": rewards[label].mean(), "rewards/undesirable": rewards[~label].mean(),
             "rewards/margin": rewards[label].mean() - rewards[~label].mean(), "logps/desirable": pol[label].mean(),
             "logps/undesirable": pol[~label].mean()}
  return loss.mean(), metrics, z0


def _random(seed, kl_shift, batch=48):
  rng = np.random.default_rng(seed)
  pol, pol_kl = rng.normal(-30, 8, batch), rng.normal(-40, 8, batch)
  ref, ref_kl = pol + rng.normal(0, 2, batch), pol_kl + rng.normal(-kl_shift, 1, batch)
  label = rng.random(batch) < 0.4
  return pol, ref, pol_kl, ref_kl, label


@pytest.mark.parametrize("beta,wd,wu,kl_shift", [(0.1, 1.0, 1.0, 3.0), (0.5, 1.0, 1.5, 3.0), (0.1, 1.33, 1.0, -3.0)])
def test_kto_loss_and_metrics_match_numpy(beta, wd, wu, kl_shift):
  pol, ref, pol_kl, ref_kl, label = _random(0, kl_shift)
  want_loss, want_metrics, z0 = _np_kto(pol, ref, pol_kl, ref_kl, label, beta, wd, wu)
  assert (z0 > 1.0) if kl_shift > 0 else (z0 == 0.0)  # both sides of the clamp are exercised
  args = [jnp.asarray(x, jnp.float32) for x in (pol, ref, pol_kl, ref_kl)] + [jnp.asarray(label)]
  total, count, sums = losses.kto_loss_sum(*args, beta=beta, desirable_weight=wd, undesirable_weight=wu)
  assert float(count) == len(pol)
  np.testing.assert_allclose(float(total) / len(pol), want_loss, rtol=1e-5)
  assert sums.keys() == want_metrics.keys()
  for k, v in sums.items():
    np.testing.assert_allclose(float(v) / len(pol), want_metrics[k], rtol=1e-5, atol=1e-6, err_msg=k)
  loss_B, rewards_B, got_z0 = losses.kto_losses(*args, beta=beta, desirable_weight=wd, undesirable_weight=wu)
  assert loss_B.shape == rewards_B.shape == (len(pol),)
  np.testing.assert_allclose(float(got_z0), z0, rtol=1e-5, atol=1e-6)


def test_kto_gradients_and_the_reference_point():
  """Desirable answers' log-probs are pushed up, undesirable ones down, by β·λ·σ'(h) (z0 a constant); z0 and the
  mismatched answers' log-probs get no gradient. At policy == reference every loss is λ/2 and z0 = 0."""
  beta, wd, wu = 0.5, 1.0, 2.0
  for kl_shift in (3.0, -3.0):  # z0 > 0, and z0 clamped at 0
    pol, ref, pol_kl, ref_kl, label = _random(1, kl_shift, batch=16)
    _, _, z0 = _np_kto(pol, ref, pol_kl, ref_kl, label, beta, wd, wu)
    fn = lambda p, pk: losses.kto_loss_sum(p, ref, pk, ref_kl, label, beta=beta, desirable_weight=wd,
                                           undesirable_weight=wu)[0]
    g, g_kl = jax.grad(fn, argnums=(0, 1))(jnp.asarray(pol, jnp.float32), jnp.asarray(pol_kl, jnp.float32))
    g = np.asarray(g)
    assert (g[label] < 0).all() and (g[~label] > 0).all()
    assert not np.asarray(g_kl).any()  # z0 is a statistic, no gradient through it
    h = beta * (pol - ref - z0)
    s = _sigmoid(h) * (1 - _sigmoid(h))
    np.testing.assert_allclose(g, np.where(label, -wd * beta * s, wu * beta * s), rtol=1e-4, atol=1e-9)
  pol, _, pol_kl, _, label = _random(2, 0.0)
  loss_B, rewards_B, z0 = losses.kto_losses(pol, pol, pol_kl, pol_kl, label, beta=0.1, desirable_weight=wd,
                                            undesirable_weight=wu)
  np.testing.assert_allclose(np.asarray(loss_B), np.where(label, wd / 2, wu / 2), rtol=1e-6)
  assert float(z0) == 0.0 and not np.asarray(rewards_B).any()
  with pytest.raises(ValueError, match="unpaired"):
    losses.dpo_loss(pol, pol, pol, pol, beta=0.1, kind="kto")
  with pytest.raises(ValueError, match="undesirable_weight"):
    losses.kto_losses(pol, pol, pol, pol, label, beta=0.1, undesirable_weight=0.0)


def test_kto_task_loss_on_a_tiny_model():
  """The KTO task's loss and reference point on a hand-built batch against numpy KTO on log-probs taken from the
  model's logits by hand: the rows' sides, labels and the reference are wired as the loss expects."""
  cfg = model_lib.model_config("tiny", vocab_size=64, d_model=16, num_layers=1, num_heads=2, num_kv_heads=1,
                               head_dim=8, mlp_dim=32)
  params = model_lib.init(cfg, jax.random.key(0))
  reference = jax.tree.map(lambda x: x * 1.1, params)
  rng = np.random.default_rng(0)
  b, t = 4, 10
  batch = {"label": np.array([1, 0, 1, 0], np.float32)}
  for side in ("completion", "kl"):
    mask = np.zeros((b, t), np.float32)
    for i, start in enumerate((4, 5, 6, 3)):
      mask[i, start:t - i] = 1.0
    batch.update({f"{side}_inputs": rng.integers(0, 64, (b, t)), f"{side}_targets": rng.integers(0, 64, (b, t)),
                  f"{side}_loss_mask": mask, f"{side}_segment_ids": np.ones((b, t), np.int32),
                  f"{side}_positions": np.tile(np.arange(t), (b, 1))})
  config = ml_collections.ConfigDict({"stage": "dpo", "dpo": dict(
      kind="kto", beta=0.7, label_smoothing=0.0, gamma=0.0, rpo_alpha=0.0, cache_reference=False,
      kto_desirable_weight=1.0, kto_undesirable_weight=1.5)})
  task = tasks.make(config)
  assert type(task).__name__ == "KTO" and task.needs_reference

  forward = jax.jit(lambda p, inputs: model_lib.forward(cfg, p, inputs))

  def logps(p, side):  # Σ over answer tokens of log softmax at the target, by hand
    logp = np.asarray(jax.nn.log_softmax(forward(p, batch[f"{side}_inputs"]), axis=-1), np.float64)
    token = np.take_along_axis(logp, batch[f"{side}_targets"][..., None], axis=-1)[..., 0]
    return (token * batch[f"{side}_loss_mask"]).sum(-1)

  pol, pol_kl, ref, ref_kl = logps(params, "completion"), logps(params, "kl"), logps(reference, "completion"), \
      logps(reference, "kl")
  label = batch["label"] > 0
  want, _, z0 = _np_kto(pol, ref, pol_kl, ref_kl, label, 0.7, 1.0, 1.5)
  loss_fn = task.loss_fn(cfg)
  total, (count, sums) = jax.jit(loss_fn)(params, batch, {"reference": reference})
  assert int(count) == b
  np.testing.assert_allclose(float(total) / b, want, rtol=1e-5)
  assert z0 > 0  # the reference point is in play (not clamped) in this batch
  np.testing.assert_allclose(float(sums["kl"]) / b, z0, rtol=1e-5, atol=1e-6)


# --- options and a short run ------------------------------------------------------------------------


@pytest.mark.parametrize("overrides,message", [
    ({"dpo.label_smoothing": 0.1}, r"dpo\.label_smoothing: dpo\.kind=kto has no label-smoothed"),
    ({"dpo.gamma": 0.5}, r"dpo\.gamma: is SimPO's target margin; dpo\.kind=kto has none"),
    ({"dpo.rpo_alpha": 0.5}, r"dpo\.rpo_alpha: RPO adds the chosen answer's NLL to a pair's loss; dpo\.kind=kto"),
    ({"dpo.kto_undesirable_weight": 0.0}, r"dpo\.kto_undesirable_weight: must be > 0"),
    ({"lora.continue_delta": True}, r"lora\.continue_delta: the reference is the LoRA base"),
    ({"dpo.kind": "sigmoid", "dpo.kto_desirable_weight": 1.2},
     r"dpo\.kto_desirable_weight: weighs KTO's losses; dpo\.kind=sigmoid has none"),
])
def test_kto_options_are_checked_before_any_data(tmp_path, overrides, message):
  from configs import dpo

  c = dpo.get_config(f"size=tiny,kind=kto,init_from={tmp_path}").unlock()
  config_lib.validate(c, num_devices=1)  # kto with a LoRA base as the reference, cache or not
  c.dpo.cache_reference = True
  config_lib.validate(c, num_devices=1)
  for key, value in overrides.items():
    config_lib.override(c, key, value)
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(c, num_devices=1)


@pytest.fixture(scope="module")
def kto_jsonl(tmp_path_factory):
  """Unpaired examples about the synthetic grammar: each prompt once, with the right answer (desirable) or an
  unrelated sentence (undesirable)."""
  path = tmp_path_factory.mktemp("kto") / "kto.jsonl"
  rows = []
  for i in range(40):
    for j, a in enumerate(ANIMALS):
      good = (i + j) % 2 == 0
      rows.append({"prompt": f"what is the {a} number {i}?", "label": good,
                   "completion": f"the {a} is {i % 7}." if good else f"the {ANIMALS[(j + 1) % 5]} sees the moon."})
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  return path


def test_kto_run_starts_at_half_and_learns(pretrained, corpus_dir, kto_jsonl, tmp_path):
  """LoRA KTO with cached reference log-probs: at step 1 the policy is the reference (r = 0, z0 = 0), so every
  example loses λ/2 = 0.5 (a misaligned cache would not); the held-out loss then goes down, desirable rewards
  above undesirable ones."""
  c = tiny_config(corpus_dir, **{"train.steps": 8, "train.eval_every": 4, "train.checkpoint_every": 8,
                                 "train.num_samples": 0, "train.seq_len": 40, "optimizer.warmup_steps": 0}).unlock()
  c.stage, c.init_from = "dpo", pretrained
  c.data.sources, c.data.overlong, c.data.hard_fraction = str(kto_jsonl), "truncate", 0.5
  c.dpo = ml_collections.ConfigDict(dict(kind="kto", beta=0.5, label_smoothing=0.0, gamma=0.0, rpo_alpha=0.0,
                                         cache_reference=True, kto_desirable_weight=1.0, kto_undesirable_weight=1.0))
  c.lora.enabled, c.lora.rank, c.lora.alpha = True, 4, 8.0
  c.optimizer.learning_rate = 1e-2
  workdir = str(tmp_path / "kto")
  train.run(c, workdir)
  assert any(f.startswith("reference_logps-") for f in os.listdir(workdir))
  rows = metrics_lib.read_metrics(workdir)
  first = next(r for r in rows if r["step"] == 1 and "loss" in r)
  assert first["loss"] == pytest.approx(0.5, abs=1e-5) and first["kl"] == pytest.approx(0.0, abs=1e-5)
  evals = [r for r in rows if "eval/loss" in r]
  assert evals[0]["step"] == 0 and evals[0]["eval/loss"] == pytest.approx(0.5, abs=1e-6)
  print("KTO held-out:", [(r["step"], round(r["eval/loss"], 4), round(r["eval/rewards/margin"], 3),
                           round(r["eval/kl"], 3)) for r in evals])
  assert evals[-1]["eval/loss"] < 0.5 - 0.05
  assert evals[-1]["eval/rewards/desirable"] > evals[-1]["eval/rewards/undesirable"]
