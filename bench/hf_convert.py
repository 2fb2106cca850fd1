"""Conversion time of a preset to and from the Hugging Face format (jaxllm/hf.py): random float32 params, saved
as safetensors (one file, shards, bfloat16), loaded back, and the run-directory round trip of the CLI (import
writes an orbax checkpoint, export reads it). Prints a table; the files live in a temporary directory.

  python bench/hf_convert.py [--size 124m] [--shard 100MB]

`peak MB` is the most memory numpy allocated during the step beyond what it started with (tracemalloc): about
the params for a load (they are the output), about one tensor for a save (tensors stream to disk). Loads read
files just written, so from the page cache.
"""

import argparse
import os
import shutil
import tempfile
import time
import tracemalloc

import jax
import numpy as np

from jaxllm import export, hf, model as model_lib


def timed(fn):
  tracemalloc.start()
  tracemalloc.reset_peak()
  start = time.perf_counter()
  out = fn()
  seconds = time.perf_counter() - start
  _, peak = tracemalloc.get_traced_memory()
  tracemalloc.stop()
  return out, seconds, peak / 1e6


def size_of(path):
  files = [f for f in os.listdir(path) if f.endswith(".safetensors") or os.path.isdir(os.path.join(path, f))]
  total = sum(os.path.getsize(os.path.join(root, f)) for root, _, fs in os.walk(path) for f in fs)
  return len(files), total / 1e6


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--size", default="124m")
  parser.add_argument("--shard", default="100MB", help="max_shard_size of the sharded save")
  args = parser.parse_args()
  cfg = model_lib.model_config(args.size)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: rng.normal(0, 0.02, x.shape).astype(np.float32), model_lib.abstract_params(cfg))
  print(f"{args.size}: {model_lib.num_params(cfg) / 1e6:.1f}M params, {jax.device_count()} {jax.default_backend()} "
        f"device(s), {os.cpu_count()} CPUs\n")
  root = tempfile.mkdtemp()
  rows = []
  try:
    for name, kwargs in (("float32", {}), (f"float32, {args.shard} shards", {"max_shard_size": args.shard}),
                         ("bfloat16", {"dtype": "bfloat16"})):
      path = os.path.join(root, name.replace(" ", "_").replace(",", ""))
      _, seconds, peak = timed(lambda: hf.save(path, cfg, params, **kwargs))
      files, mb = size_of(path)
      rows.append((f"hf.save ({name})", files, mb, seconds, peak))
      (_, loaded), seconds, peak = timed(lambda: hf.load(path))
      rows.append((f"hf.load ({name})", files, mb, seconds, peak))
      if name == "float32":
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)))
      del loaded
    src = os.path.join(root, "float32")
    run = os.path.join(root, "run")
    _, seconds, peak = timed(lambda: export.import_hf(src, run))
    rows.append(("python -m jaxllm.hf import (load + orbax save)", *size_of(os.path.join(run, "checkpoints")),
                 seconds, peak))
    out = os.path.join(root, "exported")
    _, seconds, peak = timed(lambda: export.to_hf(run, out))
    rows.append(("python -m jaxllm.hf export (orbax load + save)", *size_of(out), seconds, peak))
  finally:
    shutil.rmtree(root)
  print(f"| {'step':<48} | files | MB on disk | seconds | MB/s | peak MB |")
  print(f"| {'-' * 48} | ----: | ---------: | ------: | ---: | ------: |")
  for what, files, mb, seconds, peak in rows:
    print(f"| {what:<48} | {files:>5} | {mb:>10.0f} | {seconds:>7.2f} | {mb / seconds:>4.0f} | {peak:>7.0f} |")


if __name__ == "__main__":
  main()
