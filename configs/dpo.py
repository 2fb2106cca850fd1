"""Direct preference optimisation (DPO, cDPO, IPO, SimPO, ORPO, KTO) of an SFT model, by default through a LoRA
delta whose frozen base doubles as the reference (no second copy of the weights).

  python -m jaxllm.train --config configs/dpo.py:size=tiny,init_from=runs/sft_tiny --workdir runs/dpo
  python -m jaxllm.train --config configs/dpo.py:size=tiny,lora=False,kind=ipo --workdir runs/ipo \\
      --config.init_from=runs/sft_tiny
  python -m jaxllm.train --config configs/dpo.py:size=tiny,kind=kto,init_from=runs/sft_tiny --workdir runs/kto

Data: `data.sources` is "chatterbot" (pairs built from the chatterbot conversations: the real answer is chosen,
and the rejected answer comes from another conversation or is a harder negative: a nearby same-topic answer,
the answer to a later turn, the real answer shuffled or truncated; see jaxllm/data/preference.py) or globs of
JSONL files with prompt / chosen / rejected. kind=kto reads unpaired examples: JSONL with prompt / completion /
label (true = desirable), or any of the pairs above as two examples (chosen desirable, rejected undesirable).
"""

import ml_collections

from configs import pretrain
from jaxllm.config import parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, size="tiny", init_from="", lora=True, kind="sigmoid")
  c = pretrain.get_config(f"size={arg.size}").unlock()
  c.stage = "dpo"
  c.init_from = arg.init_from             # the SFT run: policy start, reference, and LoRA base
  c.data.sources = "chatterbot"
  c.data.validation_fraction = 0.1        # the same held-out conversations as SFT's
  c.data.hard_fraction = 0.5              # share of pairs whose rejected answer is a hard negative
  c.data.overlong = "truncate"            # a pair longer than seq_len: cut the prompt from the left | drop
  c.dpo = ml_collections.ConfigDict()
  c.dpo.kind = arg.kind                   # sigmoid (DPO) | ipo | simpo | orpo | kto (losses.PREFERENCE_LOSSES)
  c.dpo.beta = 0.1                        # strength of the KL anchor to the reference (simpo: reward scale;
                                          # orpo: the weight lambda of the odds-ratio term)
  c.dpo.label_smoothing = 0.0             # cDPO: assumed share of flipped labels, in [0, 0.5)
  c.dpo.gamma = 0.0                       # simpo's target margin
  c.dpo.rpo_alpha = 0.0                   # RPO: + alpha x the chosen answer's per-token NLL (0 = off)
  c.dpo.kto_desirable_weight = 1.0        # kto: lambda_D, the weight of a desirable example's loss
  c.dpo.kto_undesirable_weight = 1.0      # kto: lambda_U (with unbalanced labels, TRL suggests
                                          # lambda_D·n_D / (lambda_U·n_U) in [1, 4/3])
  c.dpo.cache_reference = False           # compute reference log-probs once over the pairs, cache them on disk
  c.lora.enabled = arg.lora               # train a delta; the frozen base is the reference
  c.optimizer.learning_rate /= 3
  c.optimizer.warmup_steps = 20
  c.train.sample_tokens = 48
  c.train.sample_prompts = ("Hello, how are you?", "What is your name?", "Do you like music?", "你好吗？")
  return c.lock()
