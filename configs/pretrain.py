"""Pretraining at a size preset, optionally on a GPU layout.

  python -m jaxllm.train --config configs/pretrain.py:size=small --workdir runs/pt_small
  python -m jaxllm.train --config configs/pretrain.py:size=124m,gpus=1 --workdir runs/pt_124m
  launch/slurm.sbatch configs/pretrain.py:size=7b,gpus=4x8 runs/pt_7b      # 4 nodes x 8 H100
  launch/slurm.sbatch configs/pretrain.py:size=7b,gpus=4x8,seq=32k runs/pt_7b_32k   # 32k-token sequences

tiny and small run on a CPU; 124m wants a GPU; 1b, 7b and 70b are shapes for GPU pods. `gpus` picks a mesh
layout from MESHES (hosts x GPUs per host); `seq` a long-context layout from LONG (the sequence split over
mesh.context); `python bench/memory.py` prints what each layout holds per GPU.
"""

from configs import base
from jaxllm.config import ConfigError, parse_arg

# size -> (batch_size, seq_len, learning_rate, steps, dtype)
RECIPES = {
    "tiny": (16, 128, 3e-3, 600, "float32"),
    "small": (32, 256, 1e-3, 5000, "float32"),
    "124m": (256, 1024, 6e-4, 20000, "bfloat16"),
    "1b": (512, 2048, 3e-4, 50000, "bfloat16"),
    "7b": (1024, 4096, 3e-4, 100000, "bfloat16"),
    "70b": (1024, 4096, 1.5e-4, 100000, "bfloat16"),
}

# (size, gpus) -> mesh layout and micro-batching. fsdp shards params and optimizer state inside a host (and,
# with dcn_fsdp > 1, over that many hosts); data replicates across the remaining hosts. Every layout here keeps
# params + AdamW state + activations (bench/memory.py) under 80 GB per H100.
MESHES = {
    ("1b", "1"): dict(data=1, fsdp=1, tensor=1, dcn_fsdp=1, grad_accum=128),
    ("1b", "8"): dict(data=1, fsdp=8, tensor=1, dcn_fsdp=1, grad_accum=16),
    ("1b", "4x8"): dict(data=4, fsdp=8, tensor=1, dcn_fsdp=1, grad_accum=4),
    ("1b", "16x8"): dict(data=16, fsdp=8, tensor=1, dcn_fsdp=1, grad_accum=1),
    ("7b", "8"): dict(data=1, fsdp=8, tensor=1, dcn_fsdp=1, grad_accum=64),
    ("7b", "4x8"): dict(data=4, fsdp=8, tensor=1, dcn_fsdp=1, grad_accum=16),
    ("7b", "16x8"): dict(data=16, fsdp=8, tensor=1, dcn_fsdp=1, grad_accum=4),
    ("70b", "4x8"): dict(data=1, fsdp=32, tensor=1, dcn_fsdp=4, grad_accum=32),
    ("70b", "16x8"): dict(data=4, fsdp=32, tensor=1, dcn_fsdp=4, grad_accum=8),
}
GPUS = {"1": 1, "8": 8, "4x8": 32, "16x8": 128}

# (size, gpus, seq) -> a long-context layout: the recipe's tokens per step in longer sequences, each split over
# mesh.context GPUs of a node (attention gathers a layer's keys and values over them), fsdp across the nodes.
# 7b at 32k: one GPU's attention logits for 4k queries x 32k keys are ~34 GB (memory.activation_bytes), so
# context=8; fsdp=4 then leaves params + AdamW state at 25 GiB, 61 GiB in all (tests/test_sharding.py).
LONG = {
    ("7b", "4x8", "32k"): dict(seq_len=32768, batch_size=128, data=1, fsdp=4, context=8, tensor=1, dcn_fsdp=4,
                               grad_accum=32),
}


def get_config(arg=None):
  arg = parse_arg(arg, size="tiny", gpus="", seq="")
  if arg.size not in RECIPES:
    raise ConfigError(f"config arg size={arg.size!r} has no recipe; one of {', '.join(RECIPES)}")
  c = base.get_config(arg.size)
  batch, seq, lr, steps, dtype = RECIPES[arg.size]
  c.train.batch_size = batch              # sequences per step
  c.train.seq_len = seq                   # tokens per sequence
  c.train.steps = steps
  c.optimizer.learning_rate = lr          # peak, warmup + cosine
  c.optimizer.warmup_steps = min(1000, steps // 20)
  c.model.dtype = dtype                   # bfloat16 compute on GPUs
  c.model.remat_policy = "none" if arg.size in ("tiny", "small") else "full"
  if arg.seq:
    if (arg.size, arg.gpus, arg.seq) not in LONG:
      raise ConfigError(f"config arg seq={arg.seq!r}: no long-context layout for size={arg.size},gpus={arg.gpus}; "
                        f"have {sorted(LONG)}")
    layout = dict(LONG[arg.size, arg.gpus, arg.seq])
    c.train.seq_len, c.train.batch_size = layout.pop("seq_len"), layout.pop("batch_size")
  elif arg.gpus:
    if (arg.size, arg.gpus) not in MESHES and arg.gpus != "1":
      raise ValueError(f"gpus={arg.gpus!r}: no layout for size={arg.size}; have {sorted(MESHES)}")
    layout = dict(MESHES.get((arg.size, arg.gpus), dict(data=1, fsdp=1, tensor=1, dcn_fsdp=1, grad_accum=1)))
  if arg.seq or arg.gpus:
    c.train.grad_accum = layout.pop("grad_accum")
    for key, value in layout.items():
      c.mesh[key] = value
  return c.lock()
