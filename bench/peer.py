"""The PyTorch peer of bench/train_step.py: Hugging Face transformers' LlamaForCausalLM at a jaxllm preset's shapes,
float32, AdamW with global-norm clipping (as configs/base.py), one fixed random batch, on the CPU.

  pip install -e ".[bench]"        # torch + transformers
  python bench/peer.py --size tiny --vocab 2048 --batch 16 --seq 128
  python bench/peer.py --size small --vocab 8192 --batch 8 --seq 256 --profile   # + torch.profiler's top ops

Prints one JSON line: tokens/s (best of three timed windows, as bench/train_step.py), the same step's model FLOPs
per token (model.flops_per_token) and PyTorch's fp32 matmul rate on this machine; with --profile, torch.profiler's
table of the ops that take the step's time. bench/train_step.py --peer runs it in a subprocess, alternating with
jaxllm's step, and prints the ratio.
"""

import argparse
import json
import time

import torch
import transformers

import jaxllm
from jaxllm import model as model_lib


def llama(cfg: model_lib.ModelConfig) -> "transformers.LlamaForCausalLM":
  config = transformers.LlamaConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.mlp_dim,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
      head_dim=cfg.head_dim, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.norm_eps,
      tie_word_embeddings=cfg.tie_embeddings, max_position_embeddings=8192, attn_implementation="sdpa")
  return transformers.LlamaForCausalLM(config)


def matmul_flops(n: int = 1024, seconds: float = 0.3) -> float:
  """PyTorch's fp32 n^3 matmul FLOP/s, best of three windows (as metrics.measure_peak_flops for XLA)."""
  a, b = torch.randn(n, n), torch.randn(n, n)
  a @ b
  best = 0.0
  for _ in range(3):
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
      a @ b
      count += 1
    best = max(best, 2 * n ** 3 * count / (time.perf_counter() - start))
  return best


def bench(cfg: model_lib.ModelConfig, batch: int, seq: int, steps: int, lr: float = 1e-3, clip: float = 1.0,
          profile: bool = False) -> dict:
  torch.manual_seed(0)
  model = llama(cfg).train()
  opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
  tokens = torch.randint(0, cfg.vocab_size, (batch, seq))

  def step():
    loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

  for _ in range(2):
    step()
  best = 0.0
  for _ in range(3):
    start = time.perf_counter()
    for _ in range(steps):
      step()
    best = max(best, batch * seq * steps / (time.perf_counter() - start))
  out = {"tokens_per_s": best, "matmul_flops": matmul_flops(), "threads": torch.get_num_threads(),
         "torch": torch.__version__, "transformers": transformers.__version__}
  if profile:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
      for _ in range(3):
        step()
    out["profile"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)
  return out


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--size", default="tiny")
  p.add_argument("--vocab", type=int, default=2048)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--profile", action="store_true")
  args = p.parse_args()
  cfg = model_lib.model_config(args.size, vocab_size=args.vocab)
  out = bench(cfg, args.batch, args.seq, args.steps, profile=args.profile)
  out["flops_per_token"] = model_lib.flops_per_token(cfg, args.seq)
  profile = out.pop("profile", None)
  if profile:
    print(profile, flush=True)
  print(json.dumps(out), flush=True)


if __name__ == "__main__":
  jaxllm.relaunch_with_hugepages()  # as the jaxllm command runs (bench/RESULTS.md, #19)
  main()
