"""A reward model on (prompt, chosen, rejected) pairs: the Bradley-Terry loss −log σ(r_chosen − r_rejected − m).

The score r of an answer is read at its last token (the position whose next token is <|end|>, or the last answer
token of a truncated answer): r = h·w, h the final normalised hidden state there and w the output-embedding
column of <|end|>. That is a linear score head on the final hidden state, as LlamaForSequenceClassification's
`score`, that needs no parameter beyond the language model's: full and LoRA fine-tuning, checkpoints, resume
and export work as for any run, and it starts from the SFT model's "this answer is complete" logit.

Options (the `reward` section): a per-pair margin m from the data (a JSONL "margin" field, Llama 2's margin
loss; 0 when absent) and reward.center_coef·(r_chosen + r_rejected)², which keeps the scores centred at 0
(Eisenstein et al. 2023). Validation logs eval/accuracy (share of pairs with r_chosen > r_rejected; a tie
counts 0.5) and eval/margin (mean r_chosen − r_rejected).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import generate, model as model_lib
from jaxllm.data import chat
from jaxllm.tasks.base import check
from jaxllm.tasks.lm import logits
from jaxllm.tasks.preference import Preference


def last_answer_index(mask_BxT):
  """[B] position of each row's last answer token: the last position whose loss-mask weight is > 0."""
  positions = jnp.arange(mask_BxT.shape[-1])
  return jnp.max(jnp.where(mask_BxT > 0, positions, -1), axis=-1)


def scores(model_cfg: model_lib.ModelConfig, params, batch: dict, end_id: int):
  """([B] chosen, [B] rejected) scores of a preference batch, both sides in one forward pass."""
  both = {k: jnp.concatenate([batch["chosen_" + k], batch["rejected_" + k]])
          for k in ("inputs", "segment_ids", "positions", "loss_mask")}
  index_2B = last_answer_index(both["loss_mask"])
  # the <|end|> logit at each row's last answer token: h·w_end. (A full logits pass; at large vocabularies the
  # hidden state alone would do.)
  out_2BxTxV = logits(model_cfg, params, both)
  score_2B = jnp.take_along_axis(out_2BxTxV[..., end_id], index_2B[:, None], axis=1)[:, 0].astype(jnp.float32)
  b = batch["chosen_inputs"].shape[0]
  return score_2B[:b], score_2B[b:]


@functools.partial(jax.jit, static_argnames=("cfg",))
def _end_scores(cfg, params, inputs_BxT, lengths_B, score_id):
  t = inputs_BxT.shape[1]
  real_BxT = (jnp.arange(t)[None] < lengths_B[:, None]).astype(jnp.int32)
  out_BxTxV = model_lib.forward(cfg, params, inputs_BxT, real_BxT, jnp.arange(t)[None] * real_BxT)
  return jnp.take_along_axis(out_BxTxV[..., score_id], (lengths_B - 1)[:, None], axis=1)[:, 0].astype(jnp.float32)


def score_sequences(cfg: model_lib.ModelConfig, params, sequences: list[list[int]], score_id: int, *,
                    batch_size: int = 16, length: int = 0, mesh=None) -> np.ndarray:
  """[N] scores of token sequences (a prompt and an answer without its <|end|>), each read at its last token as in
  training; right-padded to `length` (at least the longest) in batches of `batch_size`: one compiled program.
  With a `mesh` (params `generate.replicate`d on it), each batch's rows are split over its devices."""
  length = max([length, *(len(s) for s in sequences)])
  batch_size = generate.pad_rows(batch_size, mesh)
  out = np.zeros(len(sequences), np.float32)
  for start in range(0, len(sequences), batch_size):
    rows = sequences[start:start + batch_size]
    buf = np.zeros((batch_size, length), np.int32)
    lengths = np.ones(batch_size, np.int32)  # the batch's padding rows: one token, discarded
    for i, ids in enumerate(rows):
      buf[i, :len(ids)], lengths[i] = ids, len(ids)
    buf, lengths = generate.put_rows((buf, lengths), mesh)
    out[start:start + len(rows)] = np.asarray(_end_scores(cfg, params, buf, lengths, score_id))[:len(rows)]
  return out


def bradley_terry_sum(chosen_B, rejected_B, margin_B=None, center_coef: float = 0.0):
  """(Σ loss, number of pairs, {metric: Σ}): −log σ(r_c − r_r − m) + center_coef·(r_c + r_r)² per pair."""
  diff_B = chosen_B - rejected_B - (0.0 if margin_B is None else margin_B)
  loss_B = -jax.nn.log_sigmoid(diff_B) + center_coef * (chosen_B + rejected_B) ** 2
  gap_B = chosen_B - rejected_B
  sums = {"accuracy": jnp.sum(jnp.where(gap_B == 0, 0.5, (gap_B > 0).astype(jnp.float32))),
          "margin": jnp.sum(gap_B), "scores/chosen": jnp.sum(chosen_B), "scores/rejected": jnp.sum(rejected_B)}
  return jnp.sum(loss_B), jnp.float32(loss_B.shape[0]), sums


class Reward(Preference):
  """The pairs' data as for DPO (Preference); the loss on scores instead of log-probs, and no reference."""
  stage = "reward"
  score_token = chat.DEFAULT_TEMPLATE.end
  host_only = ("pair_index",)  # the step reads the pairs' margins

  def __init__(self, config):  # no dpo section: nothing of Preference's loss is used
    self.config, self.needs_reference, self.cached, self.end_id = config, False, None, None

  @staticmethod
  def validate(config):
    check(bool(config.init_from), "init_from", "a reward model starts from a trained model (usually the SFT run)")
    check(config.reward.center_coef >= 0, "reward.center_coef", f"must be >= 0, got {config.reward.center_coef}")
    check(config.data.get("overlong") in ("truncate", "drop"), "data.overlong",
          f"{config.data.get('overlong')!r} is not one of ('truncate', 'drop')")

  def check_tokenizer(self, tokenizer):
    super().check_tokenizer(tokenizer)
    self.end_id = tokenizer.token_id(self.score_token)  # the score head's column

  def prepare(self, *args, **kwargs):
    pass  # no reference, nothing to cache

  def loss_fn(self, model_cfg):
    end_id, center = self.end_id, self.config.reward.center_coef
    assert end_id is not None, "check_tokenizer runs before the loss is built"

    def loss_fn(params, batch, frozen, rng=None):
      del frozen, rng
      chosen, rejected = scores(model_cfg, params, batch, end_id)
      total, count, sums = bradley_terry_sum(chosen, rejected, batch.get("margin"), center)
      return total, (count, sums)

    return loss_fn

  def samples(self, model_cfg, params, tokenizer):
    return []  # a reward model scores answers; it does not write them
