"""KV-cache generation against full recomputation, the sampling filters, and loading a run for the CLI."""

import dataclasses
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxllm import checkpoint as ckpt_lib, cli, config as config_lib, generate, model as model_lib, runs
from jaxllm import step as step_lib
from jaxllm.data.tokenizer import train_tokenizer
from tests.conftest import tiny_config

CFG = model_lib.ModelConfig(vocab_size=256, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                            mlp_dim=64)
PROMPTS = [[5, 17, 42], [7, 8, 9, 10, 11, 12, 13], [200], [3, 1, 4, 1, 5]]
NEW = 8


def random_params(cfg, seed):
  """Params of the model's shapes drawn with numpy (model.init's compilation costs more than this file's tests):
  norm scales near 1, other weights N(0, 0.3²)."""
  rng = np.random.default_rng(seed)
  draw = lambda path, a: (1.0 + 0.1 * rng.standard_normal(a.shape) if "scale" in jax.tree_util.keystr(path)
                          else 0.3 * rng.standard_normal(a.shape)).astype(np.float32)
  return jax.tree_util.tree_map_with_path(draw, model_lib.abstract_params(cfg))


@pytest.fixture(scope="module", params=[True, False], ids=["scan", "loop"])
def model(request):
  """(config, params) with nn.scan over layers, or a Python loop over the same weights unstacked."""
  params = random_params(CFG, 0)
  if request.param:
    return CFG, params
  loop_params = {k: v for k, v in params.items() if k != "layers"}
  for i in range(CFG.num_layers):
    loop_params[f"layers_{i}"] = jax.tree.map(lambda a: a[i], params["layers"])
  return dataclasses.replace(CFG, scan_layers=False), loop_params


@pytest.fixture(scope="module")
def fwd():
  return jax.jit(model_lib.forward, static_argnums=0)


@pytest.fixture(scope="module")
def greedy(model):
  cfg, params = model
  return generate.generate(cfg, params, PROMPTS, max_new_tokens=NEW, rng=jax.random.key(0), temperature=0.0)


@pytest.fixture(scope="module")
def scan_model():
  """Sampling and stopping do not depend on the layer loop: their tests use the scanned model only."""
  return CFG, random_params(CFG, 0)


@pytest.fixture(scope="module")
def scan_greedy(scan_model):
  cfg, params = scan_model
  return generate.generate(cfg, params, PROMPTS, max_new_tokens=NEW, rng=jax.random.key(0), temperature=0.0)


def _gen(model, **kw):
  """generate on PROMPTS: every call with the default top_k/top_p reuses one compiled program."""
  cfg, params = model
  kw = {"rng": jax.random.key(0), "temperature": 0.0, **kw}
  return generate.generate(cfg, params, PROMPTS, max_new_tokens=NEW, **kw)


def _right_padded(seqs):
  """[B, longest prompt + NEW]: one shape for every full forward of the reference (causal: padding after a
  sequence never changes its logits)."""
  buf = np.zeros((len(seqs), max(map(len, PROMPTS)) + NEW), np.int32)
  for row, s in zip(buf, seqs):
    row[: len(s)] = s
  return jnp.asarray(buf)


def test_cached_greedy_equals_full_recomputation(model, fwd, greedy):
  """The reference runs `forward` on every whole sequence at every step and takes the argmax."""
  cfg, params = model
  seqs = [list(p) for p in PROMPTS]
  for _ in range(NEW):
    logits = np.asarray(fwd(cfg, params, _right_padded(seqs)))
    for b, s in enumerate(seqs):
      s.append(int(np.argmax(logits[b, len(s) - 1])))
  assert greedy == [s[len(p):] for s, p in zip(seqs, PROMPTS)]
  assert all(len(g) == NEW for g in greedy)


def test_cached_logits_equal_forward_logits(model, fwd):
  """Prefill of left-padded prompts (random pad ids, never attended to) then one decode step: each row's logits
  are those of `forward` on that row's unpadded sequence."""
  cfg, params = model
  p, b = max(map(len, PROMPTS)), len(PROMPTS)
  tokens = np.random.default_rng(1).integers(0, CFG.vocab_size, (b, p)).astype(np.int32)
  segments, positions = np.zeros((b, p), np.int32), np.zeros((b, p), np.int32)
  for i, prompt in enumerate(PROMPTS):
    n = len(prompt)
    tokens[i, p - n:], segments[i, p - n:], positions[i, p - n:] = prompt, 1, np.arange(n)
  nxt = [11, 22, 33, 44]
  lengths = np.array([[len(q)] for q in PROMPTS], np.int32)

  @functools.partial(jax.jit, static_argnums=0)
  def prefill_then_decode(cfg, params, tokens, segments, positions):
    cache = model_lib.init_cache(cfg, b, p + 5)
    prefill, cache = model_lib.forward_with_cache(cfg, params, tokens, cache, segments, positions)
    decoded, cache = model_lib.forward_with_cache(cfg, params, jnp.asarray(nxt)[:, None], cache, None, lengths)
    return prefill, decoded, cache

  prefill, decoded, cache = prefill_then_decode(cfg, params, tokens, segments, positions)
  assert decoded.dtype == jnp.float32 and decoded.shape == (b, 1, CFG.vocab_size)
  assert int(cache.index) == p + 1
  full = fwd(cfg, params, _right_padded([q + [t] for q, t in zip(PROMPTS, nxt)]))
  for i, n in enumerate(lengths[:, 0]):
    np.testing.assert_allclose(prefill[i, -1], full[i, n - 1], atol=1e-4)
    np.testing.assert_allclose(decoded[i, 0], full[i, n], atol=1e-4)


def test_scan_and_loop_share_the_cache_layout(model):
  cfg, _ = model
  cache = model_lib.init_cache(cfg, 3, 10)
  assert cache.k_LxBxSxKxE.shape == cache.v_LxBxSxKxE.shape == (2, 3, 10, CFG.num_kv_heads, CFG.head_dim)


def test_top_k_1_and_tiny_top_p_equal_greedy(scan_model, scan_greedy):
  model, greedy = scan_model, scan_greedy
  cfg, params = model
  assert _gen(model, temperature=1.0, top_k=1, rng=jax.random.key(3)) == greedy
  assert _gen(model, temperature=1.0, top_p=1e-6, rng=jax.random.key(4)) == greedy


def test_top_k_then_top_p_keep_the_right_ids():
  """Ids 1, 3, 2, 0 have p = .4, .3, .2, .1. top_k=3 renormalizes the first three to (.44, .33, .22), whose nucleus
  at top_p=.75 is ids {1, 3}; without top_k it is {1, 3, 2} (.4 + .3 < .75). Kept ids are drawn in proportion."""
  logits = jnp.log(jnp.array([[0.1, 0.4, 0.2, 0.3]]))  # ids by probability: 1, 3, 2, 0
  keys = jax.random.split(jax.random.key(0), 4000)
  draw = jax.jit(jax.vmap(lambda k, top_k, top_p: generate.choose_tokens(
      logits, k, temperature=1.0, top_k=top_k, top_p=top_p)[0], in_axes=(0, None, None)))
  counts = lambda ids: np.bincount(np.asarray(ids), minlength=4) / len(ids)
  np.testing.assert_allclose(counts(draw(keys, 0, 1.0)), [0.1, 0.4, 0.2, 0.3], atol=0.03)
  np.testing.assert_allclose(counts(draw(keys, 2, 1.0)), [0, 4 / 7, 0, 3 / 7], atol=0.03)
  np.testing.assert_allclose(counts(draw(keys, 3, 0.75)), [0, 4 / 7, 0, 3 / 7], atol=0.03)
  np.testing.assert_allclose(counts(draw(keys, 0, 0.75)), [0, 4 / 9, 2 / 9, 3 / 9], atol=0.03)  # .7 < .75


def test_sampling_is_seeded_and_respects_vocab_limit(scan_model):
  model = scan_model
  a = _gen(model, temperature=5.0, rng=jax.random.key(7), vocab_limit=100)
  assert a == _gen(model, temperature=5.0, rng=jax.random.key(7), vocab_limit=100)
  assert a != _gen(model, temperature=5.0, rng=jax.random.key(8), vocab_limit=100)
  assert all(0 <= t < 100 for row in a for t in row) and sum(map(len, a)) == len(PROMPTS) * NEW
  unlimited = _gen(model, temperature=5.0, rng=jax.random.key(7))
  assert max(t for row in unlimited for t in row) >= 100  # the limit is what kept them below 100


def test_stop_ids_cut_the_output(scan_model, scan_greedy):
  model, greedy = scan_model, scan_greedy
  cfg, params = model
  stop = greedy[1][3]
  got = _gen(model, stop_ids=(stop,))
  for row, full in zip(got, greedy):
    want = full[: full.index(stop) + 1] if stop in full else full
    assert row == want
  # every row stops at its first token (and the loop ends there)
  firsts = tuple({row[0] for row in greedy})
  assert _gen(model, stop_ids=firsts) == [[row[0]] for row in greedy]


# ---------------------------------------------------------------------------- a training run's workdir


@pytest.fixture(scope="module")
def workdir(corpus_dir, tmp_path_factory):
  """A workdir as train.run leaves it: config.json, tokenizer.model, and checkpoints 1 and 2 of a TrainState
  (params and an Adam state), written with train.py's own pieces, random params instead of training (fast)."""
  wd = tmp_path_factory.mktemp("gen_run")
  config = tiny_config(corpus_dir)
  tokenizer = train_tokenizer([p.read_text() for p in sorted(corpus_dir.glob("*.txt"))],
                              vocab_size=config.data.tokenizer.vocab_size)
  tokenizer.save(str(wd / "tokenizer.model"))
  model_cfg = config_lib.resolve_model(config, tokenizer.vocab_size)
  (wd / "config.json").write_text(json.dumps(runs.resolved_config(config, model_cfg)))
  checkpointer = ckpt_lib.Checkpointer(str(wd / "checkpoints"), keep=2, async_save=False)
  for step in (1, 2):
    params = random_params(model_cfg, step)
    state = step_lib.init_state(None, init_trainable=lambda _: params, tx=optax.adamw(1e-3))
    checkpointer.save(step, state.replace(step=jnp.int32(step)), meta={"tokenizer_sha256": tokenizer.sha256})
  checkpointer.close()
  return str(wd)


def test_load_run(workdir):
  cfg, params, tokenizer = runs.load_run(workdir)
  assert (cfg.d_model, cfg.num_layers, cfg.num_kv_heads, cfg.vocab_size) == (32, 2, 1, tokenizer.vocab_size)
  shapes = jax.tree.map(lambda a: (a.shape, a.dtype), model_lib.abstract_params(cfg))
  assert jax.tree.map(lambda a: (a.shape, a.dtype), params) == shapes
  _, first, _ = runs.load_run(workdir, step=1)
  assert any(float(jnp.max(jnp.abs(a - b))) > 0 for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(params)))
  with pytest.raises(FileNotFoundError, match="no checkpoint 7"):
    runs.load_run(workdir, step=7)


def test_cli_prints_what_generate_gives(workdir):
  """One subprocess: --chat greedy; its text is the in-process greedy answer to the chat-rendered prompt."""
  from jaxllm.data import chat  # the chat template (render_prompt, <|end|>)

  cfg, params, tokenizer = runs.load_run(workdir)
  ids = chat.render_prompt([{"role": "user", "content": "the cat"}], tokenizer)
  stops = (tokenizer.eos_id, tokenizer.token_id("<|end|>"))
  out = generate.generate(cfg, params, [ids], max_new_tokens=6, rng=jax.random.key(0), temperature=0.0,
                          stop_ids=stops, vocab_limit=tokenizer.vocab_size)[0]
  answer = tokenizer.decode(out[:-1] if out[-1] in stops else out)
  env = dict(os.environ)
  if jax.config.jax_compilation_cache_dir:  # conftest's persistent cache: the CLI reuses the program just compiled
    env.update(JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  proc = subprocess.run([sys.executable, "-m", "jaxllm.generate", "--workdir", workdir, "--prompt", "the cat",
                         "--max_new_tokens", "6", "--temperature", "0", "--chat"], env=env,
                        capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)), timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout == f"--- 0: user ---\nthe cat\n--- 0: assistant ---\n{answer}\n"


def test_cli_plain_prompts(workdir, capsys):
  cfg, params, tokenizer = runs.load_run(workdir)
  prompts = ["the cat", "a small bird sees the"]
  outs = generate.generate(cfg, params, [tokenizer.encode(p) for p in prompts], max_new_tokens=5,
                           rng=jax.random.key(0), temperature=0.0, stop_ids=(tokenizer.eos_id,),
                           vocab_limit=tokenizer.vocab_size)
  cli.main(["generate", "--workdir", workdir, "--prompt", prompts[0], "--prompt", prompts[1], "--max_new_tokens", "5",
                 "--temperature", "0"])
  want = "".join(f"--- {i} ---\n{p}{tokenizer.decode([t for t in o if t != tokenizer.eos_id])}\n"
                 for i, (p, o) in enumerate(zip(prompts, outs)))
  assert capsys.readouterr().out == want


def test_cli_refuses_empty_and_overlong_prompts(workdir, capsys):
  """An empty prompt, and a prompt whose tokens plus --max_new_tokens exceed the run's train.seq_len: one line,
  exit 2, before any compilation."""
  assert cli.main(["generate", "--workdir", workdir, "--prompt", " "]) == 2
  assert capsys.readouterr().err.strip() == "error: --prompt: an empty prompt; give the text to continue (or to answer, with --chat)"
  long = "the cat sees the moon. " * 20
  assert cli.main(["generate", "--workdir", workdir, "--prompt", long, "--max_new_tokens", "4"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "exceed the 32 tokens the run was trained on (train.seq_len)" in err[0]
