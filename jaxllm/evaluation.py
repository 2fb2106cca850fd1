"""Scoring a run's model on text, as benchmark harnesses ask it (lm-evaluation-harness's `loglikelihood`,
`loglikelihood_rolling` and `generate_until` requests), and the tasks built on them (`jaxllm eval`, `eval.tasks`
during training, jaxllm/lm_eval_adapter.py).

  scorer = evaluation.Scorer.from_run("runs/sft_tiny")         # a full, LoRA (merged) or imported HF run
  scorer.loglikelihood([("The capital of France is", " Paris")])  # [(Σ log p(continuation | context), greedy?)]
  scorer.loglikelihood_rolling(["a long text ..."])              # [Σ log p(text)], every token predicted once
  scorer.generate_until(["def f(x):\n"], ("\n",), max_tokens=16)  # [greedy text, cut at the first stop string]

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
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import generate, model as model_lib, runs
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
  """The three requests of lm-evaluation-harness over a model. With a `mesh` (e.g. generate.rows_mesh(): the
  process's devices), the params are replicated on it and every batch's rows split over its devices (batch_size
  rounded up to a multiple of its size); the numbers are those of one device."""

  def __init__(self, cfg: model_lib.ModelConfig, params, tokenizer, *, max_length: int = 512, batch_size: int = 16,
               mesh=None):
    self.cfg, self.tok, self.mesh = cfg, tokenizer, mesh
    self.params = None if params is None else generate.replicate(params, mesh)
    self.max_length, self.batch_size = max_length, generate.pad_rows(batch_size, mesh)
    self._stop_pieces: dict[tuple[str, ...], list[int]] = {}

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
      logp, greedy = jax.device_get(_score(self.cfg, self.params, *generate.put_rows((inputs, targets, mask),
                                                                                      self.mesh)))
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

  def generate_until(self, contexts: list[str], stop: tuple[str, ...] = ("\n",), max_tokens: int = 32) -> list[str]:
    """Greedy continuations of each context (an empty one is the BOS token), cut before the first stop string
    (as lm-evaluation-harness cuts its `until`) and at EOS; at most max_tokens tokens each."""
    return self.generate_ids([self.tok.encode(c) or [self.tok.bos_id] for c in contexts], stop, max_tokens)

  def generate_ids(self, prompts: list[list[int]], stop: tuple[str, ...] = ("\n",), max_tokens: int = 32,
                   end_ids: tuple[int, ...] = ()) -> list[str]:
    """generate_until for prompts already tokenized; generation also ends at any of end_ids (e.g. <|end|>), which
    the text leaves out. Prompts are cut from the left to max_length - max_tokens tokens, sorted by length and
    batched by bucket, every batch padded to batch_size rows: one compiled program per (bucket, max_tokens)."""
    if not 0 < max_tokens < self.max_length:
      raise ValueError(f"generate: max_tokens={max_tokens} must be in [1, max_length={self.max_length})")
    stop = tuple(s for s in stop if s)
    ends = (self.tok.eos_id, *end_ids)
    room = self.max_length - max_tokens
    out: list = [None] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for start in range(0, len(order), self.batch_size):
      chunk = order[start:start + self.batch_size]
      rows = [list(prompts[i])[-room:] for i in chunk]
      slots = bucket(max(map(len, rows)), room)
      rows += [[self.tok.bos_id]] * (self.batch_size - len(rows))
      new = generate.generate(self.cfg, self.params, rows, max_new_tokens=max_tokens, rng=jax.random.key(0),
                              temperature=0.0, stop_ids=ends + tuple(self.stop_pieces(stop)),
                              vocab_limit=self.tok.vocab_size, prompt_slots=slots, mesh=self.mesh)
      for i, ids in zip(chunk, new):
        ids = ids[:next((k for k, t in enumerate(ids) if t in ends), len(ids))]
        out[i] = cut(self.tok.decode(ids), stop)
    return out

  def stop_pieces(self, stop: tuple[str, ...]) -> list[int]:
    """Ids whose text contains a stop string: once one is generated the text is cut there, so generation can
    end (a stop string split over several tokens is cut from the text afterwards)."""
    if stop not in self._stop_pieces:
      self._stop_pieces[stop] = [i for i in range(self.tok.vocab_size)
                                 if any(s in self.tok.decode([i]) for s in stop)]
    return self._stop_pieces[stop]


def cut(text: str, stop) -> str:
  """The text before the first occurrence of any stop string (lm-evaluation-harness's `until`)."""
  for s in stop:
    if s:
      text = text.split(s)[0]
  return text


# ------------------------------------------------------------------------------------------------ tasks
# A task is a list of items (one JSON object per line of a task file), of three kinds:
#   multiple choice {"context", "choices", "answer"}: acc (the choice of highest log-likelihood is the answer),
#     acc_norm (log-likelihood per character of the choice) and acc_mutual_info (log p(choice | context) minus
#     log p(choice | an empty context): the answer's prior taken out), as lm-evaluation-harness computes them;
#   generation {"context", "target"} (+ "until": stop strings, default ["\n"]; "max_tokens", default 32):
#     exact_match, the greedy continuation cut at the first stop string equal to the target, both stripped;
#   perplexity {"text"}: perplexity = exp(−Σ log p / Σ tokens) over every token of every text.
# "chat": true renders the context as a user turn and the choices / target as the answer (the chat template SFT
# trains on; the empty context of acc_mutual_info is an empty user turn).

CHOICES = 4            # choices per embedded multiple-choice item: the answer and three distractors
STDLIB_CHARS = 2000    # the first characters of each held-out standard-library file
MAX_ANSWER_CHARS = 200  # embedded answer selection keeps the conversations whose answer is at most this long
MAX_TOKENS = 32        # generation items: new tokens at most, unless the item says
NEXT_LINE_CHARS = 12   # next-line completion: target lines of at most this many characters (else:, return, """)
NEXT_LINE_CONTEXT = 500  # characters of whole preceding lines at most (cut further to fit max_length)
NEXT_LINE_ITEMS = 20   # items per held-out file at most, evenly spread over its lines
NEXT_LINE_TOKENS = 16  # new tokens per next-line item: the indentation and a short line
EMBEDDED = {
    "chatterbot_mc_en": "answer selection on held-out English chatterbot conversations (1 of 4, chat template)",
    "chatterbot_mc_zh": "answer selection on held-out Chinese chatterbot conversations (1 of 4, chat template)",
    "stdlib_ppl": "perplexity on held-out Python standard-library files (their first 2,000 characters)",
    "stdlib_next_line": "next-line completion on held-out Python standard-library files (short lines, exact match)",
}
METRICS = ("acc", "acc_norm", "acc_mutual_info", "exact_match", "perplexity")  # what training logs per task


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


def _stdlib_held_out():
  from jaxllm.data import sources

  return sources.documents("stdlib", "validation", validation_fraction=0.02)  # pretraining's default held-out


def stdlib_texts(limit: int | None = None) -> list[dict]:
  docs = _stdlib_held_out()
  n = len(docs) if limit is None else min(limit, len(docs))
  return [{"text": docs[i][:STDLIB_CHARS]} for i in range(n) if docs[i].strip()]


def next_lines() -> list[dict]:
  """Next-line completion on the held-out standard-library files: a target is a short code line (1 to
  NEXT_LINE_CHARS characters stripped, not a comment) after at least 3 lines; its context the whole lines before
  it that fit in NEXT_LINE_CONTEXT characters; up to NEXT_LINE_ITEMS per file, evenly spread."""
  items = []
  for text in _stdlib_held_out():
    lines = text.split("\n")
    at = [k for k, line in enumerate(lines[:-1]) if k >= 3 and 0 < len(line.strip()) <= NEXT_LINE_CHARS
          and not line.strip().startswith("#")]
    for k in [at[j] for j in np.linspace(0, len(at) - 1, min(len(at), NEXT_LINE_ITEMS)).astype(int)] if at else []:
      first = k
      while first > 0 and sum(len(line) + 1 for line in lines[first - 1:k]) <= NEXT_LINE_CONTEXT:
        first -= 1
      items.append({"context": "".join(line + "\n" for line in lines[first:k]), "target": lines[k].strip(),
                    "max_tokens": NEXT_LINE_TOKENS})
  return items


def load_task(name: str, limit: int | None = None) -> list[dict]:
  """The items of an embedded task (EMBEDDED) or of a JSONL file; the first `limit` of them."""
  if name in ("chatterbot_mc_en", "chatterbot_mc_zh"):
    items = chatterbot_choices({"en": "english", "zh": "chinese"}[name.rsplit("_", 1)[1]])
  elif name == "stdlib_ppl":
    items = stdlib_texts(limit)
  elif name == "stdlib_next_line":
    items = next_lines()
  elif name.endswith(".jsonl"):
    from jaxllm.data import sources

    records = sources.jsonl_records(name, _check_item, what="task items")
    items = [records[i] for i in range(len(records))]
    if len({_kind(it) for it in items}) > 1:
      raise ConfigError(f"--tasks {name}: its items must all be of one kind (multiple choice, generation or "
                        "perplexity)")
  else:
    raise ConfigError(f"--tasks: {name!r} is neither an embedded task ({', '.join(EMBEDDED)}) nor a .jsonl file")
  return items[:limit] if limit else items


def check_names(names: str, key: str = "--tasks") -> list[str]:
  """The task names of a comma-separated list, each embedded or an existing .jsonl file; ConfigError naming
  `key` otherwise. Reads no task data."""
  import os

  out = [n.strip() for n in names.split(",") if n.strip()]
  for name in out:
    if name not in EMBEDDED and not (name.endswith(".jsonl") and os.path.isfile(name)):
      raise ConfigError(f"{key}: {name!r} is neither an embedded task ({', '.join(EMBEDDED)}) nor an existing "
                        ".jsonl file")
  return out


def _kind(item: dict) -> str:
  return "perplexity" if "text" in item else "multiple choice" if "choices" in item else "generation"


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
  elif {"context", "target"} <= set(item):
    if not (isinstance(item["context"], str) and isinstance(item["target"], str)):
      raise ValueError("'context' and 'target' must be strings")
    until = item.get("until", ["\n"])
    if not (isinstance(until, list) and all(isinstance(u, str) for u in until)):
      raise ValueError("'until' must be a list of strings")
    if not (isinstance(item.get("max_tokens", MAX_TOKENS), int) and item.get("max_tokens", MAX_TOKENS) > 0):
      raise ValueError("'max_tokens' must be a positive integer")
  else:
    raise ValueError("expected 'text' (perplexity), 'context', 'choices' and 'answer' (multiple choice) or "
                     "'context' and 'target' (generation)")
  return item


def _chat_context(scorer: Scorer, context: str) -> list[int]:
  from jaxllm.data import chat

  return chat.render_prompt([{"role": "user", "content": context}], scorer.tok)


def _chat_answer(scorer: Scorer, answer: str) -> list[int]:
  """An answer's ids and its <|end|>, as SFT trains on them."""
  from jaxllm.data import chat

  ids, mask = chat.render([{"role": "assistant", "content": answer}], scorer.tok)
  return ids[mask.index(1.0):]


def evaluate(scorer: Scorer, items: list[dict]) -> dict:
  """The metrics of a task's items: {"acc", "acc_norm", "acc_mutual_info", "n"} (multiple choice),
  {"exact_match", "n"} (generation) or {"perplexity", "tokens", "n"}."""
  kinds = {_kind(it) for it in items}
  if len(kinds) != 1:
    raise ValueError(f"a task's items must all be of one kind, not {sorted(kinds)}")
  if kinds == {"perplexity"}:
    totals = scorer.loglikelihood_rolling([it["text"] for it in items])
    tokens = sum(len(scorer.tok.encode(it["text"])) for it in items)
    return {"perplexity": float(np.exp(-sum(totals) / tokens)), "tokens": tokens, "n": len(items)}
  if kinds == {"generation"}:
    return {"exact_match": float(np.mean([p.strip() == it["target"].strip()
                                          for p, it in zip(generations(scorer, items), items)])), "n": len(items)}
  requests, unconditional = [], {}  # unconditional: one request per distinct (chat?, choice)
  for it in items:
    context = _chat_context(scorer, it["context"]) if it.get("chat") else None
    for choice in it["choices"]:
      if it.get("chat"):
        requests.append((context, _chat_answer(scorer, choice)))
        unconditional.setdefault((True, choice), (_chat_context(scorer, ""), requests[-1][1]))
      else:
        requests.append(scorer.split(it["context"], choice))
        unconditional.setdefault((False, choice), scorer.split("", choice))
  scores = [logp for logp, _ in scorer.loglikelihood_ids(requests + list(unconditional.values()))]
  prior = dict(zip(unconditional, scores[len(requests):]))
  acc = acc_norm = acc_mi = 0
  k = 0
  for it in items:
    logp = np.array(scores[k:k + len(it["choices"])])
    k += len(it["choices"])
    acc += int(np.argmax(logp)) == it["answer"]
    acc_norm += int(np.argmax(logp / [len(c) for c in it["choices"]])) == it["answer"]
    acc_mi += int(np.argmax(logp - [prior[(bool(it.get("chat")), c)] for c in it["choices"]])) == it["answer"]
  n = len(items)
  return {"acc": acc / n, "acc_norm": acc_norm / n, "acc_mutual_info": acc_mi / n, "n": n}


def generations(scorer: Scorer, items: list[dict]) -> list[str]:
  """The greedy continuation of each generation item, cut at its stop strings; items that share stop strings,
  max_tokens and chat-ness are generated together."""
  groups: dict[tuple, list[int]] = {}
  for k, it in enumerate(items):
    groups.setdefault((tuple(it.get("until", ["\n"])), it.get("max_tokens", MAX_TOKENS), bool(it.get("chat"))),
                      []).append(k)
  out: list = [None] * len(items)
  for (until, max_tokens, is_chat), ks in groups.items():
    if is_chat:
      from jaxllm.data import chat

      prompts = [_chat_context(scorer, items[k]["context"]) for k in ks]
      ends = (scorer.tok.token_id(chat.DEFAULT_TEMPLATE.end),)
    else:
      prompts = [scorer.tok.encode(items[k]["context"]) or [scorer.tok.bos_id] for k in ks]
      ends = ()
    for k, text in zip(ks, scorer.generate_ids(prompts, until, max_tokens, ends)):
      out[k] = text
  return out


class DuringTraining:
  """Scores `eval.tasks` at a run's eval steps (jaxllm/train.py): the items are read once, the first
  eval.max_items of each task; rows of train.seq_len tokens (or eval.max_length); one process."""

  def __init__(self, config, model_cfg: model_lib.ModelConfig, tokenizer):
    e = config.eval
    self.names = check_names(e.tasks, "eval.tasks")
    self.items = {name: load_task(name, e.max_items or None) for name in self.names}
    self.scorer = Scorer(model_cfg, None, tokenizer, max_length=e.max_length or config.train.seq_len)

  @staticmethod
  def validate(config):
    """ConfigError naming eval.* before any data is read."""
    e = config.eval
    if check_names(e.tasks, "eval.tasks") and jax.process_count() > 1:
      raise ConfigError("eval.tasks: tasks are scored during single-process runs only; score the checkpoints "
                        "with jaxllm eval")
    for key, zero in (("max_items", "all"), ("max_length", "train.seq_len")):
      if e[key] < 0:
        raise ConfigError(f"eval.{key}: must be >= 0 (0 = {zero}), got {e[key]}")

  def row(self, params) -> dict:
    """{"eval/<task>/<metric>": value} of the model with these (full) params."""
    self.scorer.params, out = params, {}
    for name, items in self.items.items():
      try:
        metrics = evaluate(self.scorer, items)
      except ValueError as e:
        raise ConfigError(f"eval.tasks {name}: {e}; set eval.max_length") from e
      key = os.path.basename(name).removesuffix(".jsonl")  # as DIR/eval/<task>.json names it
      out.update({f"eval/{key}/{k}": float(v) for k, v in metrics.items() if k in METRICS})
    return out


def main(argv: list[str]) -> int:
  """jaxllm eval --run DIR --tasks A,B [--limit N] | jaxllm eval --list"""
  import argparse
  import json
  import time

  parser = argparse.ArgumentParser(
      prog="jaxllm eval", formatter_class=argparse.RawDescriptionHelpFormatter,
      description="Score a run on tasks: a line per task, and DIR/eval/<task>.json with its metrics.",
      epilog="A task file is JSONL, one item per line, all of one kind:\n"
             '  {"context", "choices": [...], "answer": i}  multiple choice: acc, acc_norm, acc_mutual_info\n'
             '  {"context", "target"} (+ "until": [stops], default ["\\n"]; "max_tokens", default 32)\n'
             "                                             generation, greedy: exact_match (stripped)\n"
             '  {"text"}                                   perplexity\n'
             '"chat": true renders the context as a user turn (the chat template SFT trains on).')
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
  names = check_names(args.tasks)
  extra = {"max_length": args.max_length} if args.max_length else {}
  mesh = generate.rows_mesh() if jax.local_device_count() > 1 else None  # rows split over the process's devices
  scorer = Scorer.from_run(args.run, args.step, batch_size=args.batch_size, mesh=mesh, **extra)
  rows = []
  for name in names:
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
