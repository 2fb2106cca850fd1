"""experiments/dpo_beta against hand computations: the programmatic reward and the pairs it labels
(jaxllm/data/synthetic.py), the Monte-Carlo KL estimator against an exact KL, Spearman's ρ, DPO's frontier, the
exact KL-regularised optimum against enumeration, the tabular check, and the verdict on synthetic results."""

import itertools
import json

import numpy as np
import pytest

from experiments.dpo_beta import report
from jaxllm.data import synthetic


def _two_way_language() -> synthetic.MarkovLanguage:
  """Three words; after any word, "pos" or "neg" with probability 1/2 each ("mid" only starts walks)."""
  words = ("mid", "neg", "pos")
  transitions = np.array([[[0.0, 0.5, 0.5]] * 3])
  return synthetic.MarkovLanguage(words, transitions, np.array([[1.0, 0.0, 0.0]]))


def test_reward_is_the_share_of_positive_words():
  positive = {"pos", "tile"}
  assert synthetic.reward(positive, "pos neg tile neg") == 0.5
  assert synthetic.reward(positive, ["pos", "pos", "neg"]) == pytest.approx(2 / 3)
  assert synthetic.reward(positive, "") == 0.0 and synthetic.reward(positive, "xx yy") == 0.0


def test_positive_words_are_a_seeded_subset():
  lang = synthetic.language(seed=0, num_words=32, topics=1, branching=4)
  a, b = synthetic.positive_words(lang, 8, seed=1), synthetic.positive_words(lang, 8, seed=1)
  assert a == b and len(a) == 8 and a <= set(lang.words)
  assert synthetic.positive_words(lang, 8, seed=2) != a


def test_pairs_choose_the_higher_reward_and_redraw_ties():
  lang, positive = _two_way_language(), frozenset({"pos"})
  rng = np.random.default_rng(0)
  # one-word answers: the reward is 1 for "pos" and 0 for "neg"; a tie ("pos", "pos") is drawn again
  for _ in range(20):
    pair = synthetic.preference_pair(lang, rng, ["mid"], 1, positive)
    assert pair == {"prompt": "mid", "chosen": "pos", "rejected": "neg"}
  # two-word answers by hand: "pos neg" (1/2) beats "neg neg" (0); "pos pos" (1) beats both
  for _ in range(50):
    pair = synthetic.preference_pair(lang, rng, ["mid"], 2, positive)
    assert synthetic.reward(positive, pair["chosen"]) > synthetic.reward(positive, pair["rejected"])
  # a chain with one successor per word: every draw ties, so no pair
  always = synthetic.MarkovLanguage(lang.words, np.array([[[0.0, 0.0, 1.0]] * 3]), lang.start)
  assert synthetic.preference_pair(always, rng, ["mid"], 3, positive, tries=4) is None


def test_preference_and_preferred_files(tmp_path):
  lang = synthetic.language(seed=0, num_words=32, topics=1, branching=4)
  positive = synthetic.positive_words(lang, 8, seed=1)
  pairs = synthetic.write_preferences(str(tmp_path / "dpo" / "pairs.jsonl"), lang, 200, prompt_words=4,
                                      answer_words=8, seed=2, positive=positive)
  records = [json.loads(line) for line in open(pairs)]
  index = {w: i for i, w in enumerate(lang.words)}
  assert len(records) == 200
  for r in records:
    prompt, chosen, rejected = r["prompt"].split(), r["chosen"].split(), r["rejected"].split()
    assert len(prompt) == 4 and len(chosen) == len(rejected) == 8
    assert synthetic.reward(positive, chosen) > synthetic.reward(positive, rejected)
    for answer in (chosen, rejected):  # both continue the prompt along the chain
      walk = [index[w] for w in prompt[-1:] + answer]
      assert all(lang.transitions[0, a, b] > 0 for a, b in zip(walk, walk[1:]))
  sft = synthetic.write_preferred_sft(str(tmp_path / "preferred" / "pairs.jsonl"), pairs)
  assert [json.loads(line) for line in open(sft)] == [{"prompt": r["prompt"], "response": r["chosen"]}
                                                      for r in records]


def test_kl_estimator_matches_the_exact_kl_of_a_two_token_categorical():
  """π and π_ref over two tokens from 3 ids, the second conditioned on the first: the estimate from samples of π
  (Σ_t log π − log π_ref per sample) against the exact KL by enumeration."""
  rng = np.random.default_rng(0)
  def model():
    first = rng.dirichlet(np.ones(3))
    second = rng.dirichlet(np.ones(3), size=3)  # [first token, second token]
    return first, second
  (p1, p2), (q1, q2) = model(), model()
  exact = sum(p1[a] * p2[a, b] * np.log(p1[a] * p2[a, b] / (q1[a] * q2[a, b]))
              for a, b in itertools.product(range(3), range(3)))
  n = 200_000
  a = rng.choice(3, size=n, p=p1)
  b = (rng.random(n)[:, None] > np.cumsum(p2[a], axis=1)).sum(axis=1)
  policy = np.stack([np.log(p1[a]), np.log(p2[a, b])], axis=1)
  ref = np.stack([np.log(q1[a]), np.log(q2[a, b])], axis=1)
  mask = np.ones_like(policy)
  mean, se = report.kl_estimate(policy, ref, mask)
  assert abs(mean - exact) < 4 * se and se < 0.01
  # masked-out tokens (padding) count for nothing
  padded = report.kl_estimate(np.pad(policy, ((0, 0), (0, 2)), constant_values=-3.0), np.pad(ref, ((0, 0), (0, 2))),
                              np.pad(mask, ((0, 0), (0, 2))))
  assert padded[0] == pytest.approx(mean)


def test_spearman_by_hand():
  assert report.spearman([0.05, 0.1, 0.5, 1, 5], [9, 7, 4, 2, 1]) == pytest.approx(-1.0)
  # ranks of y: 3 4 5 2 1, Σd² = 32: ρ = 1 − 6·32/(5·24) = −0.6
  assert report.spearman([1, 2, 3, 4, 5], [0.43, 0.434, 0.437, 0.417, 0.32]) == pytest.approx(-0.6)
  assert report.spearman([1, 2, 3], [1, 1, 2]) == pytest.approx(np.sqrt(3) / 2)  # ties: mean ranks 1.5, 1.5, 3
  assert np.isnan(report.spearman([1], [2])) and np.isnan(report.spearman([1, 2], [3, 3]))


def test_frontier_is_the_upper_hull():
  points = [(0.0, 0.2), (1.0, 0.4), (3.0, 0.5), (2.0, 0.1)]  # (2, 0.1) is dominated
  assert report.frontier(points, 0.5) == pytest.approx(0.3)
  assert report.frontier(points, 2.0) == pytest.approx(0.45)
  assert report.frontier(points, 5.0) == pytest.approx(0.5)  # beyond the last point: its reward
  assert report.frontier(points, 1.0) == pytest.approx(0.4)


def test_optimal_frontier_matches_enumeration():
  """π* ∝ chain·exp(reward/β) over every 3-word answer of a 4-word language, enumerated, against the backward
  recursion."""
  lang = synthetic.language(seed=5, num_words=4, topics=1, branching=3)
  positive = frozenset(lang.words[:2])
  starts, n = [lang.words[2], lang.words[3], lang.words[3]], 3
  p, index = lang.transitions[0], {w: i for i, w in enumerate(lang.words)}
  for beta, kl, reward in report.optimal_frontier(lang, positive, starts, n, [0.1, 0.5, 3.0]):
    want_kl = want_reward = 0.0
    for start in starts:
      answers = list(itertools.product(range(4), repeat=n))
      chain = np.array([np.prod([p[a, b] for a, b in zip((index[start],) + y[:-1], y)]) for y in answers])
      r = np.array([synthetic.reward(positive, [lang.words[i] for i in y]) for y in answers])
      tilted = chain * np.exp(r / beta)
      star = tilted / tilted.sum()
      with np.errstate(divide="ignore", invalid="ignore"):
        want_kl += np.sum(np.where(star > 0, star * np.log(star / chain), 0.0)) / len(starts)
      want_reward += np.sum(star * r) / len(starts)
    assert kl == pytest.approx(want_kl, rel=1e-6, abs=1e-9) and reward == pytest.approx(want_reward, rel=1e-6)


def test_tabular_dpo_lands_on_the_kl_regularised_optimum():
  check = report.tabular_check()
  assert check["tv"] <= report.TABULAR_TV and check["tv_ref"] > 0.2  # it had somewhere to go


def test_point_names_give_the_policy():
  assert report.policy_of("dpo_beta0.05_seed2") == ("dpo_beta0.05", "dpo", 0.05)
  assert report.policy_of("dpo_beta5_seed0") == ("dpo_beta5", "dpo", 5.0)
  assert report.policy_of("preferred_steps400_seed1") == ("preferred_steps400", "preferred", None)
  assert report.policy_of("cdpo_seed0") == ("cdpo", "cdpo", None)


def _result(dpo: dict, baseline: dict, sft_reward: float = 0.18) -> dict:
  """dpo: {β: (KL, reward)}; baseline: {name: (KL, reward)}; final points only, no checkpoints."""
  cell = lambda v: {"mean": v, "std": 0.01, "n": 3}
  policies = {f"dpo_beta{b:g}": {"kind": "dpo", "beta": b, "kl": cell(k), "reward": cell(r)}
              for b, (k, r) in dpo.items()}
  policies |= {g: {"kind": "preferred", "beta": None, "kl": cell(k), "reward": cell(r)}
               for g, (k, r) in baseline.items()}
  return {"sft": {"reward": sft_reward}, "policies": policies}


@pytest.mark.parametrize("dpo,baseline,want", [
    ({0.05: (4.0, 0.60), 0.1: (3.0, 0.55), 0.5: (2.0, 0.45), 1: (1.5, 0.40), 5: (0.5, 0.30)},
     {"preferred_steps100": (0.5, 0.28)}, "reproduced"),
    ({0.05: (4.2, 0.49), 0.1: (3.9, 0.52), 0.5: (3.7, 0.56), 1: (2.5, 0.50), 5: (1.4, 0.42)},  # reward peaks
     {"preferred_steps100": (0.5, 0.25)}, "partly"),
    ({0.05: (4.0, 0.60), 0.1: (3.0, 0.55), 0.5: (2.0, 0.45), 1: (1.5, 0.40), 5: (0.5, 0.30)},
     {"preferred_steps100": (0.5, 0.35)}, "partly"),                                             # baseline above
    ({0.05: (0.5, 0.30), 0.1: (1.5, 0.40), 0.5: (2.0, 0.45), 1: (3.0, 0.55), 5: (4.0, 0.60)},  # β the wrong way
     {"preferred_steps100": (0.5, 0.35)}, "not reproduced"),
])
def test_verdict_follows_the_numbers(dpo, baseline, want):
  line = report.verdict(_result(dpo, baseline))
  assert line.startswith(f"Verdict: {want} — ")
  betas = sorted(dpo)
  assert f"KL {dpo[betas[0]][0]:.2f} → {dpo[betas[-1]][0]:.2f} nats" in line


def test_baseline_is_compared_at_each_checkpoint_within_the_noise():
  result = _result({0.1: (2.0, 0.5), 1: (1.0, 0.38)}, {"preferred_steps100": (0.5, 0.25)})
  result["policies"]["preferred_steps100"]["trajectory"] = [(25, 0.2, 0.2, 0.01), (100, 0.5, 0.25, 0.01)]
  result["policies"]["dpo_beta1"]["trajectory"] = [(75, 0.25, 0.30, 0.01), (300, 1.0, 0.38, 0.01)]
  f = report.findings(result)
  # at KL 0.2: the segment (0, 0.18)-(0.25, 0.30) gives 0.276; at KL 0.5: the segment (0.25, 0.30)-(2.0, 0.5) to
  # β = 0.1's final point (0.3286) is above the one to β = 1's (1.0, 0.38) (0.3267)
  gaps = {step: gap for _, step, _, _, gap, _ in f["baseline"]}
  assert gaps[25] == pytest.approx(0.276 - 0.2) and gaps[100] == pytest.approx(0.30 + 0.2 * 0.25 / 1.75 - 0.25)
  assert f["above"] and f["under"] == 2
  # a baseline checkpoint above the frontier by less than twice its standard error still counts as under ...
  result["policies"]["preferred_steps100"]["trajectory"] = [(100, 0.5, 0.3286 + 0.015, 0.01)]
  assert report.findings(result)["above"]
  # ... and by more, not
  result["policies"]["preferred_steps100"]["trajectory"] = [(100, 0.5, 0.3286 + 0.025, 0.01)]
  assert not report.findings(result)["above"]
