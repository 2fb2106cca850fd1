"""Masked supervised fine-tuning: the loss on answer tokens only, starting from a pretrained run.

  python -m jaxllm.train --config configs/sft.py:size=tiny --workdir runs/sft --config.init_from=runs/pretrain_tiny

Data: `data.sources` is "chatterbot" (the conversations of the chatterbot-corpus package, 28 languages, no
download; "chatterbot:english,chinese" picks languages) or globs of JSONL files with prompt/response pairs or
chat `messages`. Each conversation is rendered with the chat template of jaxllm/data/chat.py.
"""

from configs import pretrain
from jaxllm.config import parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, size="tiny", init_from="")
  c = pretrain.get_config(f"size={arg.size}").unlock()
  c.stage = "sft"                         # loss: answer tokens only
  c.init_from = arg.init_from             # the pretrained run (a workdir or .../checkpoints/N)
  c.data.sources = "chatterbot"
  c.data.validation_fraction = 0.1        # held-out conversations
  c.data.prompt_loss_weight = 0.0         # weight of non-answer tokens: 0 = masked SFT, 1 = plain LM loss
  c.data.overlong = "truncate"            # an example longer than seq_len: truncate | drop (counted either way)
  c.optimizer.learning_rate /= 3          # fine-tuning takes smaller steps than pretraining
  c.optimizer.warmup_steps = 20
  c.train.sample_tokens = 48
  c.train.sample_prompts = ("Hello, how are you?", "What is your name?", "Do you like music?", "你好吗？")
  return c.lock()
