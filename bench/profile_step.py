"""Where the train step's time goes: a jax.profiler trace of a few steps, its XLA thunks' self time grouped by
what each HLO op is (matmul, a fusion with or without a matmul in it, copy/transpose, ...), and the top ops.

  python bench/profile_step.py --size tiny --vocab 2048 --batch 16 --seq 128
  python bench/profile_step.py --size small --vocab 8192 --batch 8 --seq 256 --top 25

The trace (TensorBoard / Perfetto) stays under --logdir. The PyTorch peer's own breakdown is
`python bench/peer.py --profile` (torch.profiler). Shares are of the summed thunk time over all threads, so ops
that run concurrently on the thread pool count in full.

What the thunk events do not show: (1) plain `dot` ops (XLA:CPU's Eigen matmuls, e.g. the weight gradients x^T dy)
run as tasks on the pool, and their events cover only the dispatch; (2) the kernel's time, above all the page
faults of memory mapped fresh each step. The first line therefore also prints the process's CPU time in the
kernel and its minor page faults per step (getrusage): thousands of faults a step mean XLA's temporaries are
being mapped anew (bench/RESULTS.md, #19: jaxllm.relaunch_with_hugepages).
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re
import resource
import tempfile
import time

import jax

import jaxllm

import train_step as bench_step  # bench/train_step.py, beside this file
from jaxllm import config as config_lib

_OP = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*? ([\w\-]+)\(")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) ")


def hlo_kinds(text: str) -> dict[str, str]:
  """HLO op name -> its kind in the optimized module: the opcode, and for a fusion "fusion (matmul)" when its fused
  computation holds a dot or convolution."""
  bodies, current, ops = collections.defaultdict(list), None, {}
  for line in text.splitlines():
    if line and not line.startswith(" ") and "{" in line:
      m = _COMPUTATION.match(line)
      current = m.group(1) if m else None
      continue
    m = _OP.match(line)
    if m:
      ops[m.group(1)] = (m.group(2), line)
      if current:
        bodies[current].append(m.group(2))
  kinds = {}
  for name, (opcode, line) in ops.items():
    if opcode == "fusion":
      calls = _CALLS.search(line)
      inner = bodies.get(calls.group(1), []) if calls else []
      opcode = "fusion (matmul)" if {"dot", "convolution"} & set(inner) else "fusion"
    kinds[name] = opcode
  return kinds


_OP_NAME = re.compile(r'op_name="([^"]*)"')


def hlo_parts(text: str) -> dict[str, str]:
  """HLO op name -> the part of the step it computes, from its op_name metadata: forward / backward / update, and
  the module (attn/q, mlp/up, embed.attend, ...) or the jax op outside the model (the loss, the optimizer)."""
  parts = {}
  for line in text.splitlines():
    m, name = _OP.match(line), _OP_NAME.search(line)
    if not m:
      continue
    if not name:
      parts[m.group(1)] = "(no metadata: buffers, layout)"
      continue
    path = name.group(1).replace("jit(train_step)/", "")
    phase = "backward" if "transpose(jvp(" in path else "forward" if "jvp(" in path else "update"
    path = re.sub(r"(transpose\(|jvp\(|\)|while/body/|closed_call/|checkpoint/|rematted_computation/)", "", path)
    steps = [p for p in path.split("/") if p and p not in ("Transformer", "layers")]
    module = [p for p in steps if p in ("attn", "mlp", "attn_norm", "mlp_norm", "final_norm", "embed",
                                        "embed.attend", "q", "k", "v", "o", "gate", "up", "down", "lm_head")]
    where = "/".join(module[:2]) if module else (steps[-1] if steps else "?")
    parts[m.group(1)] = f"{phase} {where}"
  return parts


def self_times(events) -> dict[str, float]:
  """hlo_op -> summed self time (µs) of its thunk events: a while loop's time less the thunks of its body."""
  by_thread = collections.defaultdict(list)
  for e in events:
    if e.get("ph") == "X" and "hlo_op" in e.get("args", {}):
      by_thread[e["tid"]].append(e)
  totals = collections.Counter()
  for evs in by_thread.values():
    evs.sort(key=lambda e: (e["ts"], -e["dur"]))
    stack = []  # [event, child time]
    for e in evs:
      while stack and stack[-1][0]["ts"] + stack[-1][0]["dur"] <= e["ts"]:
        done, child = stack.pop()
        totals[done["args"]["hlo_op"]] += done["dur"] - child
      if stack:
        stack[-1][1] += e["dur"]
      stack.append([e, 0.0])
    for done, child in stack:
      totals[done["args"]["hlo_op"]] += done["dur"] - child
  return totals


def group(op: str, kinds: dict[str, str]) -> str:
  kind = kinds.get(op) or kinds.get(op.split(":")[0]) or re.sub(r"[.\d]+$", "", op)
  if kind in ("dot", "convolution", "fusion (matmul)") or op.startswith("ynn"):
    return "matmul (dot, or a fusion holding one)"
  if kind in ("copy", "transpose", "copy-start", "copy-done", "bitcast"):
    return "copy / transpose"
  if kind in ("while", "conditional", "call"):
    return "control (while/conditional, self time)"
  return "fusion (elementwise, reductions)" if kind == "fusion" else kind


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--size", default="tiny")
  p.add_argument("--vocab", type=int, default=2048)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--top", type=int, default=15)
  p.add_argument("--logdir", default=os.path.join(tempfile.gettempdir(), "jaxllm_profile"))
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="a config override, as on the CLI (--set model.scan_layers=False)")
  args = p.parse_args()
  config = bench_step.bench_config(args)
  model_cfg = config_lib.resolve_model(config, args.vocab)
  window = bench_step.stepper(config, model_cfg)
  window(2)
  text = window.hlo()
  kinds, parts = hlo_kinds(text), hlo_parts(text)
  start = time.time()
  with jax.profiler.trace(args.logdir, create_perfetto_trace=True):
    usage, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    tps = window(args.steps)
    wall, after = time.perf_counter() - wall, resource.getrusage(resource.RUSAGE_SELF)
  trace = max(glob.glob(os.path.join(args.logdir, "**", "perfetto_trace.json.gz"), recursive=True),
              key=os.path.getmtime)
  assert os.path.getmtime(trace) >= start - 1, trace
  with gzip.open(trace) as f:
    data = json.load(f)
  totals = self_times(data["traceEvents"] if isinstance(data, dict) else data)
  busy = sum(totals.values())
  groups = collections.Counter()
  for op, us in totals.items():
    groups[group(op, kinds)] += us
  per_step = lambda us: us / 1e3 / args.steps
  print(f"{args.size}, batch {args.batch} x {args.seq}: {tps:,.0f} tokens/s under the profiler, "
        f"{1e3 * wall / args.steps:.1f} ms/step wall, {per_step(busy):.1f} ms/step of thunk time over all threads; "
        f"{len(kinds)} HLO ops in the optimized module ({sum(k == 'fusion' for k in kinds.values())} fusions, "
        f"{sum(k in ('dot', 'fusion (matmul)') for k in kinds.values())} matmuls or fusions with one); "
        f"{1e3 * (after.ru_stime - usage.ru_stime) / args.steps:.1f} ms/step of CPU time in the kernel, "
        f"{(after.ru_minflt - usage.ru_minflt) / args.steps:,.0f} minor page faults/step\n")
  print("| what | ms/step | share |")
  print("| --- | ---: | ---: |")
  for name, us in groups.most_common():
    print(f"| {name} | {per_step(us):.2f} | {100 * us / busy:.1f}% |")
  by_part = collections.Counter()
  for op, us in totals.items():
    by_part[parts.get(op, "?")] += us
  print("\n| part of the step (phase, module or op) | ms/step | share |")
  print("| --- | ---: | ---: |")
  for name, us in by_part.most_common(args.top):
    print(f"| {name} | {per_step(us):.2f} | {100 * us / busy:.1f}% |")
  print("\n| top op | kind | part | ms/step | share |")
  print("| --- | --- | --- | ---: | ---: |")
  for op, us in totals.most_common(args.top):
    print(f"| {op} | {kinds.get(op, '?')} | {parts.get(op, '?')} | {per_step(us):.2f} | {100 * us / busy:.1f}% |")
  print(f"\ntrace: {trace}")


if __name__ == "__main__":
  jaxllm.relaunch_with_hugepages()  # as the jaxllm command runs (bench/RESULTS.md, #19)
  main()
