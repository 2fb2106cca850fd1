"""Synthetic languages for studies and tests: a topic-mixture Markov language over made-up words, its twin with
the vocabulary relabelled, and SFT prompt/answer pairs drawn from it. Deterministic by seed; written as the JSONL
files the data pipeline reads (pretraining: {"text"} per line, SFT: {"prompt", "response"} per line).

  lang = synthetic.language(seed=0)
  synthetic.write_documents("pre.jsonl", lang, 4000, words=24, seed=1)               # every topic
  synthetic.write_documents("near.jsonl", lang, 2000, words=24, seed=2, topics=[0])  # one topic
  synthetic.write_documents("far.jsonl", lang.relabelled(7), 2000, words=24, seed=3, topics=[0])
  synthetic.write_sft("qa.jsonl", lang, 64, prompt_words=24, answer_words=2, seed=4, topics=[1])

Why this shape. Each topic is a first-order Markov chain over one shared vocabulary (each word has `branching`
successors per topic, with Dirichlet weights), and a document keeps one topic throughout. So:
  - a model pretrained on the mixture must infer a document's topic from its context (attention does it), and
    adapting it to one topic (the "near" task) is a small change: always assume topic t;
  - relabelling the words by a permutation (the "far" task) keeps every statistic but the names: the frozen
    embeddings no longer mean what they did, and the model has to learn a new map from every word to its role;
  - a prompt and its answer drawn from one walk share a chain, so the prompt's tokens carry information about the
    answer (the prompt-loss study).
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


@dataclasses.dataclass(frozen=True, eq=False)
class MarkovLanguage:
  words: tuple[str, ...]        # the vocabulary, index -> word
  transitions: np.ndarray       # [topics, V, V] row-stochastic: P(next word | word, topic)
  start: np.ndarray             # [topics, V]: P(first word | topic)

  @property
  def num_topics(self) -> int:
    return self.transitions.shape[0]

  def relabelled(self, seed: int) -> MarkovLanguage:
    """The same chains with the words renamed by a random permutation: word i is written as words[perm[i]]."""
    perm = np.random.default_rng(seed).permutation(len(self.words))
    return MarkovLanguage(tuple(self.words[p] for p in perm), self.transitions, self.start)

  def walk(self, rng: np.random.Generator, topic: int, n: int) -> list[str]:
    """n words of one topic's chain, from its start distribution."""
    u, cdf = rng.random(n), np.cumsum(self.transitions[topic], axis=1)
    out = [min(int(np.searchsorted(np.cumsum(self.start[topic]), u[0], side="right")), len(self.words) - 1)]
    for x in u[1:]:  # inverse-CDF sampling: one uniform per word
      out.append(min(int(np.searchsorted(cdf[out[-1]], x, side="right")), len(self.words) - 1))
    return [self.words[i] for i in out]

  def entropy_rate(self, topic: int) -> float:
    """The chain's entropy per word in nats under its stationary distribution: the loss floor per word."""
    t = self.transitions[topic]
    values, vectors = np.linalg.eig(t.T)
    pi = np.real(vectors[:, np.argmin(np.abs(values - 1))])
    pi = pi / pi.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
      h = -np.where(t > 0, t * np.log(t), 0.0).sum(axis=1)
    return float(pi @ h)


def make_words(n: int, rng: np.random.Generator) -> tuple[str, ...]:
  """n distinct pronounceable two-syllable words (a tokenizer of a few hundred pieces keeps each whole)."""
  if not 1 <= n <= (len(_CONSONANTS) * len(_VOWELS)) ** 2:
    raise ValueError(f"num_words must be in [1, {(len(_CONSONANTS) * len(_VOWELS)) ** 2}], got {n}")
  words: set[str] = set()
  while len(words) < n:
    words.add("".join(_CONSONANTS[rng.integers(len(_CONSONANTS))] + _VOWELS[rng.integers(len(_VOWELS))]
                      for _ in range(2)))
  return tuple(sorted(words))


def language(seed: int = 0, num_words: int = 64, topics: int = 4, branching: int = 3,
             concentration: float = 1.0) -> MarkovLanguage:
  """A language of `topics` Markov chains over `num_words` words; in each chain a word has `branching`
  successors (chosen at random per topic) with Dirichlet(`concentration`) weights."""
  if not 1 <= branching <= num_words:
    raise ValueError(f"branching must be in [1, num_words={num_words}], got {branching}")
  rng = np.random.default_rng(seed)
  words = make_words(num_words, rng)
  transitions = np.zeros((topics, num_words, num_words))
  for t in range(topics):
    for w in range(num_words):
      successors = rng.choice(num_words, size=branching, replace=False)
      transitions[t, w, successors] = rng.dirichlet(np.full(branching, concentration))
  start = rng.dirichlet(np.ones(num_words), size=topics)
  return MarkovLanguage(words, transitions, start)


def _write_jsonl(path: str, records) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
  os.replace(tmp, path)
  return path


def _topics(lang: MarkovLanguage, topics) -> list[int]:
  chosen = list(range(lang.num_topics)) if topics is None else list(topics)
  if not chosen or any(not 0 <= t < lang.num_topics for t in chosen):
    raise ValueError(f"topics must be a non-empty subset of 0..{lang.num_topics - 1}, got {topics}")
  return chosen


def write_documents(path: str, lang: MarkovLanguage, n: int, *, words: int, seed: int, topics=None) -> str:
  """n documents of `words` words each, one JSONL {"text"} per line, each of one topic drawn uniformly from
  `topics` (None = all)."""
  rng, chosen = np.random.default_rng(seed), _topics(lang, topics)
  return _write_jsonl(path, ({"text": " ".join(lang.walk(rng, chosen[rng.integers(len(chosen))], words))}
                             for _ in range(n)))


def write_sft(path: str, lang: MarkovLanguage, n: int, *, prompt_words: int, answer_words: int, seed: int,
              topics=None) -> str:
  """n prompt/answer pairs, one JSONL {"prompt", "response"} per line: a walk of prompt_words + answer_words
  words of one topic (drawn from `topics`), cut into the prompt and the answer that continues it."""
  rng, chosen = np.random.default_rng(seed), _topics(lang, topics)

  def record():
    walk = lang.walk(rng, chosen[rng.integers(len(chosen))], prompt_words + answer_words)
    return {"prompt": " ".join(walk[:prompt_words]), "response": " ".join(walk[prompt_words:])}

  return _write_jsonl(path, (record() for _ in range(n)))


# ------------------------------------------------------------------------------- a programmatic reward
# experiments/dpo_beta: a "sentiment" over the language: a fixed subset of its words is positive, and a response's
# true reward is the share of its words in that subset. Preference pairs compare two continuations of one prompt.


def positive_words(lang: MarkovLanguage, n: int, seed: int) -> frozenset[str]:
  """n of the language's words, chosen at random by `seed`: the words the reward counts."""
  if not 0 <= n <= len(lang.words):
    raise ValueError(f"n must be in [0, {len(lang.words)}], got {n}")
  return frozenset(lang.words[i] for i in np.random.default_rng(seed).choice(len(lang.words), n, replace=False))


def reward(positive, words) -> float:
  """The share of `words` (a list of words, or a whitespace-separated string) in `positive`; 0 for no words."""
  words = words.split() if isinstance(words, str) else list(words)
  return sum(w in positive for w in words) / len(words) if words else 0.0


def preference_pair(lang: MarkovLanguage, rng: np.random.Generator, prompt: list[str], answer_words: int, positive,
                    *, topic: int = 0, tries: int = 8) -> dict | None:
  """{"prompt", "chosen", "rejected"}: two continuations of `prompt` by the chain (each `answer_words` words, the
  walk's next words after the prompt's last), the one of higher reward chosen. A tie is drawn again, up to `tries`
  times; None if every draw ties."""
  for _ in range(tries):
    a, b = (continuation(lang, rng, prompt[-1], answer_words, topic=topic) for _ in range(2))
    ra, rb = reward(positive, a), reward(positive, b)
    if ra != rb:
      chosen, rejected = (a, b) if ra > rb else (b, a)
      return {"prompt": " ".join(prompt), "chosen": " ".join(chosen), "rejected": " ".join(rejected)}
  return None


def continuation(lang: MarkovLanguage, rng: np.random.Generator, last: str, n: int, *, topic: int = 0) -> list[str]:
  """The chain's next n words after the word `last`."""
  cdf, index = np.cumsum(lang.transitions[topic], axis=1), lang.words.index(last)
  out = []
  for x in rng.random(n):  # inverse-CDF sampling, as `walk` does
    index = min(int(np.searchsorted(cdf[index], x, side="right")), len(lang.words) - 1)
    out.append(lang.words[index])
  return out


def write_preferences(path: str, lang: MarkovLanguage, n: int, *, prompt_words: int, answer_words: int, seed: int,
                      positive, topic: int = 0, tries: int = 8) -> str:
  """n preference pairs, one JSONL {"prompt", "chosen", "rejected"} per line (jaxllm/data/preference.py reads
  them): a prompt walk of `topic` and two continuations of it labelled by `reward` (see `preference_pair`; prompts
  whose draws all tie are replaced by new ones)."""
  rng = np.random.default_rng(seed)

  def records():
    written = 0
    while written < n:
      pair = preference_pair(lang, rng, lang.walk(rng, topic, prompt_words), answer_words, positive, topic=topic,
                             tries=tries)
      if pair is not None:
        written += 1
        yield pair

  return _write_jsonl(path, records())


def write_preferred_sft(path: str, preferences_path: str) -> str:
  """The pairs of a preference file as SFT pairs {"prompt", "response": its chosen answer}, line for line (the
  "SFT on the preferred answers" baseline trains on the same pairs)."""
  with open(preferences_path) as f:
    pairs = [json.loads(line) for line in f if line.strip()]
  return _write_jsonl(path, ({"prompt": p["prompt"], "response": p["chosen"]} for p in pairs))
