"""LoRA-DPO of sft_tiny on chatterbot preference pairs, in under 3 minutes on 2 CPU cores.

  python -m jaxllm.train --config configs/dpo_tiny.py --workdir runs/dpo_tiny

eval/rewards/accuracy is the held-out preference accuracy (0.5 at step 0, where policy = reference).
"""

from configs import dpo


def get_config(arg=None):
  c = dpo.get_config("size=tiny,init_from=runs/sft_tiny")
  c.train.steps = 200
  c.train.batch_size = 16                 # pairs per step (32 sequences through the model)
  c.train.seq_len = 96
  c.train.log_every = 20
  c.train.eval_every = 50
  c.train.eval_batches = 8
  c.train.checkpoint_every = 100
  c.train.num_samples = 4
  c.model.remat_policy = "none"           # as pretrain_tiny
  # A 1M-parameter model separates random negatives but hardly the hardest ones ("nearby" same-topic answers are
  # often fine answers too; experiments/dpo_accuracy_by_negative.py measures each kind): a fifth of hard pairs.
  c.data.hard_fraction = 0.2
  c.lora.rank = 16
  c.lora.alpha = 32.0
  c.optimizer.learning_rate = 2e-3
  c.optimizer.warmup_steps = 20
  return c
