"""Best-of-N rejection sampling, as in Llama 2 and 3.1 post-training: N answers per prompt from a policy run, each
scored by a reward run (jaxllm/tasks/reward.py); the best answer per prompt becomes SFT data and the best and the
worst a preference pair.

  jaxllm rejection-sample --policy runs/sft --reward runs/rm --prompts 'data/prompts*.jsonl' --samples 8 \\
      --out runs/rs [--temperature 1.0 --top-p 1.0 --max-new-tokens 64 --batch-prompts 8 --shard-prompts 256]

Prompts: JSONL lines with a "prompt" (a string, or chat messages ending with a user turn); any other field is
ignored, so SFT and preference files serve as they are. The prompts are taken in file order, in shards of
--shard-prompts. For shard k, DIR/shards/best-k.jsonl holds one SFT record per prompt ({"prompt", "response",
"score", "scores"}: the best answer, its score, every sample's score) and DIR/shards/pairs-k.jsonl one preference
record per prompt whose best and worst answers differ ({"prompt", "chosen", "rejected", "chosen_score",
"rejected_score", "margin"}; `margin` feeds the reward model's margin loss). An empty answer (the policy stopped
at once) is never chosen, since SFT and preference readers refuse empty responses; a prompt whose answers are all
empty gets no record. A shard's files are written
atomically once all its prompts are done, and its samples depend only on (--seed, k): a rerun skips finished
shards, so an interrupted job resumes to the files an uninterrupted one writes, without duplicates or gaps. Once
every shard is done, DIR/best.jsonl and DIR/pairs.jsonl concatenate them in order. DIR/manifest.json records the
arguments; a rerun with others is refused. Across processes (jax.distributed), process i samples the shards k
with k % processes == i; within a process each batch's rows are split over its devices (a "data" mesh, the models
replicated; the samples do not depend on the split: tests/multidevice/test_inference.py).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np

from jaxllm import distributed, generate, runs, tasks
from jaxllm.data import chat, sources
from jaxllm.errors import ConfigError, RunError
from jaxllm.tasks import reward as reward_lib

SHARDS = "shards"


def _messages(record) -> list[dict]:
  prompt = record.get("prompt") if isinstance(record, dict) else None
  if isinstance(prompt, str) and prompt.strip():
    return [{"role": "user", "content": prompt}]
  if isinstance(prompt, list) and prompt:
    chat.check_messages(prompt)
    if prompt[-1]["role"] != "user":
      raise ValueError("'prompt' must end with a user message")
    return [{"role": m["role"], "content": m["content"]} for m in prompt]
  raise ValueError("expected a 'prompt' string or a list of chat messages")


def read_prompts(spec: str) -> list[list[dict]]:
  """The prompts of the JSONL files of `spec` (globs), as chat messages; a bad line raises naming file:line."""
  records = sources.jsonl_records(spec, _messages, what="prompts")
  return [records[i] for i in range(len(records))]


def best_and_worst(scores) -> tuple[int, int]:
  """Indices of the highest and the lowest score (the first of ties)."""
  scores = np.asarray(scores)
  return int(np.argmax(scores)), int(np.argmin(scores))


def _records(prompt, answers: list[str], scores: np.ndarray) -> tuple[dict | None, dict | None]:
  """(SFT record, preference pair or None) of one prompt's answers. An empty answer (the policy stopped at once)
  is never chosen: SFT and preference readers refuse empty responses. All answers empty: (None, None)."""
  usable = [i for i, a in enumerate(answers) if a.strip()]
  if not usable:
    return None, None
  best, worst = (usable[i] for i in best_and_worst(np.asarray(scores)[usable]))
  text = prompt[0]["content"] if len(prompt) == 1 else prompt
  sft = {"prompt": text, "response": answers[best], "score": float(scores[best]),
         "scores": [round(float(s), 6) for s in scores]}
  if answers[best] == answers[worst] or scores[best] == scores[worst]:
    return sft, None
  pair = {"prompt": text, "chosen": answers[best], "rejected": answers[worst], "chosen_score": float(scores[best]),
          "rejected_score": float(scores[worst]), "margin": float(scores[best] - scores[worst])}
  return sft, pair


def _write_jsonl(path: str, rows: list[dict]):
  with open(path + ".tmp", "w") as f:
    for r in rows:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")
  os.replace(path + ".tmp", path)


class Sampler:
  """A policy and a reward model, loaded once; `shard` samples and scores one shard of prompts."""

  def __init__(self, policy: str, reward: str, args):
    self.args = args
    self.cfg, self.params, self.tok = runs.load_run(policy)
    task = tasks.TASKS[runs.read_config(reward).get("stage", "pretrain")]
    if not task.score_token:
      raise ConfigError(f"--reward {reward!r}: a {task.stage} run, not a reward model (train one with "
                        "configs/reward.py)")
    self.reward_cfg, self.reward_params, reward_tok = runs.load_run(reward)
    if reward_tok.sha256 != self.tok.sha256:
      raise ConfigError(f"--reward {reward!r}: its tokenizer is not the policy's ({args.policy}): the answers "
                        "would be scored as other tokens")
    self.score_id = reward_tok.token_id(task.score_token)
    self.mesh = generate.rows_mesh()
    self.params, self.reward_params = (generate.replicate(p, self.mesh) for p in (self.params, self.reward_params))
    self.stops = chat.stop_ids(self.tok)

  def shard(self, prompts: list[list[dict]], k: int) -> tuple[list[dict], list[dict]]:
    a, n = self.args, self.args.samples
    rng = jax.random.fold_in(jax.random.key(a.seed), k)  # a shard's samples depend on (seed, k) only
    sft_rows, pair_rows = [], []
    for start in range(0, len(prompts), a.batch_prompts):
      batch = prompts[start:start + a.batch_prompts]
      ids = [chat.render_prompt(p, self.tok) for p in batch]
      if (longest := max(len(i) for i in ids)) > a.max_prompt_tokens:
        raise ConfigError(f"--max-prompt-tokens: a prompt of shard {k} has {longest} tokens, more than "
                          f"{a.max_prompt_tokens}")
      rows = [i for i in ids for _ in range(n)]
      rows += [rows[0]] * (a.batch_prompts * n - len(rows))  # a fixed batch: one compiled program
      rng, key = jax.random.split(rng)
      outs = generate.generate(self.cfg, self.params, rows, max_new_tokens=a.max_new_tokens, rng=key,
                               temperature=a.temperature, top_p=a.top_p, stop_ids=self.stops,
                               vocab_limit=self.tok.vocab_size, prompt_slots=a.max_prompt_tokens, mesh=self.mesh)
      texts = [self.tok.decode(o[:-1] if o and o[-1] in self.stops else o) for o in outs[:len(batch) * n]]
      # scored as the text will be read later (by SFT, DPO or a reward model): its own tokenization, which a
      # sampled token sequence need not be
      scored = [rows[j] + self.tok.encode(t) for j, t in enumerate(texts)]
      scores = reward_lib.score_sequences(self.reward_cfg, self.reward_params, scored, self.score_id,
                                          batch_size=a.batch_prompts * n,  # room for a longer re-tokenization
                                          length=a.max_prompt_tokens + 2 * a.max_new_tokens, mesh=self.mesh)
      for i, prompt in enumerate(batch):
        answers = texts[i * n:(i + 1) * n]
        sft, pair = _records(prompt, answers, scores[i * n:(i + 1) * n])
        if sft:
          sft_rows.append(sft)
        if pair:
          pair_rows.append(pair)
    return sft_rows, pair_rows


def run(args) -> dict:
  """Samples every shard not yet written (this process's share); returns counts. See the module doc."""
  if args.samples < 2:
    raise ConfigError(f"--samples: best-of-N needs N >= 2, got {args.samples}")
  prompts = read_prompts(args.prompts)
  manifest = {k: getattr(args, k) for k in ("policy", "reward", "prompts", "samples", "temperature", "top_p",
                                           "max_new_tokens", "max_prompt_tokens", "shard_prompts", "seed")}
  manifest.update(num_prompts=len(prompts), policy_checkpoint=runs.fingerprint(*runs.resolve(args.policy)),
                  reward_checkpoint=runs.fingerprint(*runs.resolve(args.reward)))
  os.makedirs(os.path.join(args.out, SHARDS), exist_ok=True)
  path = os.path.join(args.out, "manifest.json")
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    if changed := sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k)):
      raise RunError(f"{path}: this --out was sampled with other arguments ({', '.join(changed)}); use a new --out")
  elif jax.process_index() == 0:
    with open(path + ".tmp", "w") as f:
      json.dump(manifest, f, indent=2)
    os.replace(path + ".tmp", path)
  num_shards = -(-len(prompts) // args.shard_prompts)
  name = lambda kind, k: os.path.join(args.out, SHARDS, f"{kind}-{k:05d}.jsonl")
  todo = [k for k in range(num_shards) if k % jax.process_count() == jax.process_index()
          and not os.path.exists(name("pairs", k))]  # pairs are written last: a shard with them is complete
  sampler = Sampler(args.policy, args.reward, args) if todo else None
  start, done_prompts = time.time(), 0
  for step, k in enumerate(todo, 1):
    part = prompts[k * args.shard_prompts:(k + 1) * args.shard_prompts]
    sft_rows, pair_rows = sampler.shard(part, k)
    _write_jsonl(name("best", k), sft_rows)
    _write_jsonl(name("pairs", k), pair_rows)
    done_prompts += len(part)
    rate = done_prompts * args.samples / (time.time() - start)
    left = sum(len(prompts[j * args.shard_prompts:(j + 1) * args.shard_prompts]) for j in todo[step:])
    print(f"shard {k + 1}/{num_shards} | {len(pair_rows)}/{len(part)} pairs | {len(part) - len(sft_rows)} prompts "
          f"with only empty answers | {rate:.1f} samples/s | eta "
          f"{time.strftime('%H:%M:%S', time.gmtime(left * args.samples / rate))}", flush=True)
  counts = {"shards": num_shards, "sampled_now": len(todo), "prompts": len(prompts)}
  if all(os.path.exists(name("pairs", k)) for k in range(num_shards)) and jax.process_index() == 0:
    for kind, out in (("best", "best.jsonl"), ("pairs", "pairs.jsonl")):
      rows = [json.loads(line) for k in range(num_shards) for line in open(name(kind, k))]
      _write_jsonl(os.path.join(args.out, out), rows)
      counts[kind] = len(rows)
  return counts


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="jaxllm rejection-sample", description=__doc__.split("\n\n")[0])
  p.add_argument("--policy", required=True, help="the run that writes the answers (e.g. the SFT run)")
  p.add_argument("--reward", required=True, help="the reward run that scores them (stage=reward)")
  p.add_argument("--prompts", required=True, help="JSONL files (globs, comma-separated) with a 'prompt' field")
  p.add_argument("--samples", type=int, default=8, help="answers per prompt (N of best-of-N)")
  p.add_argument("--out", required=True, help="the output directory (rerun it to resume)")
  p.add_argument("--temperature", type=float, default=1.0)
  p.add_argument("--top-p", type=float, default=1.0, help="1 = no nucleus filter")
  p.add_argument("--max-new-tokens", type=int, default=64)
  p.add_argument("--max-prompt-tokens", type=int, default=64, help="prompt slots (a longer prompt is refused)")
  p.add_argument("--batch-prompts", type=int, default=8, help="prompts per batch (x samples sequences)")
  p.add_argument("--shard-prompts", type=int, default=256, help="prompts per output shard")
  p.add_argument("--seed", type=int, default=0)
  return p


def main(argv: list[str]) -> int:
  args = parser().parse_args(argv)
  distributed.initialize()
  counts = run(args)
  print(json.dumps(counts))
  return 0


if __name__ == "__main__":  # python -m jaxllm.rejection_sample: the `jaxllm rejection-sample` command
  import runpy
  import sys

  sys.argv[1:1] = ["rejection-sample"]
  runpy.run_module("jaxllm.cli", run_name="__main__")
