"""The sweep of experiments/schedules_scaling: five model sizes at a fixed token budget (cosine schedule), and
warmup-stable-decay with a 10% and a 20% cooldown against cosine at equal steps, each over 3 seeds.

  python experiments/schedules_scaling/run.py --workdir runs/schedules_scaling [--quick]

arg: quick (fewer, shorter points: what the tests run) and tokenizer (a shared sentencepiece model, trained once
by run.py rather than once per point).
"""

from configs import pretrain_tiny
from jaxllm.config import parse_arg

# name: (d_model, num_layers, num_heads, num_kv_heads, head_dim, mlp_dim); "xl" is the tiny preset
SIZES = {"xs": (32, 2, 2, 1, 16, 96), "s": (48, 2, 3, 1, 16, 128), "m": (64, 3, 4, 2, 16, 176),
         "l": (96, 3, 6, 2, 16, 256), "xl": (128, 4, 4, 2, 32, 384)}
QUICK_SIZES = ("xs", "s", "m")
WSD = {"wsd10": 0.1, "wsd20": 0.2}  # cooldown share of the steps; cosine is the scaling points' own schedule
SCHEDULE_SIZE, QUICK_SCHEDULE_SIZE = "l", "m"  # the model the schedules are compared on


def _arg(arg):
  return parse_arg(arg, quick=False, tokenizer="")


def get_config(arg=None):
  a = _arg(arg)
  c = pretrain_tiny.get_config()
  c.data.tokenizer.path = a.tokenizer          # the same vocabulary for every point
  steps, batch, seq = (40, 8, 64) if a.quick else (300, 16, 128)
  c.train.steps, c.train.batch_size, c.train.seq_len = steps, batch, seq  # 300 x 16 x 128 = 0.6M tokens
  c.train.log_every = 10
  c.train.eval_every = steps // 5              # five points of the validation curve
  c.train.eval_batches = 2 if a.quick else 8
  c.train.checkpoint_every = steps
  c.train.num_samples = 0
  c.optimizer.warmup_steps = steps // 10
  c.optimizer.min_lr_ratio = 0.0               # every schedule ends at 0
  return c


def model(size: str) -> dict:
  d, layers, heads, kv_heads, head_dim, mlp = SIZES[size]
  return {"model.d_model": d, "model.num_layers": layers, "model.num_heads": heads, "model.num_kv_heads": kv_heads,
          "model.head_dim": head_dim, "model.mlp_dim": mlp}


def get_sweep(arg=None):
  a = _arg(arg)
  seeds = range(1 if a.quick else 3)
  points = [{"name": f"scale_{size}_seed{s}", **model(size), "seed": s}
            for size in (QUICK_SIZES if a.quick else SIZES) for s in seeds]
  size = QUICK_SCHEDULE_SIZE if a.quick else SCHEDULE_SIZE
  for name, fraction in WSD.items():
    if not (a.quick and name == "wsd10"):
      points += [{"name": f"sched_{name}_seed{s}", **model(size), "seed": s, "optimizer.schedule": "wsd",
                  "optimizer.decay_fraction": fraction} for s in seeds]
  return points
