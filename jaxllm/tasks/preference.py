"""Preference tuning (the DPO family) on (prompt, chosen, rejected) pairs: the loss of `dpo.kind` from
losses.PREFERENCE_LOSSES on the answers' log-probs, chosen and rejected rows in one forward pass.

The reference is the run init_from names, frozen (frozen["reference"]; with LoRA, the base without the delta).
With dpo.cache_reference the reference's log-probs are computed once over the training pairs and cached in
WORKDIR/reference_logps-<key>.npz, keyed by everything that determines them (the reference checkpoint, tokenizer,
data, sequence length, kind), so a resumed run reuses them and a changed run recomputes them; the train step then
runs no reference forward pass (validation still computes the reference's log-probs on the fly).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import losses, model as model_lib
from jaxllm.data import chat, preference, sft
from jaxllm.tasks.base import Task, check
from jaxllm.tasks.lm import logits


def pair_logps(model_cfg: model_lib.ModelConfig, kind: str, params, batch):
  """([B] chosen, [B] rejected) answer log-probs of a preference batch, both sides in one forward pass; summed
  over answer tokens, or averaged for a length-normalised kind."""
  both = {k: jnp.concatenate([batch["chosen_" + k], batch["rejected_" + k]]) for k in preference.FEATURES}
  normalised = losses.PREFERENCE_LOSSES[kind].length_normalised
  per_seq = losses.mean_sequence_logprobs if normalised else losses.sequence_logprobs
  out_2B = per_seq(logits(model_cfg, params, both), both["targets"], both["loss_mask"])
  b = batch["chosen_inputs"].shape[0]
  return out_2B[:b], out_2B[b:]


class Preference(Task):
  stage = "dpo"
  chat = True
  counts_examples = True
  sequences_per_row = 2  # chosen + rejected
  host_only = ("pair_index", "margin")  # batch fields the step does not read

  def __init__(self, config):
    super().__init__(config)
    self.kind = losses.PREFERENCE_LOSSES[config.dpo.kind]
    self.needs_reference = self.kind.needs_reference
    self.cached = None  # (chosen, rejected) reference log-probs of every training pair (dpo.cache_reference)

  @staticmethod
  def validate(config):
    d = config.dpo
    check(bool(config.init_from), "init_from", "DPO starts from a trained model (usually the SFT run)")
    check(d.kind in losses.PREFERENCE_LOSSES, "dpo.kind", f"{d.kind!r} is not one of {losses.DPO_KINDS}")
    check(d.beta > 0, "dpo.beta", f"must be > 0, got {d.beta}")
    check(d.rpo_alpha >= 0, "dpo.rpo_alpha", f"must be >= 0 (0 = off), got {d.rpo_alpha}")
    check(0 <= d.label_smoothing < 0.5, "dpo.label_smoothing", f"must be in [0, 0.5), got {d.label_smoothing}")
    kind = losses.PREFERENCE_LOSSES[d.kind]
    check(not d.label_smoothing or kind.label_smoothing, "dpo.label_smoothing",
          f"dpo.kind={d.kind} has no label-smoothed form (use sigmoid for cDPO)")
    check(not d.gamma or kind.margin, "dpo.gamma", f"is SimPO's target margin; dpo.kind={d.kind} has none")
    check(not d.cache_reference or kind.needs_reference, "dpo.cache_reference",
          f"dpo.kind={d.kind} uses no reference, so there is nothing to cache")
    check(config.data.get("overlong") in sft.OVERLONG_POLICIES, "data.overlong",
          f"{config.data.get('overlong')!r} is not one of {sft.OVERLONG_POLICIES}")

  # ---- data

  def load(self, split, bad):
    c = self.config
    return preference.pairs(c.data.sources, split, seed=c.seed, hard_fraction=c.data.hard_fraction,
                            validation_fraction=c.data.validation_fraction, bad=bad)

  def texts(self, source):
    for i in range(len(source)):
      pair = source[i]
      yield chat.render_text(pair["prompt"] + [{"role": "assistant", "content": pair["chosen"]}])

  def shard(self, source, tokenizer, *, train, **common):
    return preference.preference_dataset(source, tokenizer, overlong=self.config.data.overlong, **common)

  def device_batch(self, batch, *, train=True):
    """Drops the fields the step does not read (the pairs' index); with the cache, adds the reference log-probs of a training batch's pairs (the
    cache covers the training pairs; validation computes the reference's log-probs on the fly)."""
    out = {k: v for k, v in batch.items() if k not in self.host_only}
    if train and self.cached is not None:
      index = batch["pair_index"]
      out.update(ref_chosen_logps=self.cached[0][index], ref_rejected_logps=self.cached[1][index])
    return out

  # ---- loss

  def loss_fn(self, model_cfg):
    d = self.config.dpo
    logps = functools.partial(pair_logps, model_cfg, d.kind)
    needs_reference, normalised = self.needs_reference, self.kind.length_normalised

    def loss_fn(params, batch, frozen, rng=None):
      del rng
      chosen, rejected = logps(params, batch)
      ref_chosen = ref_rejected = None
      if "ref_chosen_logps" in batch:  # precomputed once over the dataset (dpo.cache_reference)
        ref_chosen, ref_rejected = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
      elif needs_reference:
        ref_chosen, ref_rejected = jax.lax.stop_gradient(logps(frozen["reference"], batch))
      total, count, sums = losses.dpo_loss_sum(chosen, rejected, ref_chosen, ref_rejected, beta=d.beta,
                                               kind=d.kind, label_smoothing=d.label_smoothing, gamma=d.gamma)
      if ref_chosen is not None:  # Σ log π(c) − log π_ref(c) on the data's chosen answers (losses.kl_estimate)
        sums["kl_estimate"] = jnp.sum(chosen - ref_chosen)
      if d.rpo_alpha:  # RPO (Pang et al. 2024): plus α times the chosen answer's per-token NLL
        tokens_B = jnp.maximum(losses.answer_lengths(batch["chosen_loss_mask"]), 1.0)
        nll_B = -chosen if normalised else -chosen / tokens_B
        total = total + d.rpo_alpha * jnp.sum(nll_B)
        sums["nll/chosen"] = jnp.sum(nll_B)
      return total, (count, sums)

    return loss_fn

  # ---- the reference cache

  def prepare(self, model_cfg, reference_params, train_source, tokenizer, workdir, reference_fingerprint, log=print):
    if self.config.dpo.cache_reference:
      path, computed = self.cache_reference(model_cfg, reference_params(), train_source, tokenizer, workdir,
                                            reference_fingerprint)
      log(f"reference log-probs of {len(train_source)} pairs {'computed into' if computed else 'read from'} {path}")

  def cache_reference(self, model_cfg, reference_params, pairs, tokenizer, workdir: str, reference_fingerprint: str):
    """Reads (or computes and writes) the reference log-probs of every training pair; the train batches carry
    them from then on. `reference_params` are the reference's params. Returns (path, computed)."""
    if jax.process_count() > 1:
      raise ValueError("dpo.cache_reference: supported in single-process runs only")
    key = self._cache_key(tokenizer.sha256, reference_fingerprint, len(pairs))
    path = os.path.join(workdir, f"reference_logps-{key}.npz")
    computed = not os.path.exists(path)
    if computed:
      chosen, rejected = self.reference_logps(model_cfg, reference_params, pairs, tokenizer)
      np.savez(path + ".tmp.npz", chosen=chosen, rejected=rejected)
      os.replace(path + ".tmp.npz", path)
    with np.load(path) as f:
      self.cached = f["chosen"], f["rejected"]
    return path, computed

  def _cache_key(self, tokenizer_sha256: str, reference_fingerprint: str, num_pairs: int) -> str:
    c, d = self.config, self.config.data
    parts = [tokenizer_sha256, reference_fingerprint, d.sources, d.validation_fraction, d.hard_fraction, c.seed,
             d.overlong, c.train.seq_len, c.dpo.kind, c.lora.quantize_base, num_pairs]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]

  def reference_logps(self, model_cfg, reference_params, pairs, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """[N] reference log-probs of the chosen and the rejected answer of every pair, in the order of `pairs`
    (0 for pairs the pipeline drops)."""
    c = self.config
    fn = jax.jit(functools.partial(pair_logps, model_cfg, c.dpo.kind))
    n, b = len(pairs), c.train.batch_size
    chosen, rejected = np.zeros(n, np.float32), np.zeros(n, np.float32)
    for start in range(0, n, b):
      rows = [preference.make_pair_example(pairs[i], tokenizer, seq_len=c.train.seq_len, overlong=c.data.overlong)
              for i in range(start, min(start + b, n))]
      kept = [i for i, r in enumerate(rows) if r["status"] in (sft.KEPT, sft.TRUNCATED)]
      if not kept:
        continue
      rows = [rows[i] for i in kept] + [rows[kept[0]]] * (b - len(kept))  # a fixed batch shape: one compile
      batch = {k: np.stack([r[k] for r in rows]) for k in rows[0] if k not in ("status", "pair_index")}
      ch, rj = jax.device_get(fn(reference_params, batch))
      chosen[[start + i for i in kept]] = ch[: len(kept)]
      rejected[[start + i for i in kept]] = rj[: len(kept)]
    return chosen, rejected
