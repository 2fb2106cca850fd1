"""Full fine-tuning against LoRA, prompt tuning and prefix tuning on the same batch: trainable params,
optimizer-state bytes, compiled memory and step time of the real train step (step.train_step through the
jaxllm/peft.py tuning), small preset by default. LoRA
runs on the trainer's unmerged path (each module x·(W + s·A·B) with a backward pass that never forms dL/dW; with
dropout, x·W + s·(drop(x)·A)·B) and, for comparison, on the merged one (model on merge(W, ΔW)).
A last row trains only the norm scales of the frozen model: no weight gradient at all, the floor a LoRA step
approaches as its adapters get cheaper. Step times are taken in turn, round robin, best of --rounds.

  python bench/lora.py [--size small] [--rank 8] [--virtual 20] [--batch 8] [--seq 256] [--steps 3] [--rounds 3]

Memory is XLA's compiled memory analysis of the step (arguments + outputs + temporaries, aliasing excluded): the
peak a device needs, known without running on one.
"""

import argparse
import functools
import time

import flax.linen as nn
import jax

from configs import pretrain
from train_step import random_batch  # bench/train_step.py, beside this file
from jaxllm import config as config_lib, lora, model as model_lib, optim, peft, step as step_lib, tasks


def norms_only(model_cfg, config):
  """(loss_fn, init_trainable) training only the RMSNorm scales of a frozen base (frozen["base"]): the forward
  pass plus the backward pass through every activation, and no weight gradient. The floor of any method that
  freezes the matrices; LoRA's distance above it is the cost of its adapters."""
  task_loss = tasks.make(config).loss_fn(model_cfg)
  norms = lambda p: {"layers": {k: p["layers"][k] for k in ("attn_norm", "mlp_norm")}, "final_norm": p["final_norm"]}

  def loss_fn(scales, batch, frozen, rng=None):
    params = dict(frozen["base"], final_norm=scales["final_norm"], layers=dict(frozen["base"]["layers"],
                                                                               **scales["layers"]))
    return task_loss(params, batch, frozen, rng)

  return loss_fn, lambda rng: norms(model_lib.init_boxed(model_cfg, rng))


def measure(config, model_cfg, steps, floor=False):
  if floor:
    loss_fn, init_trainable = norms_only(model_cfg, config)
  else:
    tuning = peft.make(config, model_cfg, needs_reference=False)
    loss_fn, init_trainable = tuning.wrap(tasks.make(config).loss_fn(model_cfg), train=True), tuning.init_trainable
  tx = optim.optimizer(config.optimizer, config.train.steps)
  init = functools.partial(step_lib.init_state, init_trainable=init_trainable, tx=tx)
  state = jax.jit(lambda r: nn.meta.unbox(init(r)))(jax.random.key(0))
  frozen = {}
  if floor or peft.kind(config) != "full":
    base = model_lib.init(model_cfg, jax.random.key(1))
    frozen["base"] = lora.quantize_int8(base, config.lora.targets) if config.lora.quantize_base else base
  b, t = config.train.batch_size, config.train.seq_len
  batch = random_batch(model_cfg.vocab_size, b, t)
  step = jax.jit(functools.partial(step_lib.train_step, loss_fn=loss_fn, tx=tx,
                                   lr_schedule=optim.schedule(config.optimizer, config.train.steps), grad_accum=1),
                 donate_argnums=0)
  compiled = step.lower(state, batch, frozen).compile()
  mem = compiled.memory_analysis()
  flops = compiled.cost_analysis()["flops"]  # XLA's count for the compiled step: what the device must compute
  peak = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
  nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
  row = dict(trainable=sum(x.size for x in jax.tree.leaves(state.params)), opt=nbytes(state.opt_state),
             frozen=nbytes(frozen), peak=peak, flops=flops, step=float("inf"))
  holder = [state]

  def timed_steps():  # seconds per step over `steps` steps
    start = time.perf_counter()
    for _ in range(steps):
      holder[0], m = compiled(holder[0], batch, frozen)
    jax.block_until_ready(m)
    return (time.perf_counter() - start) / steps

  timed_steps()  # warm-up
  return row, timed_steps


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--size", default="small")
  p.add_argument("--vocab", type=int, default=8192)
  p.add_argument("--rank", type=int, default=8)
  p.add_argument("--virtual", type=int, default=20, help="virtual tokens of prompt and prefix tuning")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--steps", type=int, default=3, help="steps per timing")
  p.add_argument("--rounds", type=int, default=3, help="timings of each run, taken in turn; the best counts")
  args = p.parse_args()
  config = pretrain.get_config(f"size={args.size}").unlock()
  config.train.batch_size, config.train.seq_len = args.batch, args.seq
  config.init_from = "(bench)"
  model_cfg = config_lib.resolve_model(config, args.vocab)
  rows, timers = {}, {}
  for name, enabled, quantize, merged, dropout in (
      ("full fine-tune", False, False, False, 0.0),
      (f"LoRA r={args.rank}", True, False, False, 0.0),
      (f"LoRA r={args.rank}, dropout 0.05 (adds x·W + s·(drop(x)·A)·B)", True, False, False, 0.05),
      (f"LoRA r={args.rank}, merged forward", True, False, True, 0.0),
      (f"LoRA r={args.rank}, int8 base", True, True, False, 0.0)):
    config.lora.enabled, config.lora.rank, config.lora.quantize_base = enabled, args.rank, quantize
    config.lora.merged, config.lora.dropout = merged, dropout
    config.lora.alpha = 2.0 * args.rank
    rows[name], timers[name] = measure(config, model_cfg, args.steps)
  config.lora.enabled, config.lora.quantize_base, config.lora.dropout = False, False, 0.0
  for name, prompt, prefix, hidden in ((f"prompt tuning, {args.virtual} tokens", args.virtual, 0, 0),
                                       (f"prefix tuning, {args.virtual} tokens", 0, args.virtual, 0),
                                       (f"prefix tuning, {args.virtual} tokens, MLP 512", 0, args.virtual, 512)):
    config.prompt_tuning.num_tokens, config.prefix_tuning.num_tokens = prompt, prefix
    config.prefix_tuning.hidden = hidden
    rows[name], timers[name] = measure(config, model_cfg, args.steps)
  config.prompt_tuning.num_tokens = config.prefix_tuning.num_tokens = 0
  floor = "frozen matrices, norms trained (floor)"
  rows[floor], timers[floor] = measure(config, model_cfg, args.steps, floor=True)
  for _ in range(args.rounds):  # round robin, best of each: slow drifts of a shared machine hit every row alike
    for name, timed_steps in timers.items():
      rows[name]["step"] = min(rows[name]["step"], timed_steps())
  full = rows["full fine-tune"]
  print(f"device: {jax.devices()[0].device_kind}; model {args.size}: {model_lib.num_params(model_cfg) / 1e6:.1f}M "
        f"params; batch {args.batch} x {args.seq}; LoRA targets {config.lora.targets}\n")
  print("| run | trainable params | optimizer state | frozen tree | compiled peak memory | step FLOPs (XLA) | "
        "step time | vs full |")
  print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
  for name, r in rows.items():
    print(f"| {name} | {r['trainable']:,} ({100 * r['trainable'] / full['trainable']:.2f}%) | "
          f"{r['opt'] / 2**20:.2f} MiB ({100 * r['opt'] / full['opt']:.2f}%) | {r['frozen'] / 2**20:.1f} MiB | "
          f"{r['peak'] / 2**20:.1f} MiB | {r['flops'] / 1e9:.1f} G ({r['flops'] / full['flops']:.2f}x) | "
          f"{1000 * r['step']:.0f} ms | {r['step'] / full['step']:.2f}x |")


if __name__ == "__main__":
  main()
