"""Scoring a run's model on text, as benchmark harnesses ask it (lm-evaluation-harness's `loglikelihood` and
`loglikelihood_rolling` requests).

  scorer = evaluation.Scorer.from_run("runs/sft_tiny")         # a full, LoRA (merged) or imported HF run
  scorer.loglikelihood([("The capital of France is", " Paris")])  # [(Σ log p(continuation | context), greedy?)]
  scorer.loglikelihood_rolling(["a long text ..."])              # [Σ log p(text)], every token predicted once

Tokenization follows lm-evaluation-harness: trailing spaces of the context move to the continuation, the context
alone is encoded, the continuation's tokens are those of encoding context + continuation after as many tokens as
the context has (where a token straddles the boundary, the two encodings differ there and the model reads the
context's own tokens, then the rest), and an empty context is the BOS token. Requests are sorted by length and
batched in buckets of powers of two (at least 32 tokens, at most `max_length`): one compiled program per bucket.
A request longer than `max_length` keeps its last `max_length` + 1 tokens (the context is cut from the left).
Runs on the default device (one process, no mesh yet).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import model as model_lib, runs

MIN_BUCKET = 32


@functools.partial(jax.jit, static_argnames=("cfg",))
def _score(cfg, params, inputs_BxT, targets_BxT, mask_BxT):
  """([B] Σ masked target log-probs, [B] whether every masked target is the argmax)."""
  t = inputs_BxT.shape[1]
  real_BxT = (mask_BxT > 0) | (jnp.cumsum(mask_BxT[:, ::-1], axis=1)[:, ::-1] > 0)  # up to the last scored token
  segment_BxT = real_BxT.astype(jnp.int32)
  logits_BxTxV = model_lib.forward(cfg, params, inputs_BxT, segment_BxT, jnp.arange(t)[None] * segment_BxT)
  logp_BxTxV = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
  target_logp_BxT = jnp.take_along_axis(logp_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
  greedy_BxT = jnp.argmax(logp_BxTxV, axis=-1) == targets_BxT
  return jnp.sum(target_logp_BxT * mask_BxT, axis=1), jnp.all(greedy_BxT | (mask_BxT == 0), axis=1)


def bucket(length: int, max_length: int) -> int:
  """The padded length of a row of `length` tokens: the next power of two, at least MIN_BUCKET, at most
  max_length."""
  return min(max(MIN_BUCKET, 1 << max(length - 1, 0).bit_length()), max_length)


def rolling_windows(n: int, max_length: int) -> list[tuple[int, int, int]]:
  """Windows (start, first_scored, end) over n tokens (token 0 is the BOS that is never scored): each window
  feeds tokens [start, end - 1) and scores the predictions of tokens [first_scored, end); together they score
  tokens 1 .. n-1 exactly once, each with as much of the preceding text as fits in max_length."""
  out, scored = [], 1
  while scored < n:
    end = min(scored + max_length, n)
    out.append((max(0, end - 1 - max_length), scored, end))
    scored = end
  return out


class Scorer:
  def __init__(self, cfg: model_lib.ModelConfig, params, tokenizer, *, max_length: int = 512, batch_size: int = 16):
    self.cfg, self.params, self.tok = cfg, params, tokenizer
    self.max_length, self.batch_size = max_length, batch_size

  @classmethod
  def from_run(cls, run_dir: str, step: int | None = None, **kwargs) -> "Scorer":
    """A run's newest (or `step`) checkpoint; max_length defaults to the run's train.seq_len."""
    kwargs.setdefault("max_length", runs.read_config(run_dir).get("train", {}).get("seq_len") or 512)
    return cls(*runs.load_run(run_dir, step), **kwargs)

  def split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-evaluation-harness splits them (see the module doc); trailing spaces
    of the context move to the continuation, as there."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
      context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = self.tok.encode(context + continuation)
    context_ids = self.tok.encode(context) if context else []
    if not context_ids:
      return [self.tok.bos_id], whole
    return context_ids, whole[len(context_ids):]

  def _rows(self, rows: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
    """Scores rows (token ids, number of final tokens to score), batched by bucket; results in input order."""
    out: list = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    for start in range(0, len(order), self.batch_size):
      chunk = order[start:start + self.batch_size]
      width = bucket(max(len(rows[i][0]) - 1 for i in chunk), self.max_length)
      inputs = np.zeros((self.batch_size, width), np.int32)
      targets = np.zeros((self.batch_size, width), np.int32)
      mask = np.zeros((self.batch_size, width), np.float32)
      for r, i in enumerate(chunk):
        ids, scored = rows[i]
        ids = ids[-(width + 1):]  # the context is cut from the left
        n = len(ids) - 1
        inputs[r, :n], targets[r, :n] = ids[:-1], ids[1:]
        mask[r, n - min(scored, n):n] = 1.0
      logp, greedy = jax.device_get(_score(self.cfg, self.params, inputs, targets, mask))
      for r, i in enumerate(chunk):
        out[i] = (float(logp[r]), bool(greedy[r]))
    return out

  def loglikelihood(self, requests: list[tuple[str, str]]) -> list[tuple[float, bool]]:
    """[(Σ log p(continuation tokens | context), whether greedy decoding reproduces them)] per request."""
    rows = []
    for context, continuation in requests:
      context_ids, continuation_ids = self.split(context, continuation)
      if not continuation_ids:
        raise ValueError(f"loglikelihood: the continuation {continuation!r} adds no token to {context[-40:]!r}")
      if len(continuation_ids) > self.max_length:
        raise ValueError(f"loglikelihood: a continuation of {len(continuation_ids)} tokens, more than max_length="
                         f"{self.max_length}; score long text with loglikelihood_rolling")
      rows.append((context_ids + continuation_ids, len(continuation_ids)))
    return self._rows(rows)

  def loglikelihood_rolling(self, texts: list[str]) -> list[float]:
    """[Σ log p(token | all the text before it that fits)] per text, over windows of max_length tokens, BOS
    first; every token of the text is predicted exactly once."""
    rows, owner = [], []
    for t, text in enumerate(texts):
      ids = [self.tok.bos_id] + self.tok.encode(text)
      for start, first, end in rolling_windows(len(ids), self.max_length):
        rows.append((ids[start:end], end - first))
        owner.append(t)
    totals = np.zeros(len(texts))
    for t, (logp, _) in zip(owner, self._rows(rows)):
      totals[t] += logp
    return totals.tolist()
