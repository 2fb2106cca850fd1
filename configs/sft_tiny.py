"""Masked SFT of pretrain_tiny on the chatterbot conversations, in under 3 minutes on 2 CPU cores.

  python -m jaxllm.train --config configs/pretrain_tiny.py --workdir runs/pretrain_tiny
  python -m jaxllm.train --config configs/sft_tiny.py --workdir runs/sft_tiny

Prints answers to held-out questions before and after fine-tuning; eval/loss is the held-out answer-only loss.
"""

from configs import sft


def get_config(arg=None):
  c = sft.get_config("size=tiny,init_from=runs/pretrain_tiny")
  c.train.steps = 300
  c.train.batch_size = 16
  c.train.seq_len = 128
  c.train.log_every = 20
  c.train.eval_every = 100
  c.train.eval_batches = 8
  c.train.checkpoint_every = 100
  c.train.num_samples = 4
  c.model.remat_policy = "none"           # as pretrain_tiny
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 20
  return c
