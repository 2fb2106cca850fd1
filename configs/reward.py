"""A reward model (Bradley-Terry on preference pairs) of an SFT model, full fine-tuning by default; the score is
the <|end|> logit at an answer's last token (jaxllm/tasks/reward.py).

  python -m jaxllm.train --config configs/reward.py:size=tiny,init_from=runs/sft_tiny --workdir runs/reward
  python -m jaxllm.train --config configs/reward.py:size=tiny,init_from=runs/sft_tiny,lora=True --workdir runs/rm

Data: as configs/dpo.py ("chatterbot" pairs, or JSONL prompt / chosen / rejected, with an optional numeric
"margin" per pair for the margin loss). eval/accuracy is the held-out share of pairs scored in the right order.
"""

import ml_collections

from configs import pretrain
from jaxllm.config import parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, size="tiny", init_from="", lora=False)
  c = pretrain.get_config(f"size={arg.size}").unlock()
  c.stage = "reward"
  c.init_from = arg.init_from             # the SFT run the reward model starts from
  c.data.sources = "chatterbot"
  c.data.validation_fraction = 0.1        # the same held-out conversations as SFT's
  c.data.hard_fraction = 0.5              # share of pairs whose rejected answer is a hard negative (chatterbot)
  c.data.overlong = "truncate"            # a pair longer than seq_len: cut the prompt from the left | drop
  c.reward = ml_collections.ConfigDict()
  c.reward.center_coef = 0.0              # + coef·(r_chosen + r_rejected)²: keeps scores centred (0 = off)
  c.lora.enabled = arg.lora
  c.optimizer.learning_rate /= 3
  c.optimizer.warmup_steps = 20
  c.train.num_samples = 0                 # a reward model scores answers; it does not write them
  return c.lock()
