"""Compares the metrics of two bench/identity.sh outputs: every loss-like value must be bit-identical.

  python bench/identity_compare.py OUT_A OUT_B

Prints one row per run: the rows compared, the values compared, and how many differ (timing columns such as
tokens_per_sec and mfu are skipped).
"""

import json
import os
import sys

RUNS = ("pretrain_tiny", "sft_tiny", "dpo_tiny")
# Not compared: timings, and the data pipeline's example counters (since the structure change they are read from
# the data iterator's checkpointable state, which counts the examples of the batches emitted so far; before, a
# live counter also counted the packer's look-ahead, one example more).
TIMING = ("tokens_per_sec", "mfu", "data/truncated", "data/dropped")


def rows(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def main(a, b):
  differing_total = 0
  print("| run | rows | values compared | differing | final loss |")
  print("| --- | ---: | ---: | ---: | ---: |")
  for run in RUNS:
    ra, rb = (rows(os.path.join(d, run, "metrics.jsonl")) for d in (a, b))
    compared = differing = 0
    if len(ra) != len(rb):
      differing += abs(len(ra) - len(rb))
    for x, y in zip(ra, rb):
      keys = (set(x) | set(y)) - set(TIMING)
      for k in sorted(keys):
        compared += 1
        if x.get(k) != y.get(k):
          differing += 1
          if differing <= 5:
            print(f"  {run} step {x.get('step')}: {k} {x.get(k)!r} != {y.get(k)!r}")
    final = next((r["loss"] for r in reversed(ra) if "loss" in r), float("nan"))
    print(f"| {run} | {len(ra)} | {compared} | {differing} | {final!r} |")
    differing_total += differing
  print("bit-identical" if differing_total == 0 else f"{differing_total} values differ")
  return 1 if differing_total else 0


if __name__ == "__main__":
  sys.exit(main(*sys.argv[1:3]))
