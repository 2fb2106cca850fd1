"""Metrics: JSONL + TensorBoard writers, a progress line, a measured matmul peak for MFU, and a loss plot."""

from __future__ import annotations

import functools
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from tensorboardX import SummaryWriter


class MetricsWriter:
  """Appends rows to `workdir/metrics.jsonl` and TensorBoard event files in `workdir/tb`. Only process 0 writes."""

  def __init__(self, workdir: str, *, resume_step: int | None = None):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.active = jax.process_index() == 0
    self._tb = None
    if not self.active:
      return
    tb = os.path.join(workdir, "tb")
    if resume_step is not None:
      self._truncate_after(resume_step)
    elif os.path.exists(self.path):
      os.remove(self.path)  # a fresh run in a workdir that holds no checkpoint
    # TensorBoard drops the events from this step on that an earlier writer logged (the steps to be redone)
    purge = resume_step + 1 if resume_step is not None else 0 if os.path.isdir(tb) else None
    self._tb = SummaryWriter(tb, purge_step=purge)

  def _truncate_after(self, step: int):
    """Drops rows logged after `step` by a run that died before its next checkpoint (they will be redone)."""
    if not os.path.exists(self.path):
      return
    with open(self.path) as f:
      rows = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(self.path + ".tmp", "w") as f:
      f.writelines(rows)
    os.replace(self.path + ".tmp", self.path)

  def write(self, step: int, scalars: dict):
    if not self.active:
      return
    row = {"step": int(step), **{k: _plain(v) for k, v in scalars.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    for key, value in row.items():
      if key != "step" and isinstance(value, (int, float)):
        self._tb.add_scalar(key, value, step)

  def close(self):
    if self._tb is not None:
      self._tb.close()


def _plain(v):
  v = np.asarray(v).item() if hasattr(v, "shape") or isinstance(v, np.generic) else v
  return float(v) if isinstance(v, float) else v


def read_metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


class Progress:
  """One log line per call: step, loss, learning rate, tokens/s, MFU and ETA."""

  def __init__(self, total_steps: int, start_step: int):
    self.total, self.start, self.t0 = total_steps, start_step, time.time()

  def line(self, step: int, row: dict) -> str:
    done = step - self.start
    eta = (time.time() - self.t0) / max(done, 1) * (self.total - step)
    parts = [f"step {step}/{self.total}", f"loss {row['loss']:.4f}", f"lr {row['learning_rate']:.2e}",
             f"{row['tokens_per_sec']:,.0f} tok/s", f"mfu {100 * row['mfu']:.1f}%",
             f"eta {time.strftime('%H:%M:%S', time.gmtime(eta))}"]
    return " | ".join(parts)


# Dense bfloat16 peak FLOP/s of a GPU, from its datasheet: the denominator of MFU on a GPU, as MaxText and torchtitan
# report it (whatever the compute dtype: a float32 run is measured against the bf16 peak it gives up).
DATASHEET_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}


def datasheet_peak(device_kind: str) -> float | None:
  """The datasheet peak of a GPU named `device_kind` ("NVIDIA H100 80GB HBM3"), or None for another device."""
  return next((v for k, v in DATASHEET_PEAK.items() if k.lower() in device_kind.lower()), None)


def peak_flops(dtype: str = "float32") -> tuple[float, str]:
  """(FLOP/s of one device, how it was known): a GPU's datasheet bf16 peak ("datasheet") when known, else a
  matmul measured here in `dtype` ("measured", on CPU and unknown GPUs)."""
  dev = jax.devices()[0]
  if dev.platform == "gpu" and (peak := datasheet_peak(dev.device_kind)):
    return peak, "datasheet"
  return measure_peak_flops(dtype), "measured"


def measure_peak_flops(dtype: str = "float32", n: int | None = None, seconds: float = 0.3, trials: int = 3,
                       fresh: bool = False) -> float:
  """FLOP/s of a large square matmul on the default device, in `dtype`: the denominator of MFU.
  The best of `trials` timed windows of about `seconds` each; measured once per process and setting (a second
  run in the same process, as in tests and notebooks, reuses it). With JAXLLM_PEAK_FLOPS_CACHE=FILE set (the test
  suite sets it), processes share one measurement per setting through that JSON file. `fresh` measures now and
  caches nothing: a benchmark beside the step it divides, on a machine whose speed moves."""
  dev = jax.devices()[0]
  key = (dev.platform, dev.device_kind, dtype, n or (8192 if dev.platform == "gpu" else 1024), seconds, trials)
  if fresh:
    return _measure_peak_flops.__wrapped__(*key)
  path = os.environ.get("JAXLLM_PEAK_FLOPS_CACHE")
  if not path:
    return _measure_peak_flops(*key)
  name = json.dumps(key)
  try:
    with open(path) as f:
      known = json.load(f)
  except (OSError, ValueError):
    known = {}
  if name not in known:
    known[name] = _measure_peak_flops(*key)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
      json.dump(known, f)
    os.replace(tmp, path)  # whole files only: concurrent writers lose an entry at worst, never the file
  return known[name]


@functools.cache
def _measure_peak_flops(platform: str, device_kind: str, dtype: str, n: int, seconds: float, trials: int) -> float:
  del platform, device_kind  # the cache key: the device the measurement is of
  a = jax.random.normal(jax.random.key(0), (n, n), dtype=jnp.dtype(dtype))
  mm = jax.jit(lambda x, y: x @ y)
  mm(a, a).block_until_ready()  # compile
  reps, best = 1, 0.0
  for _ in range(trials):
    t = 0.0
    while t < seconds:
      start = time.perf_counter()
      out = a
      for _ in range(reps):
        out = mm(a, out)
      out.block_until_ready()
      t = time.perf_counter() - start
      if t < seconds:
        reps *= 2
    best = max(best, 2 * n ** 3 * reps / t)
  return best


def plot_losses(workdir: str, rows: list[dict] | None = None) -> str | None:
  """loss.png next to the run: training loss and validation loss against step."""
  rows = read_metrics(workdir) if rows is None else rows
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return None
  train = [(r["step"], r["loss"]) for r in rows if "loss" in r and math.isfinite(r["loss"])]
  evals = [(r["step"], r["eval/loss"]) for r in rows if "eval/loss" in r]
  fig, ax = plt.subplots(figsize=(6, 4))
  if train:
    ax.plot(*zip(*train), label="train loss")
  if evals:
    ax.plot(*zip(*evals), "o-", label="validation loss")
  ax.set_xlabel("step")
  ax.set_ylabel("cross-entropy (nats/token)")
  ax.set_title(os.path.basename(os.path.abspath(workdir)))
  ax.grid(alpha=0.3)
  ax.legend()
  path = os.path.join(workdir, "loss.png")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
