"""Hugging Face tokenizer.json tokenizers (jaxllm/data/hf_tokenizer.py) with their own chat templates: the
template's text and the loss on assistant spans, for a Qwen2-shaped (ChatML) and a Llama-3-shaped tokenizer; then
a Qwen2-shaped model imported with its tokenizer, fine-tuned with SFT and exported back."""

import json
import os

import numpy as np
import pytest

tokenizers = pytest.importorskip("tokenizers")
jinja2 = pytest.importorskip("jinja2")

from jaxllm import cli, hf, model, runs, train  # noqa: E402
from jaxllm.data import chat, tokenizer as tokenizer_lib  # noqa: E402
from tests.conftest import sft_config  # noqa: E402

# the chat templates of Qwen2-Instruct and Llama-3-Instruct (tokenizer_config.json), as published
QWEN2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
         "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
         "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
         "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
          "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
          "{% endif %}")
FAMILIES = {
    "qwen2": (QWEN2, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
              {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None}, "<|im_end|>\n"),
    "llama3": (LLAMA3, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                        "<|eot_id|>"], {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}, "<|eot_id|>"),
}
CONVERSATION = [{"role": "user", "content": "what is the cat number 3?"}, {"role": "assistant", "content": "the cat is 3."},
                {"role": "user", "content": "and the dog?"}, {"role": "assistant", "content": "the dog is 4."}]


def write_tokenizer(directory, family, corpus_dir):
  """A byte-level BPE tokenizer.json (trained here on the test corpus) with the family's special tokens, and a
  tokenizer_config.json with its chat template."""
  template, specials, config, _ = FAMILIES[family]
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                           initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator([p.read_text() for p in sorted(corpus_dir.glob("*.txt"))], trainer)
  os.makedirs(directory, exist_ok=True)
  tok.save(os.path.join(directory, "tokenizer.json"))
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump({**config, "chat_template": template}, f)
  return tokenizer_lib.load(str(directory))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_template_text_and_the_loss_on_assistant_spans(family, corpus_dir, tmp_path):
  tok = write_tokenizer(tmp_path / family, family, corpus_dir)
  template, _, config, turn_end = FAMILIES[family]
  env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
  render = lambda messages, gen=False: env.from_string(template).render(
      messages=messages, add_generation_prompt=gen, bos_token=config.get("bos_token") or "")
  ids, mask = chat.render(CONVERSATION, tok)
  assert tok.decode(ids) == render(CONVERSATION)
  # the loss: exactly each answer and the template's end of its turn
  spans, current = [], []
  for i, m in zip(ids, mask):
    if m:
      current.append(i)
    elif current:
      spans, current = spans + [tok.decode(current)], []
  spans += [tok.decode(current)] if current else []
  assert spans == [a["content"] + turn_end for a in CONVERSATION[1::2]]
  # a prompt ends with the generation prompt; prompt + answer = the conversation's ids
  prompt = chat.render_prompt(CONVERSATION[:3], tok)
  assert tok.decode(prompt) == render(CONVERSATION[:3], gen=True)
  answer, answer_mask = chat.render_answer(CONVERSATION[:3], CONVERSATION[3]["content"], tok)
  assert prompt + answer == ids and all(answer_mask)
  assert chat.stop_ids(tok)[0] == tok.eos_id and tok.token_id(turn_end.strip()) in chat.stop_ids(tok)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_transformers_renders_the_same_text_and_ids(family, corpus_dir, tmp_path):
  transformers = pytest.importorskip("transformers")  # the [hf] extra
  tok = write_tokenizer(tmp_path / family, family, corpus_dir)
  template, _, config, _ = FAMILIES[family]
  fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / family / "tokenizer.json"),
                                              chat_template=template, **{k: v for k, v in config.items() if v})
  assert fast.apply_chat_template(CONVERSATION, tokenize=False) == tok.render_chat(CONVERSATION)
  ids = fast.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
  assert list(ids) == chat.render(CONVERSATION, tok)[0]  # the spans tokenized apart: the same ids here


@pytest.mark.parametrize("family", ["qwen2", pytest.param("llama3", marks=pytest.mark.skipif(
    not os.environ.get("JAXLLM_SLOW_TESTS"), reason="the second family's run: JAXLLM_SLOW_TESTS=1 (CI's budget)"))])
def test_an_import_is_fine_tuned_with_its_tokenizer_and_exported_back(family, corpus_dir, qa_jsonl, tmp_path):
  """`jaxllm hf import` of a Qwen2-shaped (q/k/v biases, tied) or Llama-3-shaped (untied) model keeps
  tokenizer.json and the template; SFT renders the data with the template (the stop token of its samples: the
  family's end of turn); `jaxllm hf export` writes the same tokenizer files and the trained weights."""
  hf_dir = tmp_path / family
  tok = write_tokenizer(hf_dir, family, corpus_dir)
  qwen = family == "qwen2"
  cfg = model.ModelConfig(vocab_size=320, d_model=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
                          mlp_dim=64, qkv_bias=qwen, tie_embeddings=qwen)
  params = model.init(cfg, __import__("jax").random.key(0))
  hf.save(str(hf_dir), cfg, params, hf_config={"model_type": "qwen2" if qwen else "llama", "eos_token_id": tok.eos_id})
  imported = str(tmp_path / "imported")
  assert cli.main(["hf", "import", "--hf", str(hf_dir), "--out", imported]) == 0
  assert sorted(os.listdir(imported)) == ["checkpoints", "config.json", "tokenizer.json", "tokenizer_config.json"]

  run = str(tmp_path / "sft")
  c = sft_config(corpus_dir, qa_jsonl, imported, **{"train.steps": 4, "train.eval_every": 2, "train.seq_len": 96,
                                                   "train.num_samples": int(qwen), "train.checkpoint_every": 4,
                                                   "model.qkv_bias": qwen, "model.tie_embeddings": qwen,
                                                   "optimizer.learning_rate": 3e-3})
  train.run(c, run)
  rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
  losses = [r["eval/loss"] for r in rows if "eval/loss" in r]
  assert losses[-1] < losses[0], losses
  assert tokenizer_lib.load(run).sha256 == tok.sha256

  out = str(tmp_path / "exported")
  assert cli.main(["hf", "export", "--workdir", run, "--out", out]) == 0
  for name in ("tokenizer.json", "tokenizer_config.json"):
    assert json.load(open(os.path.join(out, name))) == json.load(open(os.path.join(hf_dir, name)))
  assert json.load(open(os.path.join(out, "config.json")))["model_type"] == ("qwen2" if qwen else "llama")
  run_cfg, trained, _ = runs.load_run(run)
  _, exported = hf.load(out, scan_layers=run_cfg.scan_layers)  # the SFT run loops over the layers (sft_config)
  for a, b in zip(__import__("jax").tree.leaves(exported), __import__("jax").tree.leaves(trained)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
