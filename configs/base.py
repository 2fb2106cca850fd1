"""The defaults every experiment starts from. Not a run by itself: experiments call `get_config()` and edit."""

import ml_collections
from ml_collections import config_dict

from jaxllm import sharding


def get_config(size: str = "tiny") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0                              # params init, data order, sampling
  c.stage = "pretrain"                    # pretrain | sft: the loss and the data the run trains on
  c.init_from = ""                        # a workdir or checkpoint to start from ("" = from scratch)

  c.model = ml_collections.ConfigDict()
  c.model.size = size                     # preset in jaxllm/model.py: tiny small 124m 1b 7b 70b
  for key, kind in (("vocab_size", int), ("d_model", int), ("num_layers", int), ("num_heads", int),
                    ("num_kv_heads", int), ("head_dim", int), ("mlp_dim", int), ("rope_theta", float),
                    ("norm_eps", float), ("tie_embeddings", bool), ("qkv_bias", bool)):
    c.model[key] = config_dict.placeholder(kind)  # unset = the preset's value (vocab: the tokenizer's)
  c.model.dtype = "float32"               # compute dtype (params stay float32): float32 | bfloat16
  c.model.scan_layers = config_dict.placeholder(bool)  # True: nn.scan over layers (one compiled layer); False: a
                                          # Python loop. Unset: the preset's (tiny, small loop, faster on CPU; the
                                          # rest scan), or as the init_from run / the resumed run. Checkpoints of
                                          # either layout initialize a run of the other.
  c.model.remat_policy = "none"           # none | full | dots | dots_no_batch | save_attn_out
  c.model.attention = "einsum"            # einsum | dot_product (jax.nn.dot_product_attention: cuDNN on GPU)
  c.model.query_blocks = config_dict.placeholder(int)  # einsum attention in n query blocks, each against only the
                                          # keys up to its end (less work, same numbers up to fp32 order). Unset:
                                          # the preset's (tiny, small: 2; 1 with mesh.context > 1), or the init_from
                                          # run's

  c.data = ml_collections.ConfigDict()
  c.data.sources = "stdlib"               # "stdlib" (Python's own sources, no download) or globs of .txt/.jsonl
  c.data.validation_fraction = 0.02       # held-out share, chosen deterministically by file (or document)
  c.data.num_shards = 0                   # data shards, each giving batch/num_shards rows (0 = one per process);
                                          # fix it to get the same batches on any number of processes
  c.data.on_bad_record = "error"          # error: stop at the first bad line (file:line) | skip: skip, count
  c.data.max_bad_fraction = 0.01          # skip: fail if more than this share of the records is bad
  c.data.tokenizer = ml_collections.ConfigDict()
  c.data.tokenizer.path = ""              # a sentencepiece .model; "" = train one on the corpus
  c.data.tokenizer.vocab_size = 2048      # when training one
  c.data.tokenizer.model_type = "bpe"     # bpe | unigram
  c.data.tokenizer.max_sentences = 200_000  # lines sampled to train it
  c.data.tokenizer.character_coverage = 0.9995  # in [0.98, 1]: share of characters given pieces (rest: bytes)

  c.train = ml_collections.ConfigDict()
  c.train.steps = 1000                    # optimizer steps
  c.train.batch_size = 32                 # sequences per step, all devices and micro-batches together
  c.train.grad_accum = 1                  # micro-batches per step (batch_size must divide)
  c.train.seq_len = 256                   # tokens per sequence
  c.train.z_loss = 0.0                    # weight of logsumexp² (PaLM uses 1e-4)
  c.train.loss_chunk = -1                 # tokens per chunk of a cross-entropy that never holds [batch, seq,
                                          # vocab] logits (0 = dense; -1 = 4096 once they would pass 1 GiB)
  c.train.log_every = 10                  # steps between metrics rows
  c.train.eval_every = 200                # steps between validation passes (and at the end)
  c.train.eval_batches = 8                # validation batches per pass (0 = no eval)
  c.train.checkpoint_every = 200          # steps between checkpoints (and at the end)
  c.train.keep_checkpoints = 3            # newest checkpoints kept
  c.train.nan_policy = "abort"            # abort: stop with a message | skip: drop the update, count it
  c.train.spike_k = 0.0                   # > 0: skip a step whose loss > mean + k·std of the last applied ones
  c.train.spike_window = 32               # steps in that window (spike skipping starts once it is full)
  c.train.num_samples = 3                 # samples printed at the end
  c.train.sample_tokens = 64              # new tokens per sample
  c.train.sample_prompts = ("import", "class", "def")  # prompts of the samples printed at the end

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.learning_rate = 3e-4        # peak
  c.optimizer.schedule = "cosine"         # cosine (warmup + cosine) | wsd (warmup-stable-decay) | constant
  c.optimizer.warmup_steps = 100          # linear warmup from 0
  c.optimizer.decay_fraction = 0.2        # wsd: share of steps spent decaying to the end
  c.optimizer.min_lr_ratio = 0.1          # final lr / peak lr
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.95
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.1          # decoupled, on matrices only
  c.optimizer.grad_clip = 1.0             # global-norm clip (0 = off)

  c.lora = ml_collections.ConfigDict()
  c.lora.enabled = False                  # train a low-rank delta W + (alpha/rank)·A·B on a frozen init_from base
  c.lora.rank = 8
  c.lora.alpha = 16.0
  c.lora.targets = "attention,mlp"        # presets (attention mlp embed lm_head all) or regexes over param paths
  c.lora.rslora = False                   # scale alpha/sqrt(rank) instead of alpha/rank
  c.lora.quantize_base = False            # hold the frozen base as int8 with per-channel scales (QLoRA-style)
  c.lora.dropout = 0.0                    # dropout on the input of the A·B path while training (unmerged path)
  c.lora.continue_delta = False           # init_from a LoRA run: train its delta further on its base (else a
                                          # new delta on its merged model)
  c.lora.merged = False                   # compute with merge(W, ΔW) instead of x·W + s·(x·A)·B (slower backward)

  c.prompt_tuning = ml_collections.ConfigDict()
  c.prompt_tuning.num_tokens = 0          # > 0: train this many virtual-token embeddings ahead of every sequence
                                          # on the frozen init_from model (0 = off)
  c.prompt_tuning.init_text = ""          # start from this text's token embeddings (repeated); "" = random tokens'

  c.prefix_tuning = ml_collections.ConfigDict()
  c.prefix_tuning.num_tokens = 0          # > 0: train this many keys and values at every layer (P-tuning v2) on
                                          # the frozen init_from model (0 = off)
  c.prefix_tuning.hidden = 0              # > 0: produce them from an embedding through a tanh MLP of this width
                                          # while training (PEFT's prefix_projection); 0 = train them directly

  c.eval = ml_collections.ConfigDict()
  c.eval.tasks = ""                       # tasks scored at every eval step, logged as eval/<task>/<metric>:
                                          # comma-separated (jaxllm eval --list, or .jsonl files); "" = off
  c.eval.max_items = 64                   # the first items of each task (0 = all): keeps an eval step cheap
  c.eval.max_length = 0                   # tokens per scored row (0 = train.seq_len)

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                        # data-parallel replicas (-1 = all devices left)
  c.mesh.fsdp = 1                         # parameter/optimizer sharding
  c.mesh.context = 1                      # context parallelism: each sequence split over this many devices
  c.mesh.tensor = 1                       # tensor parallelism (heads, mlp, vocab)
  c.mesh.dcn_fsdp = 1                     # multi-node: nodes the fsdp axis spans (the rest of the nodes: data)
  c.mesh.rules = sharding.RULES           # logical axis -> mesh axes; a logical axis without a rule is an error
  return c
