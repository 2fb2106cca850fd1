"""The README's example sweep: learning rate x seed on pretrain_tiny, 150 steps a point (6 points).

  python -m jaxllm.sweep --config configs/sweeps/tiny_lr.py --workdir runs/tiny_lr --parallel 2

DIR/results.md then has one row per point and the mean ± std over the 2 seeds of each learning rate;
DIR/eval_loss_final_vs_lr.png plots the final validation loss against the learning rate.
"""

from configs import pretrain_tiny
from jaxllm import sweep


def get_config(arg=None):
  c = pretrain_tiny.get_config()
  c.train.steps = 150                     # 150 x 16 x 128 = 0.3M tokens a point
  c.train.eval_every = 50
  c.train.checkpoint_every = 50
  c.train.num_samples = 0
  c.optimizer.warmup_steps = 15
  return c


def get_sweep(arg=None):
  return sweep.product(sweep.axis("optimizer.learning_rate", [1e-3, 3e-3, 1e-2]), sweep.seeds(2))
