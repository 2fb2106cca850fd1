"""The lm-evaluation-harness adapter (jaxllm/lm_eval_adapter.py), run as its command line on local task files: the
harness's multiple-choice metrics and generations equal jaxllm's own evaluation of the same items. Skipped
without lm_eval (the optional [eval] extra, which CI does not install)."""

import glob
import json
import os

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the task files are local: nothing to download
os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("lm_eval")

from jaxllm import evaluation, lm_eval_adapter  # noqa: E402

MC = [{"context": "The cat", "choices": [" sees the ball.", " xq zz qq.", " the the the"], "answer": 0},
      {"context": "A dog", "choices": [" zzzz.", " likes the river."], "answer": 1},
      {"context": "The king", "choices": [" carries an old book.", " paints the moon.", " river river."], "answer": 1},
      {"context": "My sister finds", "choices": [" a green hat.", " finds finds", " the garden."], "answer": 2}]
GEN = [{"context": "The cat sees", "target": "the ball"}, {"context": "A small bird", "target": "follows the king"},
       {"context": "", "target": "The moon"}]

MC_YAML = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
  - metric: acc_mutual_info
"""

GEN_YAML = """task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{target}}}}"
target_delimiter: ""
generation_kwargs:
  until: ["."]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
"""


def test_lm_eval_scores_a_run_as_jaxllm_does(pretrained, tmp_path):
  for name, items, yaml in (("mc", MC, MC_YAML), ("gen", GEN, GEN_YAML)):
    (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(it) + "\n" for it in items))
    (tmp_path / f"tiny_{name}.yaml").write_text(yaml.format(data=tmp_path / f"{name}.jsonl"))
  out = tmp_path / "out"
  lm_eval_adapter.main(["--model", "jaxllm", "--model_args", f"run={pretrained}", "--tasks", "tiny_mc,tiny_gen",
                        "--include_path", str(tmp_path), "--batch_size", "4", "--output_path", str(out),
                        "--log_samples"])
  results = json.load(open(glob.glob(f"{out}/**/results_*.json", recursive=True)[0]))["results"]
  scorer = evaluation.Scorer.from_run(pretrained, batch_size=4)
  want = evaluation.evaluate(scorer, MC)
  for metric in ("acc", "acc_norm", "acc_mutual_info"):
    assert results["tiny_mc"][f"{metric},none"] == pytest.approx(want[metric])
  # request by request: each choice after its context, then after an empty one (acc_mutual_info's prior)
  for sample in samples_of(out, "tiny_mc"):
    it = sample["doc"]
    requests = [(it["context"], c) for c in it["choices"]] + [("", c) for c in it["choices"]]
    got = [(float(logp), greedy == "True") for (logp, greedy), in sample["resps"]]
    assert got == [(pytest.approx(logp, abs=1e-4), greedy) for logp, greedy in scorer.loglikelihood(requests)]
  got = {s["doc"]["context"]: s["resps"][0][0] for s in samples_of(out, "tiny_gen")}
  mine = evaluation.generations(scorer, [dict(it, until=["."], max_tokens=6) for it in GEN])
  assert [got[it["context"]] for it in GEN] == mine and any(mine)


def samples_of(out, task: str) -> list[dict]:
  """The per-document records of --log_samples."""
  return [json.loads(line) for line in open(glob.glob(f"{out}/**/samples_{task}_*.jsonl", recursive=True)[0])]
