"""Tokens/s and MFU of the real train step (train.train_step, jitted as the loop jits it) for a few variants.

  python bench/train_step.py [--size tiny] [--steps 20] [--batch 16] [--seq 128]
  python bench/train_step.py --size 1b --batch 1 --seq 2048 --compile-only    # ahead-of-time compile time
  python bench/train_step.py --size small --vocab 8192 --batch 8 --seq 256 --peer   # against PyTorch ([bench])

MFU is model FLOPs (6N + causal attention, model.flops_per_token) per second over a measured matmul peak of this
device (metrics.measure_peak_flops), so rows are comparable with each other on the same machine.
"""

import argparse
import dataclasses
import functools
import json
import os
import subprocess
import sys
import time

import flax.linen as nn
import jax
import numpy as np

from configs import pretrain
import jaxllm
from jaxllm import config as config_lib, metrics, model as model_lib, optim, sharding, step as step_lib, tasks


def random_batch(vocab: int, b: int, t: int, sides=()) -> dict:
  """One fixed random batch of [b, t] rows, one document each, every token weighted; with `sides` (a preference
  task's ("chosen", "rejected")), those fields once per side, prefixed "chosen_", "rejected_"."""
  rng = np.random.default_rng(0)
  batch = {}
  for p in [f"{s}_" for s in sides] or [""]:
    batch.update({p + "inputs": rng.integers(0, vocab, (b, t), dtype=np.int32),
                  p + "targets": rng.integers(0, vocab, (b, t), dtype=np.int32),
                  p + "segment_ids": np.ones((b, t), np.int32),
                  p + "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)),
                  p + "loss_mask": np.ones((b, t), np.float32)})
  return batch


def bench_config(args):
  """The pretrain preset at --size, --batch, --seq, with each --set KEY=VALUE applied as the CLI applies it."""
  config = pretrain.get_config(f"size={args.size}")
  config.train.batch_size, config.train.seq_len = args.batch, args.seq
  for item in args.set:
    key, _, value = item.partition("=")
    config_lib.override(config, key, config_lib.literal(value))
  return config


def stepper(config, model_cfg):
  """The compiled train step on one fixed random batch, as `window(steps) -> tokens/s`."""
  loss_fn = tasks.make(config).loss_fn(model_cfg)
  tx = optim.optimizer(config.optimizer, config.train.steps)
  mesh = sharding.make_mesh(config.mesh)
  init = functools.partial(step_lib.init_state, init_trainable=functools.partial(model_lib.init_boxed, model_cfg),
                           tx=tx)
  state_sharding = sharding.logical_to_sharding(nn.get_partition_spec(jax.eval_shape(init, jax.random.key(0))), mesh)
  batch_sharding = sharding.batch_sharding(mesh)
  state = jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=state_sharding)(jax.random.key(0))
  b, t = config.train.batch_size, config.train.seq_len
  batch = sharding.put_batch(random_batch(model_cfg.vocab_size, b, t), batch_sharding)
  step = jax.jit(functools.partial(step_lib.train_step, loss_fn=loss_fn, tx=tx,
                                   lr_schedule=optim.schedule(config.optimizer, config.train.steps),
                                   grad_accum=config.train.grad_accum),
                 in_shardings=(state_sharding, batch_sharding, None), out_shardings=(state_sharding, None),
                 donate_argnums=0)
  state, m = step(state, batch, None)
  jax.block_until_ready(m)
  holder = [state]

  def window(steps: int) -> float:
    state, start = holder[0], time.perf_counter()
    for _ in range(steps):
      state, m = step(state, batch, None)
    jax.block_until_ready(m)
    holder[0] = state
    return b * t * steps / (time.perf_counter() - start)

  window.hlo = lambda: step.lower(holder[0], batch, None).compile().as_text()  # the optimized module, for profiles
  return window


def compile_seconds(config, model_cfg) -> tuple[float, float]:
  """(lowering, compile) seconds of the real train step, ahead of time from abstract shapes: nothing allocated,
  so the 1b preset's step compiles on a laptop (issue #19 item 7: <= 60 s)."""
  loss_fn = tasks.make(config).loss_fn(model_cfg)
  tx = optim.optimizer(config.optimizer, config.train.steps)
  init = functools.partial(step_lib.init_state, init_trainable=functools.partial(model_lib.init_boxed, model_cfg),
                           tx=tx)
  state = jax.eval_shape(lambda r: nn.meta.unbox(init(r)), jax.random.key(0))
  b, t = config.train.batch_size, config.train.seq_len
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), random_batch(model_cfg.vocab_size, b, t))
  step = jax.jit(functools.partial(step_lib.train_step, loss_fn=loss_fn, tx=tx,
                                   lr_schedule=optim.schedule(config.optimizer, config.train.steps),
                                   grad_accum=config.train.grad_accum), donate_argnums=0)
  start = time.perf_counter()
  lowered = step.lower(state, batch, None)
  middle = time.perf_counter()
  lowered.compile()
  return middle - start, time.perf_counter() - middle


def peer(config, model_cfg, args):
  """jaxllm's step and the PyTorch peer's, A/B/A/B: each round times jaxllm in this process (the compiled step
  kept) and then the peer in a subprocess (bench/peer.py, same shapes), so both see the same machine load."""
  window = stepper(config, model_cfg)
  fpt = model_lib.flops_per_token(model_cfg, args.seq)
  command = [sys.executable, os.path.join(os.path.dirname(__file__), "peer.py"), "--size", args.size, "--vocab",
             str(args.vocab), "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps)]
  print(f"{args.size} (d {model_cfg.d_model}, {model_cfg.num_layers} layers, vocab {args.vocab}), batch {args.batch} "
        f"x {args.seq}, float32, AdamW, on {jax.devices()[0].device_kind} ({os.cpu_count()} cores); "
        f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r} here, {args.peer_malloc} in the peer\n")
  print("| round | jaxllm tokens/s | PyTorch tokens/s | ratio | jaxllm matmul FLOP/s / XLA fp32 matmul | "
        "PyTorch's / torch fp32 matmul |")
  print("| ---: | ---: | ---: | ---: | ---: | ---: |")
  ratios = []
  for r in range(args.rounds):
    ours = max(window(args.steps) for _ in range(3))
    xla_matmul = metrics.measure_peak_flops("float32", fresh=True)  # beside the step: it moves 10-15% by the minute
    env = dict(os.environ)
    if args.peer_malloc == "system":
      env.pop("GLIBC_TUNABLES", None)
      env["JAXLLM_MALLOC"] = "system"
    result = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if result.returncode:
      raise SystemExit(f"bench/peer.py failed (pip install -e '.[bench]' for torch + transformers):\n"
                       f"{result.stderr[-2000:]}")
    theirs = json.loads(result.stdout.strip().splitlines()[-1])
    ratios.append(ours / theirs["tokens_per_s"])
    print(f"| {r + 1} | {ours:,.0f} | {theirs['tokens_per_s']:,.0f} | {ratios[-1]:.2f}x | "
          f"{100 * ours * fpt / xla_matmul:.0f}% of {xla_matmul / 1e9:.0f} GFLOP/s | "
          f"{100 * theirs['tokens_per_s'] * fpt / theirs['matmul_flops']:.0f}% of "
          f"{theirs['matmul_flops'] / 1e9:.0f} GFLOP/s |", flush=True)
  print(f"\nmedian ratio {float(np.median(ratios)):.2f}x (jaxllm / PyTorch {theirs['torch']}, transformers "
        f"{theirs['transformers']}, {theirs['threads']} torch threads; jax {jax.__version__})")


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--size", default="tiny")
  p.add_argument("--vocab", type=int, default=2048)
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--compile-only", action="store_true",
                 help="only the step's lowering and compile time, from abstract shapes (e.g. --size 1b --batch 1 "
                      "--seq 2048)")
  p.add_argument("--peer", action="store_true",
                 help="alternate jaxllm's step with bench/peer.py's PyTorch step (A/B/A/B) and print the ratio")
  p.add_argument("--peer-malloc", choices=("hugepages", "system"), default="hugepages",
                 help="the peer's glibc malloc: hugepages (as jaxllm's: jaxllm.relaunch_with_hugepages) or system "
                      "(glibc's defaults, PyTorch as it runs out of the box)")
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--variants", default="", help="comma-separated names of the variants to time (default: all)")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="a config override, as on the CLI (--set model.attention=dot_product); applies to all variants")
  args = p.parse_args()
  config = bench_config(args)
  base = config_lib.resolve_model(config, args.vocab)
  if args.compile_only:
    for name, model_cfg in (("scan (the preset)", base), ("python loop", dataclasses.replace(base, scan_layers=False))):
      lower, comp = compile_seconds(config, model_cfg)
      print(f"{args.size} train step ({name}, {model_cfg.dtype}, remat {model_cfg.remat_policy}, batch {args.batch} x "
            f"{args.seq}) on {jax.devices()[0].device_kind}: lowering {lower:.1f} s, compile {comp:.1f} s", flush=True)
    return
  if args.peer:
    return peer(config, base, args)
  variants = {
      "scan": dataclasses.replace(base, scan_layers=True),
      "loop": dataclasses.replace(base, scan_layers=False),         # a Python loop over layers
      "one_query_block": dataclasses.replace(base, query_blocks=1),  # attention over all keys in one block
      "remat_full": dataclasses.replace(base, remat_policy="full"),
      "remat_dots": dataclasses.replace(base, remat_policy="dots"),
      "bf16": dataclasses.replace(base, dtype="bfloat16"),          # bfloat16 compute
  }
  peaks = {dt: metrics.measure_peak_flops(dt) * jax.device_count() for dt in ("float32", "bfloat16")}
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}; measured matmul peak "
        f"float32 {peaks['float32'] / 1e9:.1f} GFLOP/s, bfloat16 {peaks['bfloat16'] / 1e9:.1f} GFLOP/s")
  print(f"model {args.size}: {model_lib.num_params(base) / 1e6:.2f}M params, batch {args.batch} x {args.seq}\n")
  print("| variant | tokens/s | MFU (vs measured peak of its dtype) | MFU vs float32 peak |")
  print("| --- | ---: | ---: | ---: |")
  fpt = model_lib.flops_per_token(base, args.seq)
  chosen = [v.strip() for v in args.variants.split(",") if v.strip()] or list(variants)
  if unknown := set(chosen) - set(variants):
    raise SystemExit(f"--variants: unknown {sorted(unknown)}; have {list(variants)}")
  windows = {name: stepper(config, variants[name]) for name in chosen}  # all compiled first
  best = dict.fromkeys(chosen, 0.0)
  for _ in range(3):  # in turn, round robin, best of three: a busy moment of the machine hits every variant alike
    for name in chosen:
      best[name] = max(best[name], windows[name](args.steps))
  for name in chosen:
    tps, model_cfg = best[name], variants[name]
    print(f"| {name} | {tps:,.0f} | {100 * tps * fpt / peaks[model_cfg.dtype]:.1f}% | "
          f"{100 * tps * fpt / peaks['float32']:.1f}% |", flush=True)


if __name__ == "__main__":
  jaxllm.relaunch_with_hugepages()  # as the jaxllm command runs (bench/RESULTS.md, #19)
  main()
