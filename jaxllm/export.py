"""Write a LoRA run's merged model (base + delta) as a full run directory that init_from, generate and other
tools read like any pretraining or SFT run.

  python -m jaxllm.export --workdir runs/sft_lora --out runs/sft_lora_merged [--step N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

import jax
import jax.numpy as jnp

from jaxllm import checkpoint


def export_merged(workdir: str, out: str, step: int | None = None) -> str:
  run_dir, step = checkpoint.resolve_run(workdir if step is None else os.path.join(workdir, "checkpoints", str(step)))
  params = jax.tree.map(jnp.asarray, checkpoint.load_params(run_dir, step))  # merged if it is a LoRA run
  if os.path.exists(out):
    raise FileExistsError(f"--out {out!r} exists; choose a new directory")
  os.makedirs(out)
  with open(os.path.join(run_dir, "config.json")) as f:
    config = json.load(f)
  config["lora"]["enabled"], config["exported_from"] = False, checkpoint.identity(run_dir, step)
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
  shutil.copy(os.path.join(run_dir, "tokenizer.model"), os.path.join(out, "tokenizer.model"))
  ckpt = checkpoint.Checkpointer(os.path.join(out, "checkpoints"), keep=1, async_save=False)
  ckpt.save(step, {"params": params}, meta={"exported_from": config["exported_from"]})
  ckpt.close()
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m jaxllm.export", description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="a training run (LoRA or not)")
  parser.add_argument("--out", required=True, help="the new run directory")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
  args = parser.parse_args(argv)
  print(f"wrote {export_merged(args.workdir, args.out, args.step)}")


if __name__ == "__main__":
  main()
