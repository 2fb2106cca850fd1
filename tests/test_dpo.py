"""DPO, cDPO, IPO and SimPO losses against a float64 numpy computation, their fixed points and gradient signs,
and the exact tabular check of what DPO optimises: π ∝ π_ref·exp(r/β) under Bradley–Terry preferences."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxllm import losses


def _log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def _np_dpo(pc, pr, rc, rr, beta, kind, eps=0.0, gamma=0.0):
  """(loss, metrics) in float64, written from the papers' formulas."""
  if kind == "simpo":
    chosen, rejected = beta * pc, beta * pr
    h = beta * (pc - pr) - gamma
    loss = -(1 - eps) * _log_sigmoid(h) - eps * _log_sigmoid(-h)
  else:
    chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    margin = (pc - rc) - (pr - rr)
    if kind == "ipo":
      loss = (margin - 1 / (2 * beta)) ** 2
    else:
      loss = -(1 - eps) * _log_sigmoid(beta * margin) - eps * _log_sigmoid(-beta * margin)
  metrics = {"rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
             "rewards/margin": (chosen - rejected).mean(), "rewards/accuracy": np.where(chosen == rejected, 0.5, chosen > rejected).mean(),
             "logps/chosen": pc.mean(), "logps/rejected": pr.mean()}
  return loss.mean(), metrics


def _random_logps(seed, batch=64):
  rng = np.random.default_rng(seed)
  pc, pr = rng.normal(-30, 8, batch), rng.normal(-30, 8, batch)
  rc, rr = pc + rng.normal(0, 2, batch), pr + rng.normal(0, 2, batch)
  return pc, pr, rc, rr


@pytest.mark.parametrize("kind,beta,eps,gamma", [
    ("sigmoid", 0.1, 0.0, 0.0), ("sigmoid", 0.5, 0.0, 0.0), ("sigmoid", 0.1, 0.2, 0.0),
    ("ipo", 0.1, 0.0, 0.0), ("ipo", 1.0, 0.0, 0.0),
    ("simpo", 2.0, 0.0, 0.5), ("simpo", 2.5, 0.1, 1.0),
])
def test_losses_and_metrics_match_numpy(kind, beta, eps, gamma):
  pc, pr, rc, rr = _random_logps(0)
  if kind == "simpo":  # length-normalised log-probs: per-token averages
    pc, pr, rc, rr = pc / 20, pr / 25, None, None
  args = [None if x is None else jnp.asarray(x, jnp.float32) for x in (pc, pr, rc, rr)]
  loss, metrics = losses.dpo_loss(*args, beta=beta, kind=kind, label_smoothing=eps, gamma=gamma)
  want_loss, want_metrics = _np_dpo(pc, pr, rc, rr, beta, kind, eps, gamma)
  np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
  assert metrics.keys() == want_metrics.keys()
  for k in metrics:
    np.testing.assert_allclose(float(metrics[k]), want_metrics[k], rtol=1e-5, atol=1e-6, err_msg=k)
  assert 0.2 < float(metrics["rewards/accuracy"]) < 0.8  # both outcomes occur in the random data
  total, count, sums = losses.dpo_loss_sum(*args, beta=beta, kind=kind, label_smoothing=eps, gamma=gamma)
  assert float(count) == len(pc)
  np.testing.assert_allclose(float(total) / len(pc), float(loss), rtol=1e-6)
  per_pair, chosen, rejected = losses.dpo_losses(*args, beta=beta, kind=kind, label_smoothing=eps, gamma=gamma)
  assert per_pair.shape == chosen.shape == rejected.shape == (len(pc),)
  if kind != "simpo":
    np.testing.assert_allclose(float(losses.kl_estimate(args[0], args[2])), np.mean(pc - rc), rtol=1e-5)


def test_extreme_margins_are_finite():
  big = jnp.array([1e4, -1e4, 0.0])
  loss, _ = losses.dpo_loss(big, -big, jnp.zeros(3), jnp.zeros(3), beta=1.0)
  want = np.mean([0.0, 2e4, np.log(2)])  # -log σ(2e4) = 0, -log σ(-2e4) = 2e4
  np.testing.assert_allclose(float(loss), want, rtol=1e-6)
  grads = jax.grad(lambda x: losses.dpo_loss(x, -big, jnp.zeros(3), jnp.zeros(3), beta=1.0)[0])(big)
  assert np.isfinite(np.asarray(grads)).all()


def test_policy_equal_to_reference():
  """At step 0 (policy = reference) the DPO loss is log 2 whatever the log-probs, the rewards are 0 and the
  accuracy is 0.5: a tie counts as a coin flip. cDPO is also log 2; IPO is (1/(2β))²."""
  pc, pr, _, _ = _random_logps(1)
  for eps in (0.0, 0.1):
    loss, metrics = losses.dpo_loss(pc, pr, pc, pr, beta=0.1, label_smoothing=eps)
    np.testing.assert_allclose(float(loss), np.log(2.0), rtol=1e-6)
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margin"):
      assert float(metrics[k]) == 0.0, k
    assert float(metrics["rewards/accuracy"]) == 0.5
  loss, _ = losses.dpo_loss(pc, pr, pc, pr, beta=0.1, kind="ipo")
  np.testing.assert_allclose(float(loss), 25.0, rtol=1e-6)


@pytest.mark.parametrize("kind", ["sigmoid", "ipo", "simpo"])
def test_gradient_signs(kind):
  """Raising the chosen log-prob lowers the loss, raising the rejected one raises it, for every pair (for IPO
  while the margin is below its target 1/(2β))."""
  pc, pr, rc, rr = (jnp.asarray(x, jnp.float32) for x in _random_logps(2))
  if kind == "ipo":  # margin 1, inside the target margin 1/(2β) = 5
    pc, pr = rc + 1.0, rr
  fn = lambda pc, pr: losses.dpo_loss(pc, pr, rc, rr, beta=0.1, kind=kind)[0]
  d_chosen, d_rejected = jax.grad(fn, argnums=(0, 1))(pc, pr)
  assert (np.asarray(d_chosen) < 0).all() and (np.asarray(d_rejected) > 0).all()


def test_label_smoothing_fixed_point():
  """cDPO with ε pushes h = β·Δ towards log((1 − ε)/ε), not to infinity: the gradient vanishes there and changes
  sign across it."""
  eps, beta = 0.1, 0.5
  h_star = np.log((1 - eps) / eps)
  grad = jax.grad(lambda pc: losses.dpo_loss(pc, jnp.zeros(3), jnp.zeros(3), jnp.zeros(3), beta=beta,
                                             label_smoothing=eps)[0])
  g = np.asarray(grad(jnp.asarray([h_star - 1, h_star, h_star + 1], jnp.float32) / beta))
  assert g[0] < 0 and abs(g[1]) < 1e-6 and g[2] > 0


def test_argument_errors():
  x = jnp.zeros(2)
  with pytest.raises(ValueError, match="kind"):
    losses.dpo_loss(x, x, x, x, beta=0.1, kind="kto")
  with pytest.raises(ValueError, match="beta"):
    losses.dpo_loss(x, x, x, x, beta=0.0)
  with pytest.raises(ValueError, match="label_smoothing has no IPO"):
    losses.dpo_loss(x, x, x, x, beta=0.1, kind="ipo", label_smoothing=0.1)
  with pytest.raises(ValueError, match="gamma"):
    losses.dpo_loss(x, x, x, x, beta=0.1, gamma=0.5)
  with pytest.raises(ValueError, match="reference"):
    losses.dpo_loss(x, x, None, None, beta=0.1)
  losses.dpo_loss(x, x, None, None, beta=2.0, kind="simpo")  # SimPO needs no reference


def test_length_normalised_logprobs():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
  targets = rng.integers(0, 7, size=(2, 5))
  mask = np.array([[0, 1, 1, 1, 0], [0, 0, 0, 0, 0]], np.float32)
  args = jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask)
  np.testing.assert_array_equal(np.asarray(losses.answer_lengths(args[2])), [3.0, 0.0])
  total = np.asarray(losses.sequence_logprobs(*args))
  np.testing.assert_allclose(np.asarray(losses.mean_sequence_logprobs(*args)), [total[0] / 3, 0.0], rtol=1e-6)


# --- what DPO optimises --------------------------------------------------------------------------


def test_tabular_dpo_recovers_the_kl_regularised_optimum():
  """A policy over N = 16 responses (π = softmax θ), a reference π_ref and a reward r. Pairs (y1, y2) are
  uniform and y1 is preferred with the Bradley–Terry probability σ(r1 − r2). The expected DPO loss over all
  N×N ordered pairs, each weighted by its preference probability, is minimised exactly by
  π* = π_ref·exp(r/β)/Z (the KL-regularised reward maximiser); adam on `dpo_loss` must get there."""
  n, beta = 16, 0.5
  rng = np.random.default_rng(0)
  log_ref = jax.nn.log_softmax(jnp.asarray(rng.normal(size=n), jnp.float32))
  reward = jnp.asarray(rng.normal(size=n), jnp.float32)
  chosen, rejected = (a.ravel() for a in jnp.meshgrid(jnp.arange(n), jnp.arange(n), indexing="ij"))
  weight = jax.nn.sigmoid(reward[chosen] - reward[rejected]) / n ** 2  # P(sample (i, j)) · P(i ≻ j)
  one_pair = lambda pc, pr, rc, rr: losses.dpo_loss(pc[None], pr[None], rc[None], rr[None], beta=beta)[0]

  def expected_loss(theta):
    logp = jax.nn.log_softmax(theta)
    per_pair = jax.vmap(one_pair)(logp[chosen], logp[rejected], log_ref[chosen], log_ref[rejected])
    return jnp.sum(weight * per_pair)

  optimizer = optax.adam(0.05)

  @jax.jit
  def train(theta):
    def step(carry, _):
      theta, opt_state = carry
      grads = jax.grad(expected_loss)(theta)
      updates, opt_state = optimizer.update(grads, opt_state)
      return (optax.apply_updates(theta, updates), opt_state), None
    (theta, _), _ = jax.lax.scan(step, (theta, optimizer.init(theta)), None, length=3000)
    return theta

  start = time.perf_counter()
  theta = train(jnp.zeros(n))  # starts uniform, far from both π_ref and π*
  elapsed = time.perf_counter() - start
  policy = np.asarray(jax.nn.softmax(theta), np.float64)
  target = np.asarray(jax.nn.softmax(log_ref + reward / beta), np.float64)
  ref = np.exp(np.asarray(log_ref, np.float64))
  tv = 0.5 * np.abs(policy - target).sum()
  print(f"tabular DPO: TV(π, π*) = {tv:.2e} (TV(π_ref, π*) = {0.5 * np.abs(ref - target).sum():.3f}), "
        f"{elapsed:.2f} s")
  assert 0.5 * np.abs(ref - target).sum() > 0.2  # the check is not trivial
  assert tv < 0.02
  assert elapsed < 10


def _np_orpo(pc, pr, lam):
  """ORPO from Hong et al. 2024, eq. 6-7, in float64: L_SFT + λ·L_OR on per-token mean log-probs."""
  odds = lambda logp: np.log(np.exp(logp) / (1 - np.exp(logp)))
  return np.mean(-pc - lam * _log_sigmoid(odds(pc) - odds(pr)))


@pytest.mark.parametrize("lam", [0.1, 1.0])
def test_orpo_matches_the_paper_and_its_gradient_signs(lam):
  rng = np.random.default_rng(3)
  pc, pr = rng.uniform(-3.0, -0.05, 32), rng.uniform(-3.0, -0.05, 32)  # mean log-probs of answers
  loss, metrics = losses.dpo_loss(jnp.asarray(pc, jnp.float32), jnp.asarray(pr, jnp.float32), beta=lam, kind="orpo")
  np.testing.assert_allclose(float(loss), _np_orpo(pc, pr, lam), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["rewards/margin"]), lam * np.mean(pc - pr), rtol=1e-5)
  grad_c, grad_r = jax.grad(lambda c, r: losses.dpo_loss(c, r, beta=lam, kind="orpo")[0], argnums=(0, 1))(
      jnp.asarray(pc, jnp.float32), jnp.asarray(pr, jnp.float32))
  assert np.all(np.asarray(grad_c) < 0) and np.all(np.asarray(grad_r) > 0)  # raise chosen, lower rejected
  assert np.isfinite(float(losses.dpo_loss(jnp.zeros(2), jnp.full(2, -1.0), beta=lam, kind="orpo")[0]))
  with pytest.raises(ValueError, match="label_smoothing has no ORPO form"):
    losses.dpo_loss(jnp.asarray(pc), jnp.asarray(pr), beta=lam, kind="orpo", label_smoothing=0.1)


def test_rpo_adds_the_chosen_nll_to_the_preference_loss():
  """The Preference task's loss with dpo.rpo_alpha against DPO + α·(per-token NLL of the chosen answer), computed
  by hand from the same model's logits."""
  import ml_collections

  from jaxllm import model as model_lib, tasks

  cfg = model_lib.model_config("tiny", vocab_size=64, d_model=16, num_layers=1, num_heads=2, num_kv_heads=1,
                               head_dim=8, mlp_dim=32)
  params = model_lib.init(cfg, jax.random.key(0))
  reference = jax.tree.map(lambda x: x * 0.9, params)
  rng = np.random.default_rng(0)
  b, t = 3, 10
  batch = {}
  for side in ("chosen", "rejected"):
    mask = np.zeros((b, t), np.float32)
    for i, start in enumerate((4, 5, 6)):
      mask[i, start:t - i] = 1.0  # answers of 6, 4 and 2 tokens
    batch.update({f"{side}_inputs": rng.integers(0, 64, (b, t)), f"{side}_targets": rng.integers(0, 64, (b, t)),
                  f"{side}_loss_mask": mask, f"{side}_segment_ids": np.ones((b, t), np.int32),
                  f"{side}_positions": np.tile(np.arange(t), (b, 1))})
  config = ml_collections.ConfigDict({"stage": "dpo", "dpo": dict(kind="sigmoid", beta=0.3, label_smoothing=0.0,
                                                                  gamma=0.0, rpo_alpha=0.0, cache_reference=False)})
  plain = jax.jit(tasks.make(config).loss_fn(cfg))(params, batch, {"reference": reference})
  config.dpo.rpo_alpha = 0.7
  total, (count, sums) = jax.jit(tasks.make(config).loss_fn(cfg))(params, batch, {"reference": reference})
  logits = jax.jit(model_lib.forward, static_argnums=0)(cfg, params, batch["chosen_inputs"])
  logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
  token_logp = np.take_along_axis(logp, batch["chosen_targets"][..., None], axis=-1)[..., 0]
  mask = batch["chosen_loss_mask"]
  nll = -(token_logp * mask).sum(-1) / mask.sum(-1)
  np.testing.assert_allclose(float(sums["nll/chosen"]), nll.sum(), rtol=1e-5)
  np.testing.assert_allclose(float(total), float(plain[0]) + 0.7 * nll.sum(), rtol=1e-5)
  assert int(count) == b
