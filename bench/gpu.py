"""One GPU: tokens/s, MFU, peak memory and compile time of the 124m and 1b pretrain steps (bfloat16, remat full, as
configs/pretrain.py's recipes), and at the first size the LoRA and DPO steps against its pretrain step.

  bash bench/gpu.sh                                   # on one GPU: this script with --write, under `timeout 480`
  python bench/gpu.py [--size 124m,1b] [--seq 2048] [--batch N] [--steps 5] [--windows 3] [--write]
  python bench/gpu.py --smoke                         # CPU: the same steps at tiny shapes (--size tiny --seq 128
                                                      # --batch 4 --steps 1), about a minute; never writes
  python bench/gpu.py --compile-only                  # memory and compile time only, nothing allocated

Each row runs in a process of its own, so that the device's peak_bytes_in_use is that step's, and a row that runs
out of memory or time leaves the others' numbers. A step is built as jaxllm/build.py builds it (the Task's loss,
wrapped by the tuning of peft.make; its frozen trees from tuning.frozen), lowered and compiled ahead of time from
abstract shapes (timed), then timed on one fixed random batch: the best of --windows windows of --steps steps.
MFU is model FLOPs (model.flops_per_token of what the step computes: a frozen base has no weight gradient, DPO
runs the reference forward too) per second over metrics.peak_flops: a known GPU's datasheet bf16 peak, else a
matmul measured here.
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

import flax.linen as nn
import jax

from configs import dpo, pretrain
from train_step import random_batch  # bench/train_step.py, beside this file
from jaxllm import config as config_lib, metrics, model as model_lib, optim, peft, step as step_lib, tasks

BATCH = {"124m": 32, "1b": 8}  # per-device micro-batch at seq 2048 that fits one 80-141 GB GPU (remat full)
ROWS = ("pretrain", "lora", "dpo", "dpo_lora")  # the last three at the first size only
TITLES = {"pretrain": "pretrain", "lora": "LoRA r=8 (attention, mlp)", "dpo": "DPO (policy + frozen reference)",
          "dpo_lora": "DPO, LoRA (its base is the reference)"}
HEADING = "## One GPU (#19, item 6)"
SMOKE_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def row_config(row: str, size: str, batch: int, seq: int):
  """The config of a row: the size's pretrain recipe (dtype, remat), or configs/dpo.py's, at batch x seq."""
  if row.startswith("dpo"):
    config = dpo.get_config(f"size={size},lora={row == 'dpo_lora'}").unlock()
    batch = max(1, batch // 2)  # pairs: as many sequences through the model as the pretrain row
  else:
    config = pretrain.get_config(f"size={size}").unlock()
    config.lora.enabled = row == "lora"
  config.init_from = "(bench)"  # the tunings' frozen trees come from a random init here
  if jax.default_backend() == "gpu":
    config.model.attention = "dot_product"  # cuDNN's fused attention where it applies
  config.train.batch_size, config.train.seq_len, config.train.grad_accum = batch, seq, 1
  return config


def measure(args, row: str, size: str) -> dict:
  """One row: build, lower and compile (timed), memory, then the timed steps unless --compile-only."""
  say = lambda message: print(f"[{row} {size}] {message}", flush=True)
  config = row_config(row, size, args.batch or BATCH.get(size, 4), args.seq)
  model_cfg = config_lib.resolve_model(config, args.vocab)
  task = tasks.make(config)
  tuning = peft.make(config, model_cfg, task.needs_reference)
  tx = optim.optimizer(config.optimizer, config.train.steps)
  init = lambda r: nn.meta.unbox(step_lib.init_state(r, init_trainable=tuning.init_trainable, tx=tx))
  frozen_trees = lambda: tuning.frozen(lambda: model_lib.init(model_cfg, jax.random.key(1)))[0]
  b, t = config.train.batch_size, config.train.seq_len
  batch = random_batch(model_cfg.vocab_size, b, t, getattr(task, "sides", ()))
  step = jax.jit(lambda state, batch, frozen: step_lib.train_step(
      state, batch, frozen, loss_fn=tuning.wrap(task.loss_fn(model_cfg), train=True), tx=tx,
      lr_schedule=optim.schedule(config.optimizer, config.train.steps), grad_accum=1), donate_argnums=0)
  say(f"{model_lib.num_params(model_cfg) / 1e6:.0f}M params, {model_cfg.dtype}, remat {model_cfg.remat_policy}, "
      f"batch {b} x {t}: compiling")
  start = time.perf_counter()
  lowered = step.lower(jax.eval_shape(init, jax.random.key(0)), batch, jax.eval_shape(frozen_trees))
  middle = time.perf_counter()
  compiled = lowered.compile()
  lower_s, compile_s = middle - start, time.perf_counter() - middle
  mem = compiled.memory_analysis()
  compiled_peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                   - mem.alias_size_in_bytes) if mem is not None else None
  peak, how = metrics.peak_flops(model_cfg.dtype)
  dev = jax.devices()[0]
  out = dict(row=row, size=size, batch=b, seq=t, sequences_per_row=task.sequences_per_row, dtype=model_cfg.dtype,
             remat=model_cfg.remat_policy, attention=model_cfg.attention, params=model_lib.num_params(model_cfg),
             lower_s=lower_s,
             compile_s=compile_s, compiled_peak_bytes=compiled_peak, peak_flops=peak, peak_how=how,
             flops_per_token=model_lib.flops_per_token(model_cfg, t, frozen_weights=bool(tuning.name),
                                                       reference=task.reference_in_step()),
             device_kind=dev.device_kind, platform=dev.platform, jax=jax.__version__)
  say(f"lowered in {lower_s:.1f} s, compiled in {compile_s:.1f} s; compiled peak "
      f"{(compiled_peak or 0) / 2**30:.2f} GiB")
  if args.compile_only:
    return out
  state, frozen = jax.jit(init)(jax.random.key(0)), frozen_trees()
  batch = jax.device_put(batch)
  tokens = task.tokens_per_step()

  def window(steps: int) -> float:
    nonlocal state
    start = time.perf_counter()
    for _ in range(steps):
      state, m = compiled(state, batch, frozen)
    jax.block_until_ready(m)
    return tokens * steps / (time.perf_counter() - start)

  window(args.warmup)
  best = 0.0
  for i in range(args.windows):
    best = max(best, window(args.steps))
    say(f"window {i + 1}/{args.windows}: best {best:,.0f} tokens/s")
  stats = dev.memory_stats() or {}
  out.update(tokens_per_s=best, device_peak_bytes=stats.get("peak_bytes_in_use"))
  return out


def child(args):
  """--row: one row in this process; its dict (or its error) goes to the JSON file --out."""
  try:
    result = measure(args, args.row, args.size)
  except Exception as e:  # out of memory, a compile error: the table names it, the traceback is above
    first_line = (str(e).strip().splitlines() or [""])[0][:200]
    with open(args.out, "w") as f:
      json.dump({"error": f"{type(e).__name__}: {first_line}"}, f)
    raise
  with open(args.out, "w") as f:
    json.dump(result, f)


def gib(n) -> str:
  return "n/a" if n is None else f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def table(results: list[tuple[str, str, dict]], args) -> str:
  ok = [r for _, _, r in results if "error" not in r]
  if not ok:
    return "no row ran\n"
  first = ok[0]
  peak_line = (f"MFU against the {first['peak_how']} peak of {first['device_kind']}: "
               f"{first['peak_flops'] / 1e12:.3g} TFLOP/s"
               + (" (dense bf16)" if first["peak_how"] == "datasheet" else f" ({first['dtype']} matmul)"))
  lines = [peak_line, "",
           "| step | size | dtype, remat, attention | batch x seq | tokens/s | vs pretrain | model GFLOP/token | MFU | "
           "compiled peak | device peak | compile (lower + compile) |",
           "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
  base_tps = {r["size"]: r.get("tokens_per_s") for _, _, r in results if r.get("row") == "pretrain"}
  for row, size, r in results:
    if "error" in r:
      lines.append(f"| {TITLES[row]} | {size} | | | {r['error']} | | | | | | |")
      continue
    tps, base = r.get("tokens_per_s"), base_tps.get(size)
    pairs = " pairs" if r["sequences_per_row"] == 2 else ""
    lines.append(
        f"| {TITLES[row]} | {size} | {r['dtype']}, {r['remat']}, {r['attention']} | {r['batch']}{pairs} x "
        f"{r['seq']} | "
        + (f"{tps:,.0f} | " if tps else "- | ")
        + (f"{tps / base:.2f}x | " if tps and base and row != "pretrain" else "| ")
        + f"{r['flops_per_token'] / 1e9:.3g} | "
        + (f"{100 * tps * r['flops_per_token'] / r['peak_flops']:.1f}% | " if tps else "- | ")
        + f"{gib(r['compiled_peak_bytes'])} | {gib(r.get('device_peak_bytes'))} | "
          f"{r['lower_s']:.1f} + {r['compile_s']:.1f} s |")
  timed = ("compile only: nothing timed" if args.compile_only else
           f"tokens/s: the best of {args.windows} windows of {args.steps} step(s) after {args.warmup} warm-up")
  lines += ["", f"{timed}; a DPO pair is two sequences (chosen + rejected), both counted. Model FLOPs/token: "
            "model.flops_per_token (6N + causal attention; a frozen base has no weight gradient, DPO adds the "
            "reference's forward; remat's recomputation not counted). Compiled peak: XLA's memory analysis of "
            "the step (arguments + outputs + temporaries - aliases); device peak: the allocator's "
            "peak_bytes_in_use in the row's own process."]
  return "\n".join(lines) + "\n"


def write(text: str, first: dict, command: str, path: str):
  """Appends a dated entry under HEADING in bench/RESULTS.md (the heading added at the end if missing)."""
  entry = (f"{time.strftime('%Y-%m-%d')}, {first['device_kind']}, jax {first['jax']}:\n\n```bash\n{command}\n```\n\n"
           f"{text}")
  with open(path) as f:
    doc = f.read()
  at = doc.find(HEADING)
  if at < 0:
    doc = doc.rstrip("\n") + f"\n\n{HEADING}\n\n{entry}"
  else:
    end = doc.find("\n## ", at + len(HEADING))
    end = len(doc) if end < 0 else end + 1
    doc = doc[:end].rstrip("\n") + f"\n\n{entry}" + ("\n" + doc[end:] if end < len(doc) else "")
  with open(path, "w") as f:
    f.write(doc)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--size", default="124m,1b", help="presets, comma-separated; LoRA and DPO run at the first")
  p.add_argument("--seq", type=int, default=2048)
  p.add_argument("--batch", type=int, default=0, help=f"sequences per step (0 = per size: {BATCH}); DPO: half, "
                 "in pairs")
  p.add_argument("--vocab", type=int, default=2048, help="a preset without its own vocabulary (tiny, small)")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--steps", type=int, default=5, help="steps per timed window")
  p.add_argument("--windows", type=int, default=3)
  p.add_argument("--rows", default=",".join(ROWS), help=f"of {ROWS}")
  p.add_argument("--compile-only", action="store_true", help="compile time and compiled memory, nothing allocated")
  p.add_argument("--smoke", action="store_true", help="CPU check of the code paths: --size tiny --seq 128 --batch 4 "
                 "--steps 1, XLA's cheaper optimisation levels (half the compile time)")
  p.add_argument("--budget", type=float, default=420, help="seconds for all rows; rows past it are skipped")
  p.add_argument("--write", action="store_true", help="append the table to bench/RESULTS.md (GPU runs only)")
  p.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one row in this process
  p.add_argument("--out", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.smoke:
    args.size, args.seq, args.batch, args.steps = "tiny", 128, 4, 1
  if args.row:
    return child(args)

  sizes = args.size.split(",")
  plan = [(row, size) for size in sizes for row in ROWS
          if row in args.rows.split(",") and (row == "pretrain" or size == sizes[0])]
  plan.sort(key=lambda rs: rs[0] != "pretrain")  # the pretrain rows first: the ratios' base and the headline
  start, results = time.perf_counter(), []
  env = dict(os.environ)
  with tempfile.TemporaryDirectory() as tmp:
    env.setdefault("JAXLLM_PEAK_FLOPS_CACHE", os.path.join(tmp, "peak_flops.json"))  # measured once on a CPU
    if args.smoke:  # the numbers of a smoke run mean nothing: compile fast
      env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {SMOKE_XLA_FLAGS}".strip()
    for row, size in plan:
      left = args.budget - (time.perf_counter() - start)
      if left < 20:
        results.append((row, size, {"error": f"skipped: the {args.budget:.0f} s budget is spent"}))
        continue
      out = os.path.join(tmp, f"{row}_{size}.json")
      command = [sys.executable, os.path.abspath(__file__), "--row", row, "--size", size, "--out", out,
                 "--seq", str(args.seq), "--batch", str(args.batch), "--vocab", str(args.vocab),
                 "--warmup", str(args.warmup), "--steps", str(args.steps), "--windows", str(args.windows)]
      command += ["--compile-only"] if args.compile_only else []
      print(f"== {TITLES[row]}, {size} ({left:.0f} s of the budget left)", flush=True)
      try:
        rc = subprocess.run(command, env=env, timeout=left, check=False).returncode
        if os.path.exists(out):
          with open(out) as f:
            result = json.load(f)
        else:
          result = {"error": f"exit {rc}"}
      except subprocess.TimeoutExpired:
        result = {"error": f"timed out after {left:.0f} s"}
      results.append((row, size, result))
  text = table(results, args)
  print(f"\n{text}", flush=True)
  ok = [r for _, _, r in results if "error" not in r]
  if args.write and ok and ok[0]["platform"] == "gpu" and not args.compile_only:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
    write(text, ok[0], "python bench/gpu.py " + shlex.join(sys.argv[1:]), path)
    print(f"appended to {path} under {HEADING!r}", flush=True)
  elif args.write:
    print("not written to bench/RESULTS.md: not a GPU run, or --compile-only", flush=True)
  print(f"total {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
  main()
