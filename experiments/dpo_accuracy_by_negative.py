"""Held-out preference accuracy of a DPO run, split by how each rejected answer was made (random, nearby,
later_turn, shuffled, truncated), over all held-out chatterbot pairs of the run's data settings.

  python experiments/dpo_accuracy_by_negative.py runs/dpo_tiny [--hard_fraction 0.5]
"""

import argparse
import collections
import json
import os

import jax
import numpy as np

from jaxllm import runs
from jaxllm.data import preference, sft
from jaxllm.tasks.preference import pair_logps


def main():
  p = argparse.ArgumentParser()
  p.add_argument("workdir")
  p.add_argument("--hard_fraction", type=float, default=None, help="default: the run's data.hard_fraction")
  args = p.parse_args()
  with open(os.path.join(args.workdir, "config.json")) as f:
    config = json.load(f)
  d, seq_len, kind = config["data"], config["train"]["seq_len"], config["dpo"]["kind"]
  cfg, policy, tok = runs.load_run(args.workdir)
  _, ref, _ = runs.load_run(config["init_from"])
  hard = d["hard_fraction"] if args.hard_fraction is None else args.hard_fraction
  pairs = preference.pairs(d["sources"], "validation", validation_fraction=d["validation_fraction"],
                           seed=config["seed"], hard_fraction=hard)
  logps = jax.jit(lambda params, batch: pair_logps(cfg, kind, params, batch))
  wins, batch_size = collections.defaultdict(list), 16
  for start in range(0, len(pairs), batch_size):
    rows = [(i, preference.make_pair_example(pairs[i], tok, seq_len=seq_len, overlong=d["overlong"]))
            for i in range(start, min(start + batch_size, len(pairs)))]
    rows = [(i, r) for i, r in rows if r["status"] in (sft.KEPT, sft.TRUNCATED)]
    padded = [r for _, r in rows] + [rows[0][1]] * (batch_size - len(rows))  # one compiled shape
    batch = {k: np.stack([r[k] for r in padded]) for k in padded[0] if k not in ("status", "pair_index")}
    (pc, pr), (rc, rr) = jax.device_get(logps(policy, batch)), jax.device_get(logps(ref, batch))
    for j, (i, _) in enumerate(rows):
      margin = (pc[j] - rc[j]) - (pr[j] - rr[j])
      wins[pairs[i].get("negative", "?")].append(0.5 if margin == 0 else float(margin > 0))
  everything = [w for v in wins.values() for w in v]
  print(f"hard_fraction {hard}: accuracy {np.mean(everything):.3f} over {len(everything)} held-out pairs")
  for name, v in sorted(wins.items()):
    print(f"  {name:>10}: {np.mean(v):.3f} ({len(v)} pairs)")


if __name__ == "__main__":
  main()
