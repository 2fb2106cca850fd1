"""Shared fixtures: a small synthetic corpus and a tiny config, and a persistent compilation cache so that the
several short runs of the suite compile each step once."""

import json
import os
import random
import subprocess
import sys
import tempfile
import time

# XLA:CPU's cheaper code generation (no LLVM -O2, no expensive passes), set before JAX starts its backend and
# inherited by the runs the suite starts in subprocesses: the suite's time is compiling many tiny programs, and
# these flags cut it by about a quarter on 2 cores (bench/RESULTS.md); the HLO optimizations are the same. Tests
# compare against references within tolerances, and bit-identity only between runs under the same flags.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()

import jax  # noqa: E402
import pytest

from configs import pretrain_tiny
from jaxllm import train


MULTIDEVICE_TEST = "tests/test_sharding.py::test_multidevice_suite"
_multidevice = {}  # the background run of tests/multidevice this process started


def pytest_collection_finish(session):
  """When test_multidevice_suite is selected, tests/multidevice starts now, in its own process with 8 emulated
  devices, and runs beside the rest of the suite (started by the first xdist worker, or the one pytest process);
  the test waits for its exit code, which it writes to JAXLLM_MULTIDEVICE_DIR (set by pytest_configure)."""
  worker = getattr(session.config, "workerinput", {}).get("workerid")
  if (os.environ.get("JAXLLM_MULTIDEVICE") or worker not in (None, "gw0")
      or not any(i.nodeid == MULTIDEVICE_TEST for i in session.items)):
    return
  out = os.environ["JAXLLM_MULTIDEVICE_DIR"]
  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"  # and FAST_COMPILE
  env = dict(os.environ, XLA_FLAGS=flags, JAXLLM_MULTIDEVICE="1", JAX_PLATFORMS="cpu")
  script = ('"$0" -m pytest -q -x -p no:cacheprovider tests/multidevice > "$1/log" 2>&1; '
            'echo $? > "$1/rc.tmp" && mv "$1/rc.tmp" "$1/rc"')
  _multidevice["proc"] = subprocess.Popen(["bash", "-c", script, sys.executable, out],
                                          cwd=str(session.config.rootpath), env=env)


def multidevice_result(timeout: float = 900) -> tuple[int, str]:
  """(exit code, output) of the background tests/multidevice run, waiting for it to finish."""
  out, deadline = os.environ["JAXLLM_MULTIDEVICE_DIR"], time.time() + timeout
  while not os.path.exists(os.path.join(out, "rc")):
    if time.time() > deadline:
      raise TimeoutError(f"tests/multidevice did not finish in {timeout:.0f} s; its log: {out}/log")
    time.sleep(1.0)
  with open(os.path.join(out, "rc")) as f, open(os.path.join(out, "log")) as log:
    return int(f.read()), log.read()


def pytest_sessionfinish(session):
  if _multidevice and _multidevice["proc"].poll() is None:  # the suite stopped early (-x, Ctrl-C): so does it
    _multidevice["proc"].kill()
    _multidevice["proc"].wait()


def pytest_configure(config):
  if not hasattr(config, "workerinput") and "JAXLLM_MULTIDEVICE" not in os.environ:  # xdist workers inherit it
    os.environ["JAXLLM_MULTIDEVICE_DIR"] = tempfile.mkdtemp(prefix="jaxllm-multidevice-")
  cache = os.path.join(str(config.rootpath), ".pytest_cache", "jax")
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  # one measured peak FLOP/s for the suite and the runs it starts in subprocesses (MFU's denominator)
  os.environ["JAXLLM_PEAK_FLOPS_CACHE"] = os.path.join(str(config.rootpath), ".pytest_cache", "peak_flops.json")


_SUBJECTS = ["the cat", "a dog", "the old man", "my sister", "the teacher", "a small bird", "the king"]
_VERBS = ["sees", "likes", "finds", "carries", "paints", "follows", "helps"]
_OBJECTS = ["the ball", "a red apple", "the river", "an old book", "the garden", "a green hat", "the moon"]


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
  """80 short text documents of a tiny grammar: learnable in a few dozen steps."""
  root = tmp_path_factory.mktemp("corpus")
  rng = random.Random(0)
  for i in range(80):
    sentences = [f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}."
                 for _ in range(rng.randint(3, 12))]
    (root / f"doc{i:03d}.txt").write_text(" ".join(sentences).capitalize() + "\n")
  return root


def tiny_config(corpus_dir, **overrides):
  """pretrain_tiny shrunk to test size (D=32, 2 layers, V=320), on the synthetic corpus."""
  c = pretrain_tiny.get_config()
  c.data.sources = str(corpus_dir / "*.txt")
  c.data.validation_fraction = 0.1
  c.data.tokenizer.vocab_size = 320
  c.model.d_model, c.model.num_layers, c.model.mlp_dim = 32, 2, 64
  c.model.num_heads, c.model.num_kv_heads, c.model.head_dim = 2, 1, 16
  c.train.batch_size, c.train.seq_len = 4, 32
  c.train.steps, c.train.log_every, c.train.eval_every, c.train.checkpoint_every = 8, 1, 4, 4
  c.train.eval_batches, c.train.num_samples, c.train.sample_tokens = 2, 0, 8  # samples: sft_config's runs
  c.optimizer.learning_rate, c.optimizer.warmup_steps = 1e-2, 2
  return set_fields(c, **overrides)


def set_fields(c, **overrides):
  """The config with dotted keys set ("train.steps": 4); returns it unlocked."""
  c = c.unlock()
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


# ---- a pretrained tiny run and SFT data, shared by the SFT, LoRA and DPO tests ----

ANIMALS = ["cat", "dog", "bird", "king", "teacher"]


@pytest.fixture(scope="session")
def pretrained(corpus_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("pt"))
  # scanned layers; the SFT, LoRA and DPO runs on top of it loop over them (sft_config): init_from converts
  train.run(tiny_config(corpus_dir, **{"train.steps": 8, "train.num_samples": 0, "model.scan_layers": True}), workdir)
  return workdir


@pytest.fixture(scope="session")
def qa_jsonl(tmp_path_factory):
  """Questions about the synthetic grammar with one right answer each."""
  path = tmp_path_factory.mktemp("qa") / "qa.jsonl"
  rows = [{"prompt": f"what is the {a} number {i}?", "response": f"the {a} is {i % 7}."}
          for i in range(60) for a in ANIMALS]
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  return path


def sft_config(corpus_dir, qa_jsonl, init_from, **overrides):
  c = tiny_config(corpus_dir, **{"train.steps": 16, "train.eval_every": 8, "train.num_samples": 1,
                                 "train.seq_len": 48, "model.scan_layers": False, **overrides}).unlock()
  c.stage = "sft"
  c.init_from = init_from
  c.data.sources = str(qa_jsonl)
  c.data.prompt_loss_weight = 0.0
  c.data.overlong = "truncate"
  c.train.sample_prompts = ("what is the cat number 3?",)
  return c


@pytest.fixture(scope="session")
def pref_jsonl(tmp_path_factory):
  """Preference pairs about the synthetic grammar: the right answer chosen, an unrelated sentence rejected."""
  path = tmp_path_factory.mktemp("pref") / "pairs.jsonl"
  rows = [{"prompt": f"what is the {a} number {i}?", "chosen": f"the {a} is {i % 7}.",
           "rejected": f"the {ANIMALS[(j + 1) % 5]} sees the moon."}
          for i in range(40) for j, a in enumerate(ANIMALS)]
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  return path


# tests/multidevice needs 8 devices, fixed at process start: test_sharding.py runs it in its own process.
collect_ignore = [] if os.environ.get("JAXLLM_MULTIDEVICE") else ["multidevice"]
