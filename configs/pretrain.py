"""Pretraining at a size preset.

  python -m jaxllm.train --config configs/pretrain.py:size=small --workdir runs/pt_small
  python -m jaxllm.train --config configs/pretrain.py:size=124m --workdir runs/pt_124m --config.train.steps=20000

tiny and small run on a CPU; 124m wants a GPU; 1b, 7b and 70b are shapes for GPU pods (their data, mesh and
batch settings belong in a config of their own).
"""

from configs import base
from jaxllm.config import parse_arg

# size -> (batch_size, seq_len, learning_rate, steps, dtype)
RECIPES = {
    "tiny": (16, 128, 3e-3, 600, "float32"),
    "small": (32, 256, 1e-3, 5000, "float32"),
    "124m": (256, 1024, 6e-4, 20000, "bfloat16"),
    "1b": (512, 2048, 3e-4, 50000, "bfloat16"),
    "7b": (1024, 4096, 3e-4, 100000, "bfloat16"),
    "70b": (1024, 4096, 1.5e-4, 100000, "bfloat16"),
}


def get_config(arg=None):
  arg = parse_arg(arg, size="tiny")
  c = base.get_config(arg.size)
  batch, seq, lr, steps, dtype = RECIPES[arg.size]
  c.train.batch_size = batch              # sequences per step
  c.train.seq_len = seq                   # tokens per sequence
  c.train.steps = steps
  c.optimizer.learning_rate = lr          # peak, warmup + cosine
  c.optimizer.warmup_steps = min(1000, steps // 20)
  c.model.dtype = dtype                   # bfloat16 compute on GPUs
  c.model.remat_policy = "none" if arg.size in ("tiny", "small") else "dots_no_batch"
  return c.lock()
