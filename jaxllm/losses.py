"""Losses. B batch, T length, V vocab.

Every loss here has a "sum" form (`(sum of weighted losses, sum of weights)`) so that gradient accumulation and
data-parallel reduction divide by the total weight of the whole batch, exactly as one big batch would.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp


def token_losses(logits_BxTxV, targets_BxT, *, z_loss: float = 0.0):
  """Per-token cross-entropy (+ z_loss·logsumexp² if z_loss > 0), float32 [B, T]."""
  logits_BxTxV = logits_BxTxV.astype(jnp.float32)
  lse_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1)
  target_logit_BxT = jnp.take_along_axis(logits_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
  loss_BxT = lse_BxT - target_logit_BxT
  if z_loss:
    loss_BxT = loss_BxT + z_loss * lse_BxT ** 2
  return loss_BxT


def chunked_token_losses(hidden_BxTxD, w_DxV, targets_BxT, *, chunk: int, z_loss: float = 0.0):
  """token_losses of the logits hidden · w, float32 [B, T], without ever holding [B, T, V] logits: the sequence
  goes through in slices of about chunk / B positions (every row at once, the last slice padded), each slice's
  [B, slice, V] logits made, reduced to its losses and dropped, and made again in the backward pass
  (jax.checkpoint), which then needs only the hidden states. Slicing the sequence, not the batch, keeps the rows
  where the batch sharding put them (a data-parallel step stays one). The matmul is in the hidden states' dtype,
  as the model's own logits."""
  b, t, d = hidden_BxTxD.shape
  c = max(1, min(chunk // b, t))
  pad = -t % c
  h_NxBxCxD = jnp.pad(hidden_BxTxD, ((0, 0), (0, pad), (0, 0))).reshape(b, -1, c, d).swapaxes(0, 1)
  targets_NxBxC = jnp.pad(targets_BxT, ((0, 0), (0, pad))).reshape(b, -1, c).swapaxes(0, 1)
  w = w_DxV.astype(hidden_BxTxD.dtype)

  @jax.checkpoint
  def one(args):
    h_BxCxD, t_BxC = args
    logits_BxCxV = jnp.einsum("bcd,dv->bcv", h_BxCxD, w).astype(jnp.float32)
    return token_losses(logits_BxCxV, t_BxC, z_loss=z_loss)

  losses_NxBxC = jax.lax.map(one, (h_NxBxCxD, targets_NxBxC))
  return losses_NxBxC.swapaxes(0, 1).reshape(b, -1)[:, :t]


def next_token_loss_sum(logits_BxTxV, targets_BxT, mask_BxT, *, z_loss: float = 0.0):
  """(Σ mask·loss, Σ mask). `targets` are the inputs shifted by one (the data pipeline does the shift)."""
  mask_BxT = mask_BxT.astype(jnp.float32)
  loss_BxT = token_losses(logits_BxTxV, targets_BxT, z_loss=z_loss)
  return jnp.sum(jnp.where(mask_BxT > 0, loss_BxT, 0.0) * mask_BxT), jnp.sum(mask_BxT)


def next_token_loss(logits_BxTxV, targets_BxT, mask_BxT, *, z_loss: float = 0.0):
  """Mean cross-entropy over the tokens where mask > 0, weighted by mask (padding and cross-document
  targets have mask 0). Returns 0 when the mask is all zero."""
  total, weight = next_token_loss_sum(logits_BxTxV, targets_BxT, mask_BxT, z_loss=z_loss)
  return total / jnp.maximum(weight, 1e-8)


def sequence_logprobs(logits_BxTxV, targets_BxT, mask_BxT):
  """Σ over tokens of mask·log p(target): the log-probability of each row's masked tokens, [B]."""
  return -jnp.sum(token_losses(logits_BxTxV, targets_BxT) * mask_BxT, axis=-1)


# ------------------------------------------------------------------------------------- preference losses
# B here is the number of (chosen, rejected) pairs; every *_logps argument is float [B].



def answer_lengths(mask_BxT):
  """Σ mask per row: the number of answer tokens of each sequence, float32 [B]."""
  return jnp.sum(mask_BxT.astype(jnp.float32), axis=-1)


def mean_sequence_logprobs(logits_BxTxV, targets_BxT, mask_BxT):
  """`sequence_logprobs` divided by the answer length: the per-token average log-prob that SimPO compares
  (0 for a row with an all-zero mask), [B]."""
  return sequence_logprobs(logits_BxTxV, targets_BxT, mask_BxT) / jnp.maximum(answer_lengths(mask_BxT), 1e-8)


def _sigmoid(chosen_B, rejected_B, *, beta, label_smoothing, gamma):
  """DPO (cDPO with label smoothing ε; SimPO's target margin γ): −(1 − ε)·log σ(h) − ε·log σ(−h), h = β·Δ − γ."""
  h_B = beta * (chosen_B - rejected_B) - gamma
  return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(h_B) - label_smoothing * jax.nn.log_sigmoid(-h_B)


def _ipo(chosen_B, rejected_B, *, beta, label_smoothing, gamma):
  """IPO (Azar et al. 2023, eq. 17, with β as their τ; also TRL's convention): (Δ − 1/(2β))²."""
  del label_smoothing, gamma
  return ((chosen_B - rejected_B) - 1.0 / (2.0 * beta)) ** 2


def _orpo(chosen_B, rejected_B, *, beta, label_smoothing, gamma):
  """ORPO (Hong et al. 2024, eq. 6-7) on per-token mean log-probs: the chosen answer's NLL plus
  λ·(−log σ(log odds(c) − log odds(r))), log odds(y) = log p − log(1 − p) with log p the mean log-prob; β is λ."""
  del label_smoothing, gamma
  log_odds = lambda logp: logp - jnp.log(-jnp.expm1(jnp.minimum(logp, -1e-6)))  # p < 1: a finite log(1 − p)
  return -chosen_B - beta * jax.nn.log_sigmoid(log_odds(chosen_B) - log_odds(rejected_B))


def _kto(logratio_B, desirable_B, z0, *, beta, desirable_weight, undesirable_weight):
  """KTO (Ethayarajh et al. 2024, eq. 7; TRL's KTOTrainer): λ_D·(1 − σ(β(r − z0))) for a desirable answer,
  λ_U·(1 − σ(β(z0 − r))) for an undesirable one; r the answer's log-ratio, z0 the reference point."""
  h_B = beta * (logratio_B - z0)
  return jnp.where(desirable_B, desirable_weight * jax.nn.sigmoid(-h_B), undesirable_weight * jax.nn.sigmoid(h_B))


@dataclasses.dataclass(frozen=True)
class PreferenceLoss:
  """One kind of preference loss: the per-pair loss of the chosen and rejected answers' scores (log-ratios to the
  reference, or the policy's own log-probs without one; Δ = chosen − rejected), and what those scores are."""
  fn: Callable              # (chosen_B, rejected_B, *, beta, label_smoothing, gamma) -> loss_B
  needs_reference: bool     # Δ of log-ratios to a frozen reference (else of the policy's log-probs alone)
  length_normalised: bool   # log-probs averaged over answer tokens (else summed)
  label_smoothing: bool = True  # has a label-smoothed form
  margin: bool = False      # takes a target margin γ
  paired: bool = True       # (chosen, rejected) pairs; False: unpaired labelled examples (kto: its fn is _kto)


# The kinds `dpo.kind` chooses from. A new kind is one entry here, its formula above, and a test.
PREFERENCE_LOSSES = {
    "sigmoid": PreferenceLoss(_sigmoid, needs_reference=True, length_normalised=False),
    "ipo": PreferenceLoss(_ipo, needs_reference=True, length_normalised=False, label_smoothing=False),
    "simpo": PreferenceLoss(_sigmoid, needs_reference=False, length_normalised=True, margin=True),
    "orpo": PreferenceLoss(_orpo, needs_reference=False, length_normalised=True, label_smoothing=False),
    "kto": PreferenceLoss(_kto, needs_reference=True, length_normalised=False, label_smoothing=False, paired=False),
}
DPO_KINDS = tuple(PREFERENCE_LOSSES)


def dpo_losses(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None, *,
               beta, kind="sigmoid", label_smoothing=0.0, gamma=0.0):
  """Per-pair losses and implicit rewards: (loss_B, chosen_rewards_B, rejected_rewards_B), float32.

  With π·/ref· the policy/reference log-probs of the chosen (c) and rejected (r) answers, the log-ratio
  margin Δ = (πc − refc) − (πr − refr) and ε = label_smoothing:
    sigmoid  DPO (cDPO if ε > 0):  h = β·Δ,  loss = −(1 − ε)·log σ(h) − ε·log σ(−h)
    ipo      IPO (Azar et al. 2023, eq. 17, with β as their τ; also TRL's convention):  loss = (Δ − 1/(2β))².
             TRL divides the log-probs by the answer length for IPO; here the caller chooses what to pass.
    simpo    SimPO (Meng et al. 2024): pass length-normalised policy log-probs (`mean_sequence_logprobs`); no
             reference (its arguments are ignored and may be None).  h = β·(πc − πr) − γ, loss as sigmoid.
    orpo     ORPO (Hong et al. 2024): length-normalised log-probs, no reference; −πc − β·log σ(odds(c) − odds(r))
             with odds(y) = log(p/(1 − p)), p = exp(πy): the chosen answer's NLL plus β times the odds-ratio term.
  Rewards are β·(π − ref) (β·π without a reference). `gamma` is SimPO's target margin; label smoothing has no
  IPO form. The kinds are the entries of PREFERENCE_LOSSES.
  """
  if kind not in PREFERENCE_LOSSES:
    raise ValueError(f"dpo kind must be one of {DPO_KINDS}, got {kind!r}")
  spec = PREFERENCE_LOSSES[kind]
  if not spec.paired:
    raise ValueError(f"dpo kind {kind!r} is unpaired (one labelled answer per example): use kto_loss_sum")
  if isinstance(beta, (int, float)) and beta <= 0:
    raise ValueError(f"dpo beta must be > 0, got {beta}")
  if not 0.0 <= label_smoothing <= 0.5:
    raise ValueError(f"dpo label_smoothing must be in [0, 0.5], got {label_smoothing}")
  if label_smoothing and not spec.label_smoothing:
    raise ValueError(f"dpo label_smoothing has no {kind.upper()} form (use kind='sigmoid' for cDPO)")
  if gamma and not spec.margin:
    raise ValueError(f"dpo gamma is SimPO's target margin; kind {kind!r} has none")
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  pc_B, pr_B = f32(policy_chosen_logps), f32(policy_rejected_logps)
  if not spec.needs_reference:
    chosen_B, rejected_B = pc_B, pr_B
  else:
    if ref_chosen_logps is None or ref_rejected_logps is None:
      raise ValueError(f"dpo kind {kind!r} needs the reference log-probs")
    chosen_B, rejected_B = pc_B - f32(ref_chosen_logps), pr_B - f32(ref_rejected_logps)
  loss_B = spec.fn(chosen_B, rejected_B, beta=beta, label_smoothing=label_smoothing, gamma=gamma)
  return loss_B, beta * chosen_B, beta * rejected_B


def dpo_loss_sum(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None,
                 *, beta, kind="sigmoid", label_smoothing=0.0, gamma=0.0):
  """(Σ loss, number of pairs, {metric: Σ over pairs}): the sum form of `dpo_loss` (same metrics)."""
  loss_B, chosen_B, rejected_B = dpo_losses(
      policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=beta, kind=kind,
      label_smoothing=label_smoothing, gamma=gamma)
  sums = {
      "rewards/chosen": jnp.sum(chosen_B),
      "rewards/rejected": jnp.sum(rejected_B),
      "rewards/margin": jnp.sum(chosen_B - rejected_B),
      # a tie (e.g. policy == reference at step 0) counts as a coin flip: 0.5
      "rewards/accuracy": jnp.sum(jnp.where(chosen_B == rejected_B, 0.5, (chosen_B > rejected_B).astype(jnp.float32))),
      "logps/chosen": jnp.sum(jnp.asarray(policy_chosen_logps, jnp.float32)),
      "logps/rejected": jnp.sum(jnp.asarray(policy_rejected_logps, jnp.float32)),
  }
  return jnp.sum(loss_B), jnp.float32(loss_B.shape[0]), sums


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None, *,
             beta, kind="sigmoid", label_smoothing=0.0, gamma=0.0):
  """Mean preference loss over the B pairs and its metrics (means over the pairs): `(loss, metrics)`.

  Inputs are [B] sequence log-probs of the answers (`sequence_logprobs` over answer tokens; length-normalised
  for simpo). See `dpo_losses` for the kinds. Metrics: rewards/chosen and rewards/rejected (β·(π − ref), or β·π
  for simpo), rewards/margin (their difference), rewards/accuracy (fraction of pairs whose chosen reward is
  greater; a tie, e.g. policy == reference at step 0, counts as 0.5), logps/chosen, logps/rejected.
  """
  total, count, sums = dpo_loss_sum(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                    ref_rejected_logps, beta=beta, kind=kind, label_smoothing=label_smoothing,
                                    gamma=gamma)
  return total / count, {k: v / count for k, v in sums.items()}


def kl_estimate(policy_chosen_logps, ref_chosen_logps):
  """Mean over the batch of log π(c) − log π_ref(c) on the chosen answers of the data.

  A sequence-level log-ratio measured on the dataset's answers, not KL(π‖π_ref): that needs answers sampled
  from π, which an offline step does not have. It tracks how far the policy has moved on the data (it is
  rewards/chosen / β for sigmoid and ipo) and can be negative.
  """
  return jnp.mean(jnp.asarray(policy_chosen_logps, jnp.float32) - jnp.asarray(ref_chosen_logps, jnp.float32))


# ------------------------------------------------------------------------------------------------ KTO
# B here is the number of unpaired examples: one answer each, labelled desirable or undesirable.


def kto_losses(policy_logps, ref_logps, policy_kl_logps, ref_kl_logps, desirable, *, beta,
               desirable_weight=1.0, undesirable_weight=1.0):
  """Per-example KTO losses (Ethayarajh et al. 2024, eq. 7, as TRL's KTOTrainer): (loss_B, rewards_B, z0).

  r = log π(y|x) − log π_ref(y|x) of each example's answer (`*_logps`, summed over its tokens). The reference
  point z0 = max(0, mean over the B examples of log π(y'|x) − log π_ref(y'|x)), `*_kl_logps`: the same prompts with
  mismatched answers y' (another example's), an estimate of KL(π‖π_ref); it is a batch statistic and carries no
  gradient. A desirable example (`desirable` true) loses λ_D·(1 − σ(β(r − z0))), an undesirable one
  λ_U·(1 − σ(β(z0 − r))). Rewards are β·r. Under gradient accumulation the caller passes one micro-batch, so z0 is
  that micro-batch's (TRL estimates it per device batch and averages over the devices).
  """
  if isinstance(beta, (int, float)) and beta <= 0:
    raise ValueError(f"kto beta must be > 0, got {beta}")
  for name, w in (("desirable_weight", desirable_weight), ("undesirable_weight", undesirable_weight)):
    if isinstance(w, (int, float)) and w <= 0:
      raise ValueError(f"kto {name} must be > 0, got {w}")
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  logratio_B = f32(policy_logps) - f32(ref_logps)
  kl = jnp.mean(f32(policy_kl_logps) - f32(ref_kl_logps))
  z0 = jax.lax.stop_gradient(jnp.maximum(kl, 0.0))
  desirable_B = jnp.asarray(desirable) > 0
  loss_B = _kto(logratio_B, desirable_B, z0, beta=beta, desirable_weight=desirable_weight,
                undesirable_weight=undesirable_weight)
  return loss_B, beta * logratio_B, z0


def kto_loss_sum(policy_logps, ref_logps, policy_kl_logps, ref_kl_logps, desirable, *, beta,
                 desirable_weight=1.0, undesirable_weight=1.0):
  """(Σ loss, number of examples, {metric: Σ}): the sum form of KTO, so that Σ / number is the paper's mean over
  examples (TRL's too: the λ weight the losses, not the denominator).

  Metrics, per example like the loss: kl (z0), and, as TRL logs them, the means over this batch's desirable
  (undesirable) examples of the reward β·r and of log π(y|x): rewards/desirable, rewards/undesirable (0 for a
  batch without such examples), rewards/margin (their difference), logps/desirable, logps/undesirable. The batch
  statistics enter the sums as B × the statistic, so Σ / number averages them over micro-batches.
  """
  loss_B, rewards_B, z0 = kto_losses(policy_logps, ref_logps, policy_kl_logps, ref_kl_logps, desirable, beta=beta,
                                     desirable_weight=desirable_weight, undesirable_weight=undesirable_weight)
  count = jnp.float32(loss_B.shape[0])
  d_B = (jnp.asarray(desirable) > 0).astype(jnp.float32)
  mean_over = lambda x_B, w_B: jnp.sum(x_B * w_B) / jnp.maximum(jnp.sum(w_B), 1.0)
  logps_B = jnp.asarray(policy_logps, jnp.float32)
  desirable_reward, undesirable_reward = mean_over(rewards_B, d_B), mean_over(rewards_B, 1.0 - d_B)
  stats = {"kl": z0, "rewards/desirable": desirable_reward, "rewards/undesirable": undesirable_reward,
           "rewards/margin": desirable_reward - undesirable_reward, "logps/desirable": mean_over(logps_B, d_B),
           "logps/undesirable": mean_over(logps_B, 1.0 - d_B)}
  return jnp.sum(loss_B), count, {k: count * v for k, v in stats.items()}
