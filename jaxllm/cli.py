"""The `jaxllm` command.

  jaxllm train --config configs/pretrain_tiny.py[:arg] --workdir DIR [--config.a.b=value ...]
  jaxllm generate --workdir DIR --prompt TEXT [--prompt TEXT ...] [--chat] [--temperature 0.8 ...]
  jaxllm export --workdir DIR --out NEW_RUN [--step N]           # a LoRA run merged, as a full run directory
  jaxllm hf import --hf HF_DIR --out RUN | jaxllm hf export --workdir RUN --out HF_DIR [--peft]
  jaxllm sweep --config FILE[:arg] --workdir DIR [--parallel N] [--slurm] [--dry-run] | jaxllm sweep report DIR
  jaxllm rejection-sample --policy RUN --reward RUN --prompts FILES --samples N --out DIR   # best-of-N
  jaxllm eval --run DIR --tasks chatterbot_mc_en,stdlib_ppl[,my_task.jsonl] [--limit N] | jaxllm eval --list

`python -m jaxllm.train|generate|export|hf|sweep|rejection_sample|evaluation` are the same commands. A refusal (a bad config value, bad data, a
resume the run directory refuses, a missing file) prints one line, `error: <what>: <why>`, and exits 2; a
preemption (SIGTERM) exits 75 after saving; anything else is a crash, with its traceback on stderr and, for
`train`, appended to WORKDIR/crash.log (exit 1). `--debug` (or JAXLLM_DEBUG=1) shows the traceback of a refusal
too.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

import jax
from absl import flags, logging
from ml_collections import config_flags

from jaxllm import config as config_lib, distributed, evaluation, export, generate as generate_lib, rejection_sample
from jaxllm import runs
from jaxllm import train as train_lib
from jaxllm.checkpoint import CheckpointError
from jaxllm.data import chat
from jaxllm.data.sources import DataError
from jaxllm.errors import PREEMPTED_EXIT_CODE, ConfigError, Preempted, RunError
from jaxllm.hf import DTYPES
from jaxllm.lock import WorkdirLocked
from jaxllm.sweep import command as sweep_command

CRASH_LOG = "crash.log"  # in the workdir: the traceback of each crash (exit 1)
REFUSALS = (ConfigError, DataError, RunError, WorkdirLocked, CheckpointError, FileNotFoundError, FileExistsError)
USAGE_EXIT_CODE = 2


def train(argv: list[str]) -> int:
  """Flags are absl's, as ml_collections' config_flags reads them: --config FILE[:arg], --config.a.b=value."""
  names = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/pretrain_tiny.py[:arg]",
                                  flag_values=names, lock_config=True)
  flags.DEFINE_string("workdir", None, "run directory: metrics, checkpoints, tokenizer", flag_values=names)
  _check_config_flags(argv)
  try:
    names(["jaxllm train", *argv])
  except flags.Error as e:  # a value of the wrong type: absl names the flag
    raise ConfigError(" ".join(str(e).split()).replace("flag --config", "--config")) from e
  if names["workdir"].value is None:
    raise ConfigError("--workdir is required (jaxllm train --config FILE[:arg] --workdir DIR)")
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  distributed.initialize()
  try:
    train_lib.run(names.config, names.workdir)
  except REFUSALS + (Preempted,):
    raise
  except Exception:  # a crash: its traceback on stderr and in the workdir, for whoever looks at the run later
    if jax.process_index() == 0 and os.path.isdir(names.workdir):
      with open(os.path.join(names.workdir, CRASH_LOG), "a") as f:
        f.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC: jaxllm train {' '.join(argv)}\n")
        f.write(traceback.format_exc())
    raise
  return 0


def _check_config_flags(argv: list[str]):
  """Refuses, naming it, a --config file that does not exist and a --config.key that the config does not have
  (absl would end in a traceback of the ConfigDict lookup)."""
  values = {}
  for i, arg in enumerate(argv):
    if arg.startswith("--config"):
      key, sep, value = arg[2:].partition("=")
      values[key] = value if sep else (argv[i + 1] if i + 1 < len(argv) else "")
  if "config" not in values:
    raise ConfigError("--config is required (jaxllm train --config FILE[:arg] --workdir DIR)")
  config = config_lib.load(values.pop("config"))
  for key in values:
    try:
      config_lib.check_key(config, key.removeprefix("config."))
    except ConfigError as e:
      raise ConfigError(f"--config.{e}") from None


def generate(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog="jaxllm generate", description="Sample from a run's checkpoint.")
  parser.add_argument("--workdir", required=True, help="a training run's directory")
  parser.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for a batch")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
  parser.add_argument("--max_new_tokens", type=int, default=64)
  parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
  parser.add_argument("--top_k", type=int, default=40, help="0 = no top-k filter")
  parser.add_argument("--top_p", type=float, default=0.95, help="1 = no nucleus filter")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--chat", action="store_true", help="wrap each prompt as a user turn of the chat template")
  args = parser.parse_args(argv)
  if any(not p.strip() for p in args.prompt):
    raise ConfigError("--prompt: an empty prompt; give the text to continue (or to answer, with --chat)")
  cfg, params, tokenizer = runs.load_run(args.workdir, args.step)
  stop_ids = [tokenizer.eos_id]
  if args.chat:
    ids = [chat.render_prompt([{"role": "user", "content": p}], tokenizer) for p in args.prompt]
    stop_ids = chat.stop_ids(tokenizer)
  else:
    ids = [tokenizer.encode(p) for p in args.prompt]
  context = runs.read_config(args.workdir).get("train", {}).get("seq_len")
  for prompt, prompt_ids in zip(args.prompt, ids):
    if context and len(prompt_ids) + args.max_new_tokens > context:
      raise ConfigError(f"--prompt: {len(prompt_ids)} prompt tokens + --max_new_tokens {args.max_new_tokens} "
                        f"exceed the {context} tokens the run was trained on (train.seq_len), for {prompt[:40]!r}")
  outs = generate_lib.generate(cfg, params, ids, max_new_tokens=args.max_new_tokens, rng=jax.random.key(args.seed),
                               temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, stop_ids=stop_ids,
                               vocab_limit=tokenizer.vocab_size)
  for i, (prompt, out) in enumerate(zip(args.prompt, outs)):
    text = tokenizer.decode(out[:-1] if out and out[-1] in stop_ids else out)
    print(f"--- {i}: user ---\n{prompt}\n--- {i}: assistant ---\n{text}" if args.chat else
          f"--- {i} ---\n{prompt}{text}", flush=True)
  return 0


def export_run(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog="jaxllm export", description="A run's model (a LoRA run: merged) as a "
                                   "full run directory.")
  parser.add_argument("--workdir", required=True, help="a training run (LoRA or not)")
  parser.add_argument("--out", required=True, help="the new run directory")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
  args = parser.parse_args(argv)
  print(f"wrote {export.to_run(args.workdir, args.out, args.step)}")
  return 0


def hf(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog="jaxllm hf", description="Hugging Face directories <-> jaxllm runs.")
  sub = parser.add_subparsers(dest="command", required=True)
  imp = sub.add_parser("import", help="an HF directory -> a jaxllm run directory")
  imp.add_argument("--hf", required=True, help="a directory with config.json and *.safetensors")
  imp.add_argument("--out", required=True, help="the new run directory")
  exp = sub.add_parser("export", help="a jaxllm run -> an HF directory (or a PEFT adapter)")
  exp.add_argument("--workdir", required=True, help="a training run (LoRA or not)")
  exp.add_argument("--out", required=True, help="the new HF directory")
  exp.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
  exp.add_argument("--max-shard-size", default="5GB", help="shard the safetensors past this size (2GB, 500MB)")
  exp.add_argument("--dtype", default="float32", choices=DTYPES, help="tensor dtype (an adapter: float32)")
  exp.add_argument("--peft", action="store_true", help="a LoRA run's delta as a PEFT adapter (default: merged)")
  args = parser.parse_args(argv)
  if args.command == "import":
    out = export.import_hf(args.hf, args.out)
  else:
    out = export.to_hf(args.workdir, args.out, step=args.step, max_shard_size=args.max_shard_size, dtype=args.dtype,
                       peft=args.peft)
  print(f"wrote {out}")
  return 0


COMMANDS = {"train": train, "generate": generate, "export": export_run, "hf": hf, "sweep": sweep_command.main,
            "rejection-sample": rejection_sample.main, "eval": evaluation.main}


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  debug = "--debug" in argv or bool(os.environ.get("JAXLLM_DEBUG"))
  argv = [a for a in argv if a != "--debug"]
  if not argv or argv[0] not in COMMANDS:
    print(__doc__.strip().split("\n\n")[1] if argv[:1] in ([], ["-h"], ["--help"]) else
          f"error: unknown command {argv[0]!r}; one of {', '.join(COMMANDS)}", file=sys.stderr)
    return 0 if argv[:1] in (["-h"], ["--help"]) else USAGE_EXIT_CODE
  try:
    return COMMANDS[argv[0]](argv[1:])
  except Preempted as e:
    print(f"preempted: {e}", file=sys.stderr, flush=True)
    return PREEMPTED_EXIT_CODE
  except REFUSALS as e:
    if debug:
      traceback.print_exc()
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
    return USAGE_EXIT_CODE


def entry():  # the console script
  sys.exit(main())


if __name__ == "__main__":
  entry()
