"""Memory of a training step's forward + backward on one device, for the logits and attention choices: dense
logits against the chunked cross-entropy (train.loss_chunk), einsum attention against jax.nn.dot_product_attention
(model.attention), for the 124m and 1b presets.

  python bench/loss_memory.py [--sizes 124m,1b] [--seqs 2048,8192] [--batch 1] [--chunk 1024] [--dtype bfloat16]
      [--remat full]

Nothing is allocated or run: each step (value_and_grad of the next-token loss over the params) is lowered from
abstract shapes and compiled for this machine's device; the table is XLA's memory analysis: the temporaries
(activations, logits, gradients in flight) beside the arguments (params, batch) and outputs (grads). On CPU the
numbers are XLA:CPU's; a GPU's buffer assignment differs in detail, not in what dominates.
"""

import argparse
import time

import jax
import jax.numpy as jnp

from jaxllm import model as model_lib
from jaxllm.tasks import lm


def step_memory(cfg, seq: int, chunk: int, batch_rows: int = 1) -> tuple[float, float, float]:
  """(temporaries GiB, arguments + outputs GiB, compile seconds) of the loss's value_and_grad."""
  loss_fn = lm.next_token_loss_fn(cfg, chunk=chunk)
  grad = jax.jit(jax.value_and_grad(lambda p, b: loss_fn(p, b)[0]))
  ints = jax.ShapeDtypeStruct((batch_rows, seq), jnp.int32)
  batch = {"inputs": ints, "targets": ints, "segment_ids": ints, "positions": ints,
           "loss_mask": jax.ShapeDtypeStruct((batch_rows, seq), jnp.float32)}
  start = time.perf_counter()
  compiled = grad.lower(model_lib.abstract_params(cfg), batch).compile()
  seconds = time.perf_counter() - start
  m = compiled.memory_analysis()
  gib = 2.0 ** 30
  return (m.temp_size_in_bytes / gib, (m.argument_size_in_bytes + m.output_size_in_bytes) / gib, seconds)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--sizes", default="124m,1b")
  p.add_argument("--seqs", default="2048,8192")
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--remat", default="full", help="model.remat_policy")
  p.add_argument("--chunk", type=int, default=1024, help="tokens per chunk of the chunked loss")
  p.add_argument("--batch", type=int, default=1, help="sequences per micro-batch")
  args = p.parse_args()
  print(f"device: {jax.devices()[0].device_kind}; micro-batch {args.batch} sequence(s); compute {args.dtype}, remat "
        f"{args.remat}\n")
  print("| model | seq | logits | attention | temporaries GiB | params + batch + grads GiB | compile s |")
  print("| --- | ---: | --- | --- | ---: | ---: | ---: |")
  for size in args.sizes.split(","):
    for seq in map(int, args.seqs.split(",")):
      for chunk, attention in ((0, "einsum"), (args.chunk, "einsum"), (args.chunk, "dot_product")):
        cfg = model_lib.model_config(size, dtype=args.dtype, remat_policy=args.remat, attention=attention)
        temp, io, seconds = step_memory(cfg, seq, chunk, args.batch)
        logits = f"chunked ({chunk})" if chunk else "dense"
        print(f"| {size} | {seq} | {logits} | {attention} | {temp:.2f} | {io:.2f} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
  main()
