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
from jaxllm.errors import ConfigError

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

  def loglikelihood_ids(self, requests: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
    """loglikelihood of (context ids, continuation ids) pairs already tokenized (e.g. chat-rendered)."""
    for _, continuation_ids in requests:
      if not 0 < len(continuation_ids) <= self.max_length:
        raise ValueError(f"loglikelihood: a continuation of {len(continuation_ids)} tokens; it needs 1 to "
                         f"max_length={self.max_length} (score long text with loglikelihood_rolling)")
    return self._rows([(list(c) + list(k), len(k)) for c, k in requests])

  def loglikelihood(self, requests: list[tuple[str, str]]) -> list[tuple[float, bool]]:
    """[(Σ log p(continuation tokens | context), whether greedy decoding reproduces them)] per request."""
    return self.loglikelihood_ids([self.split(context, continuation) for context, continuation in requests])

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


# ------------------------------------------------------------------------------------------------ tasks
# A task is a list of items. Multiple choice: {"context", "choices", "answer"} (+ "chat": the context is a user turn
# and the choices are answers, rendered with the chat template as SFT trains on them); metrics acc (the choice of
# highest log-likelihood is the answer) and acc_norm (per character of the choice, as lm-evaluation-harness's).
# Perplexity: {"text"}; metric perplexity = exp(−Σ log p / Σ tokens) over every token of every text.

CHOICES = 4            # choices per embedded multiple-choice item: the answer and three distractors
STDLIB_CHARS = 2000    # the first characters of each held-out standard-library file
MAX_ANSWER_CHARS = 200  # embedded answer selection keeps the conversations whose answer is at most this long
EMBEDDED = {
    "chatterbot_mc_en": "answer selection on held-out English chatterbot conversations (1 of 4, chat template)",
    "chatterbot_mc_zh": "answer selection on held-out Chinese chatterbot conversations (1 of 4, chat template)",
    "stdlib_ppl": "perplexity on held-out Python standard-library files (their first 2,000 characters)",
}


def chatterbot_choices(language: str, seed: int = 0) -> list[dict]:
  """Held-out conversations (the validation split SFT's default holds out) of one chatterbot language whose answer
  has at most MAX_ANSWER_CHARS characters: the first question, its answer and three answers of other such
  conversations, in a seeded random order."""
  from jaxllm.data import sft

  convs = [c for c in sft.conversations(f"chatterbot:{language}", "validation", validation_fraction=0.1)
           if len(c[1]["content"]) <= MAX_ANSWER_CHARS]
  answers = [c[1]["content"] for c in convs]
  rng, items = np.random.default_rng(seed), []
  for i, conv in enumerate(convs):
    others = [a for j, a in enumerate(answers) if j != i and a != answers[i]]
    if len(set(others)) < CHOICES - 1:
      continue
    picked = [str(a) for a in rng.choice(sorted(set(others)), CHOICES - 1, replace=False)]
    answer = int(rng.integers(CHOICES))
    items.append({"context": conv[0]["content"], "chat": True,
                  "choices": picked[:answer] + [answers[i]] + picked[answer:], "answer": answer})
  return items


def stdlib_texts(limit: int | None = None) -> list[dict]:
  from jaxllm.data import sources

  docs = sources.documents("stdlib", "validation", validation_fraction=0.02)
  n = len(docs) if limit is None else min(limit, len(docs))
  return [{"text": docs[i][:STDLIB_CHARS]} for i in range(n) if docs[i].strip()]


def load_task(name: str, limit: int | None = None) -> list[dict]:
  """The items of an embedded task (EMBEDDED) or of a JSONL file; the first `limit` of them."""
  if name in ("chatterbot_mc_en", "chatterbot_mc_zh"):
    items = chatterbot_choices({"en": "english", "zh": "chinese"}[name.rsplit("_", 1)[1]])
  elif name == "stdlib_ppl":
    items = stdlib_texts(limit)
  elif name.endswith(".jsonl"):
    from jaxllm.data import sources

    records = sources.jsonl_records(name, _check_item, what="task items")
    items = [records[i] for i in range(len(records))]
  else:
    raise ConfigError(f"--tasks: {name!r} is neither an embedded task ({', '.join(EMBEDDED)}) nor a .jsonl file")
  return items[:limit] if limit else items


def _check_item(item) -> dict:
  if not isinstance(item, dict):
    raise ValueError("not a JSON object")
  if "text" in item:
    if not isinstance(item["text"], str) or not item["text"]:
      raise ValueError("'text' must be a non-empty string")
  elif {"context", "choices", "answer"} <= set(item):
    if not (isinstance(item["choices"], list) and len(item["choices"]) >= 2
            and all(isinstance(c, str) and c for c in item["choices"])):
      raise ValueError("'choices' must be a list of at least two non-empty strings")
    if not (isinstance(item["answer"], int) and 0 <= item["answer"] < len(item["choices"])):
      raise ValueError(f"'answer' must index 'choices' (0..{len(item['choices']) - 1})")
  else:
    raise ValueError("expected 'text' (perplexity) or 'context', 'choices' and 'answer' (multiple choice)")
  return item


def evaluate(scorer: Scorer, items: list[dict]) -> dict:
  """The metrics of a task's items: {"acc", "acc_norm", "n"} (multiple choice) or {"perplexity", "tokens", "n"}."""
  from jaxllm.data import chat

  if all("text" in it for it in items):
    totals = scorer.loglikelihood_rolling([it["text"] for it in items])
    tokens = sum(len(scorer.tok.encode(it["text"])) for it in items)
    return {"perplexity": float(np.exp(-sum(totals) / tokens)), "tokens": tokens, "n": len(items)}
  requests, owner = [], []
  for k, it in enumerate(items):
    for choice in it["choices"]:
      if it.get("chat"):
        context = chat.render_prompt([{"role": "user", "content": it["context"]}], scorer.tok)
        ids, mask = chat.render([{"role": "assistant", "content": choice}], scorer.tok)
        requests.append((context, ids[mask.index(1.0):]))  # the answer and its <|end|>, as SFT trains on them
      else:
        requests.append(scorer.split(it["context"], choice))
      owner.append(k)
  scores = [logp for logp, _ in scorer.loglikelihood_ids(requests)]
  per_item: list[list[tuple[float, str]]] = [[] for _ in items]
  for logp, k, choice in zip(scores, owner, (c for it in items for c in it["choices"])):
    per_item[k].append((logp, choice))
  acc = acc_norm = 0
  for it, mine in zip(items, per_item):
    acc += int(np.argmax([s for s, _ in mine])) == it["answer"]
    acc_norm += int(np.argmax([s / max(len(c.encode()), 1) for s, c in mine])) == it["answer"]
  return {"acc": acc / len(items), "acc_norm": acc_norm / len(items), "n": len(items)}


def main(argv: list[str]) -> int:
  """jaxllm eval --run DIR --tasks A,B [--limit N] | jaxllm eval --list"""
  import argparse
  import json
  import time

  parser = argparse.ArgumentParser(prog="jaxllm eval", description="Score a run on tasks; DIR/eval/<task>.json.")
  parser.add_argument("--run", help="a run directory (full, LoRA or imported)")
  parser.add_argument("--tasks", default="", help=f"comma-separated: {', '.join(EMBEDDED)} or task .jsonl files")
  parser.add_argument("--limit", type=int, default=None, help="the first N items of each task")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
  parser.add_argument("--batch-size", type=int, default=16)
  parser.add_argument("--max-length", type=int, default=None, help="tokens per row (default: the run's seq_len)")
  parser.add_argument("--list", action="store_true", help="print the embedded tasks")
  args = parser.parse_args(argv)
  if args.list:
    for name, what in EMBEDDED.items():
      print(f"{name:18s} {what}")
    return 0
  if not args.run or not args.tasks:
    raise ConfigError("jaxllm eval: give --run DIR and --tasks A,B (or --list)")
  extra = {"max_length": args.max_length} if args.max_length else {}
  scorer = Scorer.from_run(args.run, args.step, batch_size=args.batch_size, **extra)
  rows = []
  for name in filter(None, args.tasks.split(",")):
    start = time.time()
    try:
      metrics = evaluate(scorer, load_task(name, args.limit))
    except ValueError as e:  # an item the rows cannot hold: a refusal naming the task, not a traceback
      raise ConfigError(f"--tasks {name}: {e}; give a larger --max-length") from e
    metrics["seconds"] = round(time.time() - start, 2)
    path = runs.write_eval(args.run, name, metrics)
    rows.append((name, metrics, path))
  for name, metrics, path in rows:
    shown = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
    print(f"{name:24s} {shown}  ({path})")
  print(json.dumps({name: metrics for name, metrics, _ in rows}))
  return 0


if __name__ == "__main__":  # python -m jaxllm.evaluation: the `jaxllm eval` command of jaxllm/cli.py
  import runpy
  import sys

  sys.argv[1:1] = ["eval"]
  runpy.run_module("jaxllm.cli", run_name="__main__")
