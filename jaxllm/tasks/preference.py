"""Preference tuning (the DPO family) on (prompt, chosen, rejected) pairs: the loss of `dpo.kind` from
losses.PREFERENCE_LOSSES on the answers' log-probs, chosen and rejected rows in one forward pass. dpo.kind=kto
trains on unpaired labelled examples instead (`KTO`, which Preference(config) then is).

The reference is the run init_from names, frozen (frozen["reference"]; with LoRA, the base without the delta).
With dpo.cache_reference the reference's log-probs are computed once over the training pairs (KTO: examples, both
their sequences) and cached in WORKDIR/reference_logps-<key>.npz, keyed by everything that determines them (the
reference checkpoint, tokenizer, data, sequence length, kind), so a resumed run reuses them and a changed run
recomputes them; the train step then runs no reference forward pass (validation still computes the reference's
log-probs on the fly).
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
from jaxllm.tasks.lm import chunked_token_losses, logits


def side_logps(model_cfg: model_lib.ModelConfig, params, batch, *, sides, normalised: bool = False,
               chunk: int = 0):
  """One [B] answer log-prob per side of a batch (the `{side}_` rows), all sides in one forward pass; summed over
  answer tokens, or averaged with `normalised`; with `chunk`, through the chunked cross-entropy (no logits)."""
  rows = {k: jnp.concatenate([batch[f"{side}_{k}"] for side in sides]) for k in preference.FEATURES}
  if chunk:
    out_SB = -jnp.sum(chunked_token_losses(model_cfg, params, rows, chunk) * rows["loss_mask"], axis=-1)
    if normalised:
      out_SB = out_SB / jnp.maximum(losses.answer_lengths(rows["loss_mask"]), 1e-8)
  else:
    per_seq = losses.mean_sequence_logprobs if normalised else losses.sequence_logprobs
    out_SB = per_seq(logits(model_cfg, params, rows), rows["targets"], rows["loss_mask"])
  return tuple(jnp.split(out_SB, len(sides)))


def pair_logps(model_cfg: model_lib.ModelConfig, kind: str, params, batch, chunk: int = 0):
  """([B] chosen, [B] rejected) answer log-probs of a preference batch, both sides in one forward pass; summed
  over answer tokens, or averaged for a length-normalised kind."""
  return side_logps(model_cfg, params, batch, sides=preference.SIDES,
                    normalised=losses.PREFERENCE_LOSSES[kind].length_normalised, chunk=chunk)


class Preference(Task):
  stage = "dpo"
  chat = True
  counts_examples = True
  sequences_per_row = 2  # chosen + rejected
  host_only = ("pair_index", "margin")  # batch fields the step does not read
  sides = preference.SIDES  # the sequences of a row, each with a reference log-prob
  index_key = "pair_index"  # the row's place in the source: its entry in the reference cache
  unit = "pairs"

  def __new__(cls, config=None):
    """dpo.kind=kto reads unpaired examples: Preference(config) is then a KTO."""
    if cls is Preference and config is not None and config.dpo.get("kind") == "kto":
      cls = KTO
    return super().__new__(cls)

  def __init__(self, config):
    super().__init__(config)
    self.kind = losses.PREFERENCE_LOSSES[config.dpo.kind]
    self.needs_reference = self.kind.needs_reference
    self.cached = None  # reference log-probs of each side of every training record (dpo.cache_reference)

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
    weights = {key: d.get(key, 1.0) for key in ("kto_desirable_weight", "kto_undesirable_weight")}
    for key, w in weights.items():
      check(w > 0, f"dpo.{key}", f"must be > 0, got {w}")
      check(w == 1.0 or d.kind == "kto", f"dpo.{key}", f"weighs KTO's losses; dpo.kind={d.kind} has none")
    check(not d.rpo_alpha or kind.paired, "dpo.rpo_alpha",
          f"RPO adds the chosen answer's NLL to a pair's loss; dpo.kind={d.kind} has no pairs")
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
    """Drops the fields the step does not read (the rows' index); with the cache, adds the reference log-probs of
    a training batch's rows, ref_{side}_logps (the cache covers the training records; validation computes the
    reference's log-probs on the fly)."""
    out = {k: v for k, v in batch.items() if k not in self.host_only}
    if train and self.cached is not None:
      index = batch[self.index_key]
      out.update({f"ref_{side}_logps": cached[index] for side, cached in zip(self.sides, self.cached)})
    return out

  def reference_in_step(self):
    return self.needs_reference and not self.config.dpo.cache_reference

  def example(self, record, tokenizer):
    """One record's row, as the pipeline makes it (for the reference cache)."""
    return preference.make_pair_example(record, tokenizer, seq_len=self.config.train.seq_len,
                                        overlong=self.config.data.overlong)

  # ---- loss

  def loss_fn(self, model_cfg):
    d = self.config.dpo
    logps = functools.partial(pair_logps, model_cfg, d.kind, chunk=self.loss_chunk(model_cfg))
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
      log(f"reference log-probs of {len(train_source)} {self.unit} {'computed into' if computed else 'read from'} "
          f"{path}")

  def cache_reference(self, model_cfg, reference_params, pairs, tokenizer, workdir: str, reference_fingerprint: str):
    """Reads (or computes and writes) the reference log-probs of every training record (pair, or KTO example); the
    train batches carry them from then on. `reference_params` are the reference's params. Returns (path, computed)."""
    if jax.process_count() > 1:
      raise ValueError("dpo.cache_reference: supported in single-process runs only")
    key = self._cache_key(tokenizer.sha256, reference_fingerprint, len(pairs))
    path = os.path.join(workdir, f"reference_logps-{key}.npz")
    computed = not os.path.exists(path)
    if computed:
      values = self.reference_logps(model_cfg, reference_params, pairs, tokenizer)
      np.savez(path + ".tmp.npz", **dict(zip(self.sides, values)))
      os.replace(path + ".tmp.npz", path)
    with np.load(path) as f:
      self.cached = tuple(f[side] for side in self.sides)
    return path, computed

  def _cache_key(self, tokenizer_sha256: str, reference_fingerprint: str, num_pairs: int) -> str:
    c, d = self.config, self.config.data
    parts = [tokenizer_sha256, reference_fingerprint, d.sources, d.validation_fraction, d.hard_fraction, c.seed,
             d.overlong, c.train.seq_len, c.dpo.kind, c.lora.quantize_base, num_pairs]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]

  def reference_logps(self, model_cfg, reference_params, pairs, tokenizer) -> tuple[np.ndarray, ...]:
    """[N] reference log-probs of each side's answer (chosen and rejected; for KTO completion and kl) of every
    record, in the order of `pairs` (0 for records the pipeline drops)."""
    c = self.config
    fn = jax.jit(functools.partial(side_logps, model_cfg, sides=self.sides, normalised=self.kind.length_normalised))
    n, b = len(pairs), c.train.batch_size
    out = tuple(np.zeros(n, np.float32) for _ in self.sides)
    prefixes = tuple(f"{side}_" for side in self.sides)
    for start in range(0, n, b):
      rows = [self.example(pairs[i], tokenizer) for i in range(start, min(start + b, n))]
      kept = [i for i, r in enumerate(rows) if r["status"] in (sft.KEPT, sft.TRUNCATED)]
      if not kept:
        continue
      rows = [rows[i] for i in kept] + [rows[kept[0]]] * (b - len(kept))  # a fixed batch shape: one compile
      batch = {k: np.stack([r[k] for r in rows]) for k in rows[0] if k.startswith(prefixes)}
      for values, got in zip(out, jax.device_get(fn(reference_params, batch))):
        values[[start + i for i in kept]] = got[: len(kept)]
    return out


class KTO(Preference):
  """KTO (Ethayarajh et al. 2024), as TRL's KTOTrainer: unpaired examples, each an answer labelled desirable or
  undesirable (`preference.kto_examples`; pairs count as one of each), one example per row.

  The loss is losses.kto_loss_sum: r = log π(y|x) − log π_ref(y|x) of the row's answer against the reference point
  z0 = max(0, the micro-batch's mean log π(y'|x) − log π_ref(y'|x)) on its "kl" sequences (each row's prompt with a
  mismatched answer y'), weighted by dpo.kto_desirable_weight / dpo.kto_undesirable_weight. z0 is a statistic of
  the batch the loss sees: all its rows across data-parallel shards (TRL averages its per-device estimates over the
  devices), and with train.grad_accum > 1 each micro-batch's own (TRL's is per device batch too), so the
  accumulated loss is the sum of the micro-batches' losses, each with its own z0; changing grad_accum changes z0's
  sample. The policy's log-probs of the "kl" sequences carry no gradient and run in a forward pass of their own
  (no backward through them)."""
  sides = ("completion", "kl")  # the example's own sequence, and its prompt with a mismatched answer
  sequences_per_row = 2
  index_key = "example_index"
  host_only = ("example_index",)  # the step reads the labels
  unit = "examples"

  def load(self, split, bad):
    c = self.config
    return preference.kto_examples(c.data.sources, split, seed=c.seed, hard_fraction=c.data.hard_fraction,
                                   validation_fraction=c.data.validation_fraction, bad=bad)

  def texts(self, source):
    for i in range(len(source)):
      example = source[i]
      yield chat.render_text(example["prompt"] + [{"role": "assistant", "content": example["completion"]}])

  def shard(self, source, tokenizer, *, train, **common):
    return preference.kto_dataset(source, tokenizer, overlong=self.config.data.overlong, **common)

  def example(self, record, tokenizer):
    return preference.make_kto_example(record, tokenizer, seq_len=self.config.train.seq_len,
                                       overlong=self.config.data.overlong)

  def loss_fn(self, model_cfg):
    d = self.config.dpo
    weights = dict(beta=d.beta, desirable_weight=d.get("kto_desirable_weight", 1.0),
                   undesirable_weight=d.get("kto_undesirable_weight", 1.0))

    logps = functools.partial(side_logps, model_cfg, chunk=self.loss_chunk(model_cfg))

    def loss_fn(params, batch, frozen, rng=None):
      del rng
      (policy,) = logps(params, batch, sides=("completion",))
      (policy_kl,) = jax.lax.stop_gradient(logps(params, batch, sides=("kl",)))
      if "ref_completion_logps" in batch:  # precomputed once over the dataset (dpo.cache_reference)
        ref, ref_kl = batch["ref_completion_logps"], batch["ref_kl_logps"]
      else:
        ref, ref_kl = jax.lax.stop_gradient(logps(frozen["reference"], batch, sides=self.sides))
      total, count, sums = losses.kto_loss_sum(policy, ref, policy_kl, ref_kl, batch["label"], **weights)
      return total, (count, sums)

    return loss_fn
