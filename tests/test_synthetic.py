"""The synthetic languages of jaxllm/data/synthetic.py against their definition: the chains' shape, walks that
follow them with the right frequencies, relabelling, the entropy rate, and the files the pipeline reads."""

import json

import numpy as np
import pytest

from jaxllm.data import sft, sources, synthetic


@pytest.fixture(scope="module")
def lang():
  return synthetic.language(seed=3, num_words=24, topics=3, branching=3)


def test_each_word_has_branching_successors_per_topic(lang):
  assert lang.transitions.shape == (3, 24, 24) and len(set(lang.words)) == 24
  np.testing.assert_allclose(lang.transitions.sum(axis=2), 1.0)
  assert ((lang.transitions > 0).sum(axis=2) == 3).all()
  assert not np.array_equal(lang.transitions[0] > 0, lang.transitions[1] > 0)  # topics differ


def test_a_walk_follows_its_chain_with_its_frequencies(lang):
  index = {w: i for i, w in enumerate(lang.words)}
  walk = [index[w] for w in lang.walk(np.random.default_rng(0), 1, 60_000)]
  counts = np.zeros((24, 24))
  np.add.at(counts, (walk[:-1], walk[1:]), 1)
  assert (counts[lang.transitions[1] == 0] == 0).all()  # only the chain's transitions occur
  seen = counts.sum(axis=1) > 500
  empirical = counts[seen] / counts[seen].sum(axis=1, keepdims=True)
  np.testing.assert_allclose(empirical, lang.transitions[1][seen], atol=0.06)
  # the mean negative log-likelihood of a long walk is the entropy rate
  nll = -np.mean(np.log(lang.transitions[1][walk[:-1], walk[1:]]))
  assert nll == pytest.approx(lang.entropy_rate(1), abs=0.03)


def test_relabelling_renames_words_and_keeps_the_chains(lang):
  other = lang.relabelled(5)
  assert sorted(other.words) == sorted(lang.words) and other.words != lang.words
  a, b = lang.walk(np.random.default_rng(9), 0, 50), other.walk(np.random.default_rng(9), 0, 50)
  rename = dict(zip(lang.words, other.words))
  assert [rename[w] for w in a] == b


def test_files_are_deterministic_and_read_by_the_pipeline(lang, tmp_path):
  docs = synthetic.write_documents(str(tmp_path / "d.jsonl"), lang, 30, words=12, seed=1, topics=[2])
  again = synthetic.write_documents(str(tmp_path / "e.jsonl"), lang, 30, words=12, seed=1, topics=[2])
  assert open(docs).read() == open(again).read()
  read = sources.documents(docs, "train", validation_fraction=0)
  assert len(read) == 30 and all(len(read[i].split()) == 12 for i in range(30))
  pairs = synthetic.write_sft(str(tmp_path / "qa.jsonl"), lang, 20, prompt_words=7, answer_words=2, seed=2)
  records = [json.loads(line) for line in open(pairs)]
  assert [(len(r["prompt"].split()), len(r["response"].split())) for r in records] == [(7, 2)] * 20
  index = {w: i for i, w in enumerate(lang.words)}
  for r in records:  # the answer continues the prompt's walk in one of the topics
    words = [index[w] for w in (r["prompt"] + " " + r["response"]).split()]
    assert any((lang.transitions[t][words[:-1], words[1:]] > 0).all() for t in range(3))
  convs = sft.conversations(pairs, "train", validation_fraction=0)
  assert convs[0][-1] == {"role": "assistant", "content": records[0]["response"]}


def test_bad_arguments_are_refused(lang, tmp_path):
  with pytest.raises(ValueError, match="branching"):
    synthetic.language(num_words=4, branching=5)
  with pytest.raises(ValueError, match="topics"):
    synthetic.write_documents(str(tmp_path / "x.jsonl"), lang, 3, words=4, seed=0, topics=[3])
