"""From a config to data: the stage's sources, the run's tokenizer, and the per-process datasets.

The trainer calls these; the pipelines themselves (pipeline.py, sft.py) know nothing of configs.
"""

from __future__ import annotations

import os
import time

import grain
import jax
import numpy as np

from jaxllm.config import ConfigError
from jaxllm.data import chat, pipeline, preference, sft, sources
from jaxllm.data.tokenizer import Tokenizer, train_tokenizer


def load_sources(config, bad: sources.BadRecords | None = None):
  """(train, validation): documents for pretraining, conversations for SFT, preference pairs for DPO. With
  data.on_bad_record="skip", bad lines are skipped and counted in `bad` (pass one), and more than
  data.max_bad_fraction of them is an error; with "error" the first bad line stops the run (file and line)."""
  d = config.data
  lenient = d.on_bad_record == "skip"
  if lenient and bad is None:
    bad = sources.BadRecords()
  kw = dict(validation_fraction=d.validation_fraction, bad=bad if lenient else None)
  if config.stage == "pretrain":
    load = lambda split: sources.documents(d.sources, split, **kw)
  elif config.stage == "sft":
    load = lambda split: sft.conversations(d.sources, split, **kw)
  else:
    load = lambda split: preference.pairs(d.sources, split, seed=config.seed, hard_fraction=d.hard_fraction, **kw)
  out = load("train"), load("validation")
  if lenient:
    bad.check(d.max_bad_fraction)
  return out


def _texts(config, source):
  """The raw text of a source, for training a tokenizer on it."""
  for i in range(len(source)):
    item = source[i]
    if config.stage == "dpo":
      item = item["prompt"] + [{"role": "assistant", "content": item["chosen"]}]
    yield item if config.stage == "pretrain" else chat.render_text(item)


def prepare_tokenizer(config, workdir: str, train_source, init_from_dir: str | None = None) -> Tokenizer:
  """The run's tokenizer, saved as workdir/tokenizer.model: the workdir's own (a resumed run), the one of the
  run named by init_from, the configured path, or one trained on the corpus. Refuses mismatches."""
  saved = os.path.join(workdir, "tokenizer.model")
  path = config.data.tokenizer.path
  if path and not os.path.exists(path):
    raise ConfigError(f"data.tokenizer.path: no file {path!r}")
  parent = None
  if init_from_dir:  # a run's tokenizer.model, or a Hugging Face directory's (checked: present, fits the embedding)
    from jaxllm import hf
    parent = hf.tokenizer_file(init_from_dir)
  if os.path.exists(saved):
    tok = Tokenizer.from_file(saved)
    source = None
  elif parent:
    tok, source = Tokenizer.from_file(parent), parent
  elif path:
    tok, source = Tokenizer.from_file(path), path
  else:
    t = config.data.tokenizer
    start = time.time()
    tok = train_tokenizer(_texts(config, train_source), vocab_size=t.vocab_size, model_type=t.model_type,
                          max_sentences=t.max_sentences, seed=config.seed)
    source = f"trained in {time.time() - start:.1f}s"
  for other, key in ((path, "data.tokenizer.path"), (parent, "init_from")):
    if other and Tokenizer.from_file(other).sha256 != tok.sha256:
      raise ConfigError(f"{key}: the tokenizer {other!r} differs from this run's ({saved if source is None else source}); "
                        "a run and the checkpoint it starts from must share one tokenizer")
  if config.stage in ("sft", "dpo"):
    chat.check_tokenizer(tok)
  if jax.process_index() == 0 and not os.path.exists(saved):
    tok.save(saved)
  if source and jax.process_index() == 0:
    print(f"tokenizer: {tok.vocab_size} pieces ({source})", flush=True)
  return tok


def data_shards(config) -> tuple[int, list[int]]:
  """(number of data shards, this process's shards). A batch is the concatenation of batch_size/num_shards
  rows from each shard in order, whatever the number of processes reading them."""
  shards = config.data.num_shards or jax.process_count()
  if shards % jax.process_count() or config.train.batch_size % shards:
    raise ConfigError(f"data.num_shards: {shards} shards must be a multiple of the {jax.process_count()} "
                      f"processes and divide train.batch_size={config.train.batch_size}")
  per_process = shards // jax.process_count()
  return shards, list(range(jax.process_index() * per_process, (jax.process_index() + 1) * per_process))


def make_dataset(config, source, tokenizer, *, train: bool, stats: list | None = None):
  """This process's part of each global batch: training (shuffled, repeated) or validation (one pass, a
  fixed shuffle so a few batches span many documents). SFT shards append their SFTStats to `stats`."""
  shards, local = data_shards(config)
  t, d = config.train, config.data
  common = dict(seq_len=t.seq_len, batch_size=t.batch_size // shards, seed=config.seed if train else config.seed + 1,
                repeat=train, process_count=shards)
  parts = []
  for shard in local:
    if config.stage == "pretrain":
      parts.append(pipeline.pretrain_dataset(source, tokenizer, process_index=shard, **common))
    elif config.stage == "dpo":
      shard_stats = sft.SFTStats()
      if stats is not None:
        stats.append(shard_stats)
      parts.append(preference.preference_dataset(source, tokenizer, process_index=shard, overlong=d.overlong,
                                                 stats=shard_stats, **common))
    else:
      shard_stats = sft.SFTStats()
      if stats is not None:
        stats.append(shard_stats)
      # validation measures the answer-only loss whatever the training weight of prompts
      weight = d.prompt_loss_weight if train else 0.0
      parts.append(sft.sft_dataset(source, tokenizer, process_index=shard, prompt_loss_weight=weight,
                                   overlong=d.overlong, stats=shard_stats, **common))
  if len(parts) == 1:
    return parts[0]
  zipped = grain.experimental.ZipIterDataset(parts, strict=train)
  return zipped.map(lambda rows: {k: np.concatenate([r[k] for r in rows]) for k in rows[0]})


def eval_batches(config, source, tokenizer) -> list[dict]:
  """A fixed sample of `train.eval_batches` validation batches."""
  t = config.train
  batches = [b for _, b in zip(range(t.eval_batches), make_dataset(config, source, tokenizer, train=False))]
  if t.eval_batches and not batches:
    raise ConfigError(f"data.validation_fraction: the validation split of {config.data.sources!r} is too small "
                      f"for one batch of {t.batch_size}x{t.seq_len} tokens")
  return batches
