"""A ~1M-parameter model pretrained on Python's standard library sources, in under 3 minutes on 2 CPU cores.

  python -m jaxllm.train --config configs/pretrain_tiny.py --workdir runs/pretrain_tiny
"""

from configs import pretrain


def get_config(arg=None):
  c = pretrain.get_config("size=tiny")
  c.train.steps = 400                     # 400 x 16 x 128 = 0.8M tokens
  c.train.batch_size = 16
  c.train.seq_len = 128
  c.train.log_every = 20
  c.train.eval_every = 100                # validation loss every 100 steps
  c.train.eval_batches = 8
  c.train.checkpoint_every = 200
  c.optimizer.learning_rate = 3e-3        # small models take large steps
  c.optimizer.warmup_steps = 50
  c.data.tokenizer.vocab_size = 2048
  c.model.remat_policy = "none"           # no remat: 8-16% faster on a 2-core CPU than "full" (bench/RESULTS.md)
  return c
