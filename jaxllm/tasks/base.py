"""What a kind of training is, as the trainer sees it: a Task.

A Task owns its data (the train and validation sources, the per-process batch streams), its loss and eval
metrics, the tokens a batch row puts through the model (for tokens/s and MFU), and what the end-of-run samples
show. It knows nothing of LoRA or any other parameter-efficient method: jaxllm/peft.py wraps its loss.

A loss function is `(params, batch, frozen, rng) -> (loss_sum, (weight, aux_sums))`: sums over the batch, so the
step divides by the weight of the whole (accumulated, data-parallel) batch. `frozen` holds the trees that never
train ("reference": the preference reference); `rng` is the step's key (dropout).
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable

import grain
import jax
import numpy as np

from jaxllm import generate, lora, model as model_lib
from jaxllm.data import chat, sources
from jaxllm.errors import ConfigError

LossFn = Callable[[Any, dict, dict, Any], tuple]
AUTO_CHUNK, AUTO_CHUNK_BYTES = 4096, 2 ** 30  # train.loss_chunk=-1: chunks of 4096 tokens past 1 GiB of logits


def check(cond: bool, key: str, message: str):
  if not cond:
    raise ConfigError(f"{key}: {message}")


class Task:
  stage: str = ""
  sequences_per_row: int = 1   # sequences one batch row puts through the model (a preference pair: 2)
  chat: bool = False           # conversations rendered with the chat template (samples are answers)
  counts_examples: bool = False  # the pipeline counts truncated and dropped examples (pipeline.counters)
  needs_reference: bool = False  # the loss reads frozen["reference"], the params of the run init_from names
  score_token: str | None = None  # a scoring model: its score is this token's logit (exported as a score head)

  def __init__(self, config):
    self.config = config

  @staticmethod
  def validate(config):
    """Raises ConfigError naming the key of a value this task cannot train with."""

  # ---- data

  def load(self, split: str, bad: sources.BadRecords | None):
    """The records of `split` ("train" | "validation")."""
    raise NotImplementedError

  def texts(self, source):
    """The raw text of a source's records, for training a tokenizer on it."""
    raise NotImplementedError

  def check_tokenizer(self, tokenizer):
    if self.chat:
      chat.check_tokenizer(tokenizer)

  def shard(self, source, tokenizer, *, train: bool, **common) -> grain.IterDataset:
    """The batches of one data shard; `common` holds seq_len, batch_size, seed, repeat, process_index and
    process_count (the shard's index and the number of shards)."""
    raise NotImplementedError

  def sources(self):
    """(train, validation, skipped): the records of both splits, and the bad records skipped on the way (a
    BadRecords, with data.on_bad_record="skip"; more than data.max_bad_fraction of them is an error), else
    None: with "error" the first bad line stops the run, naming its file and line. With train.eval_batches=0 or
    data.validation_fraction=0 there is no validation: its records are []."""
    d = self.config.data
    bad = sources.BadRecords() if d.on_bad_record == "skip" else None
    no_validation = not self.config.train.eval_batches or not d.validation_fraction
    out = self.load("train", bad), [] if no_validation else self.load("validation", bad)
    if bad is not None:
      bad.check(d.max_bad_fraction)
    return (*out, bad)

  def dataset(self, source, tokenizer, *, train: bool):
    """This process's part of each global batch: training (shuffled, repeated) or validation (one pass, a
    fixed shuffle so that a few batches span many records)."""
    config = self.config
    shards, local = data_shards(config)
    common = dict(seq_len=config.train.seq_len, batch_size=config.train.batch_size // shards,
                  seed=config.seed if train else config.seed + 1, repeat=train, process_count=shards)
    parts = [self.shard(source, tokenizer, train=train, process_index=shard, **common) for shard in local]
    if len(parts) == 1:
      return parts[0]
    zipped = grain.experimental.ZipIterDataset(parts, strict=train)
    return zipped.map(lambda rows: {k: np.concatenate([r[k] for r in rows]) for k in rows[0]})

  def eval_batches(self, source, tokenizer) -> list[dict]:
    """A fixed sample of `train.eval_batches` validation batches."""
    t = self.config.train
    if not len(source):
      return []
    batches = [b for _, b in zip(range(t.eval_batches), self.dataset(source, tokenizer, train=False))]
    if t.eval_batches and not batches:
      raise ConfigError(f"data.validation_fraction: the validation split of {self.config.data.sources!r} is too "
                        f"small for one batch of {t.batch_size}x{t.seq_len} tokens")
    return [self.device_batch(b, train=False) for b in batches]

  def device_batch(self, batch: dict, *, train: bool = True) -> dict:
    """The fields of a host batch the step reads."""
    return batch

  def prepare(self, model_cfg, reference_params, train_source, tokenizer, workdir: str, reference_fingerprint,
              log=print):
    """Work done once before the first step, given the frozen trees (`reference_params()`: the reference's)."""

  def loss_chunk(self, model_cfg: model_lib.ModelConfig) -> int:
    """Tokens per chunk of the chunked cross-entropy (losses.chunked_token_losses), or 0 for the dense logits:
    train.loss_chunk, or with -1 (auto) AUTO_CHUNK when a micro-batch's float32 logits would pass
    AUTO_CHUNK_BYTES. Never with a LoRA delta on the logits' matrix on the unmerged path (its A·B rides inside the
    model, which the chunked loss does not run): auto falls back to dense there, an explicit value is refused."""
    t = self.config.get("train")
    if t is None:  # a bare config (tests of a task's loss alone): the dense logits
      return 0
    chunk, auto = t.get("loss_chunk", -1), t.get("loss_chunk", -1) < 0
    mesh = self.config.get("mesh")
    if auto and mesh is not None and mesh.get("context", 1) > 1:
      chunk = 0  # the sequence is split over devices already: slicing it again would gather it
    elif auto:
      logits = t.batch_size // t.grad_accum * t.seq_len * self.sequences_per_row * model_cfg.vocab_size * 4
      chunk = AUTO_CHUNK if logits > AUTO_CHUNK_BYTES else 0
    lc = self.config.get("lora")
    if chunk and lc and lc.enabled and not lc.merged and any(
        re.search(p, path) for _, group in lora.resolve_targets(lc.targets) for p in group
        for path in ("embed/embedding", "lm_head/kernel")):
      check(auto, "train.loss_chunk", "the chunked loss reads the logits' matrix without the LoRA delta that "
            "lora.targets puts on it (unmerged path); set lora.merged=True, or train.loss_chunk=0")
      return 0
    return chunk

  def reference_in_step(self) -> bool:
    """Whether the step runs the frozen reference model on its tokens (for the FLOPs MFU counts)."""
    return False

  def tokens_per_step(self) -> int:
    t = self.config.train
    return t.batch_size * t.seq_len * self.sequences_per_row

  # ---- loss

  def loss_fn(self, model_cfg: model_lib.ModelConfig) -> LossFn:
    raise NotImplementedError

  def eval_fn(self, model_cfg: model_lib.ModelConfig) -> LossFn:
    return self.loss_fn(model_cfg)

  def eval_row(self, loss: float) -> dict:
    """Validation metrics beyond eval/loss and the loss's own aux sums."""
    return {}

  # ---- samples

  def samples(self, model_cfg: model_lib.ModelConfig, params, tokenizer) -> list[str]:
    """Continuations of train.sample_prompts (sampled at temperature 0.8), or with a chat task answers to them
    as user turns (greedy), formatted for the log."""
    t = self.config.train
    texts = list(t.sample_prompts)[: t.num_samples]
    stops = [tokenizer.eos_id]
    if self.chat:
      prompts = [chat.render_prompt([{"role": "user", "content": p}], tokenizer) for p in texts]
      stops = chat.stop_ids(tokenizer)
    else:
      prompts = [tokenizer.encode(p) for p in texts]
    outs = generate.generate(model_cfg, params, prompts, max_new_tokens=t.sample_tokens,
                             rng=jax.random.key(self.config.seed), temperature=0.0 if self.chat else 0.8, top_k=40,
                             stop_ids=stops, vocab_limit=tokenizer.vocab_size)
    answers = [tokenizer.decode([i for i in out if i not in stops]) for out in outs]
    return [f"Q: {q}\nA: {a}" if self.chat else f"{q}{a}" for q, a in zip(texts, answers)]


def data_shards(config) -> tuple[int, list[int]]:
  """(number of data shards, this process's shards). A batch is the concatenation of batch_size/num_shards
  rows from each shard in order, whatever the number of processes reading them."""
  shards = config.data.num_shards or jax.process_count()
  if shards % jax.process_count() or config.train.batch_size % shards:
    raise ConfigError(f"data.num_shards: {shards} shards must be a multiple of the {jax.process_count()} "
                      f"processes and divide train.batch_size={config.train.batch_size}")
  per_process = shards // jax.process_count()
  return shards, list(range(jax.process_index() * per_process, (jax.process_index() + 1) * per_process))


def perplexity(loss: float) -> float:
  return math.exp(min(loss, 50.0))
