"""Run with 8 emulated CPU devices (tests/test_sharding.py::test_multidevice_suite does): inference batches split
by rows over a mesh give the tokens and scores of one device."""

import jax
import numpy as np

from jaxllm import evaluation, generate, model as model_lib
from jaxllm.tasks import reward

CFG = model_lib.ModelConfig(vocab_size=128, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                            mlp_dim=64)


def test_sampling_and_scoring_on_a_mesh_equal_one_device():
  """Sampled (temperature 1, top-p) and greedy generation, and reward scores, of 6 rows: on one device, and split
  over the 8 devices (rows padded to 8)."""
  assert jax.device_count() == 8
  params = model_lib.init(CFG, jax.random.key(0))
  rng = np.random.default_rng(0)
  prompts = [rng.integers(1, CFG.vocab_size, rng.integers(2, 7)).tolist() for _ in range(6)]

  def run(mesh):
    p = generate.replicate(params, mesh)
    outs = [generate.generate(CFG, p, prompts, max_new_tokens=6, rng=jax.random.key(1), temperature=t, top_p=0.9,
                              mesh=mesh) for t in (1.0, 0.0)]
    scores = reward.score_sequences(CFG, p, [a + b for a, b in zip(prompts, outs[0])], 5, batch_size=4, mesh=mesh)
    return outs, scores

  want_outs, want_scores = run(None)
  outs, scores = run(generate.rows_mesh(jax.devices()))
  assert outs == want_outs
  np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)


class _Bytes:
  """A tokenizer of bytes (ids 3..258; BOS 1, EOS 2): enough for the Scorer's requests."""
  bos_id, eos_id, pad_id, vocab_size, chat_template = 1, 2, 0, 128, None

  def encode(self, text):
    return [3 + b % 120 for b in text.encode()]

  def decode(self, ids):
    return "".join(chr(97 + (i - 3) % 26) for i in ids if i > 2)


def test_the_scorer_on_a_mesh_equals_one_device():
  """loglikelihood, loglikelihood_rolling and generate_until with the rows split over 8 devices."""
  params = model_lib.init(CFG, jax.random.key(2))
  requests = [("the cat", " sees"), ("a", " dog likes the ball"), ("", "x"), ("hello there", " you")] * 2
  texts = ["a long text " * 6, "short"]

  def run(mesh):
    s = evaluation.Scorer(CFG, params, _Bytes(), max_length=32, batch_size=3, mesh=mesh)
    return s.loglikelihood(requests), s.loglikelihood_rolling(texts), s.generate_until(["ab", "cde"], ("z",), 4)

  (ll, rolling, gen), (ll8, rolling8, gen8) = run(None), run(generate.rows_mesh(jax.devices()))
  np.testing.assert_allclose([x for x, _ in ll8], [x for x, _ in ll], rtol=1e-5, atol=1e-5)
  assert [g for _, g in ll8] == [g for _, g in ll]
  np.testing.assert_allclose(rolling8, rolling, rtol=1e-5, atol=1e-5)
  assert gen8 == gen
