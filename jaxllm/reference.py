"""DPO reference log-probs computed once over the training pairs and cached on disk (dpo.cache_reference).

The cache is keyed by everything that determines it (the reference checkpoint, tokenizer, data, sequence
length, kind), so a resumed run reuses it and a changed run recomputes it. With it, the train step runs no
reference forward pass; validation still computes the reference's log-probs on the fly.
"""

from __future__ import annotations

import hashlib
import json
import os

import jax
import numpy as np

from jaxllm import objectives
from jaxllm.data import preference, sft


def cache_key(config, tokenizer_sha256: str, reference_identity: str, num_pairs: int) -> str:
  d = config.data
  parts = [tokenizer_sha256, reference_identity, d.sources, d.validation_fraction, d.hard_fraction, config.seed,
           d.overlong, config.train.seq_len, config.dpo.kind, config.lora.quantize_base, num_pairs]
  return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def compute(config, model_cfg, frozen, pairs, tokenizer) -> tuple[np.ndarray, np.ndarray]:
  """[N] reference log-probs of the chosen and the rejected answer of every pair, in the order of `pairs`
  (0 for pairs the pipeline drops)."""
  t = config.train
  fn = jax.jit(lambda frozen, batch: objectives.pair_logps(
      model_cfg, config.dpo.kind, objectives.reference_params(frozen, config), batch))
  n, b = len(pairs), t.batch_size
  chosen, rejected = np.zeros(n, np.float32), np.zeros(n, np.float32)
  for start in range(0, n, b):
    rows = [preference.make_pair_example(pairs[i], tokenizer, seq_len=t.seq_len, overlong=config.data.overlong)
            for i in range(start, min(start + b, n))]
    kept = [i for i, r in enumerate(rows) if r["status"] in (sft._KEPT, sft._TRUNCATED)]
    if not kept:
      continue
    rows = [rows[i] for i in kept] + [rows[kept[0]]] * (b - len(kept))  # a fixed batch shape: one compile
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0] if k not in ("status", "pair_index")}
    c, r = jax.device_get(fn(frozen, batch))
    chosen[[start + i for i in kept]] = c[: len(kept)]
    rejected[[start + i for i in kept]] = r[: len(kept)]
  return chosen, rejected


def load_or_compute(config, model_cfg, frozen, pairs, tokenizer, workdir: str, reference_identity: str):
  """The cached (chosen, rejected) arrays of workdir/reference_logps-<key>.npz, computed if absent."""
  if jax.process_count() > 1:
    raise ValueError("dpo.cache_reference: supported in single-process runs only")
  key = cache_key(config, tokenizer.sha256, reference_identity, len(pairs))
  path = os.path.join(workdir, f"reference_logps-{key}.npz")
  if os.path.exists(path):
    with np.load(path) as f:
      return f["chosen"], f["rejected"], path, False
  chosen, rejected = compute(config, model_cfg, frozen, pairs, tokenizer)
  np.savez(path + ".tmp.npz", chosen=chosen, rejected=rejected)
  os.replace(path + ".tmp.npz", path)
  return chosen, rejected, path, True
