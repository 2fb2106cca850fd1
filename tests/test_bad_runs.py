"""Bad configs that only show up against files (data, checkpoints, tokenizers): each stops `train.run` before any
step is compiled, within 10 s, with a message naming the config key or the file at fault, and writes no metrics
or checkpoint. (Pure config errors, without files, are in test_config.py.)"""

import os
import time

import pytest

from jaxllm import train
from jaxllm.data import sources
from jaxllm.data.tokenizer import train_tokenizer
from tests.conftest import set_fields as _set, sft_config, tiny_config
from tests.test_lora_dpo import dpo_config


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tok") / "other.model")
  train_tokenizer([f"unrelated text number {i}" for i in range(200)], vocab_size=300).save(path)
  return path


CASES = {
    # name: (config overrides given the fixtures, exception, message regex)
    "lora target matching nothing": (
        lambda f: _set(sft_config(f["corpus"], f["qa"], f["pt"]), **{"lora.enabled": True,
                                                                      "lora.targets": "attn/qq/kernel$"}),
        ValueError, r"lora\.targets: 'attn/qq/kernel\$'.*matches no parameter"),
    "lora rank 0": (
        lambda f: _set(sft_config(f["corpus"], f["qa"], f["pt"]), **{"lora.enabled": True, "lora.rank": 0}),
        ValueError, r"lora\.rank"),
    "lora without a base": (
        lambda f: _set(tiny_config(f["corpus"]), **{"lora.enabled": True}), ValueError, r"lora\.enabled.*init_from"),
    "dpo on text files (no preference data)": (
        lambda f: dpo_config(f["corpus"], f["corpus"] / "*.txt", f["pt"], use_lora=False),
        sources.DataError, r"doc\d+\.txt: unsupported file type"),
    "dpo on SFT records (no chosen/rejected)": (
        lambda f: dpo_config(f["corpus"], f["qa"], f["pt"], use_lora=True),
        sources.DataError, r"qa\.jsonl:1: no 'chosen' field"),
    "dpo without init_from": (
        lambda f: dpo_config(f["corpus"], f["qa"], "", use_lora=False), ValueError, r"init_from: DPO starts"),
    "init_from missing": (
        lambda f: _set(tiny_config(f["corpus"]), init_from=str(f["tmp"] / "no_such_run")), ValueError,
        r"init_from: no such run"),
    "init_from a directory that is not a run": (
        lambda f: _set(tiny_config(f["corpus"]), init_from=str(f["corpus"])), FileNotFoundError,
        r"init_from: .* is neither a run directory"),
    "tokenizer differs from init_from's": (
        lambda f: _set(sft_config(f["corpus"], f["qa"], f["pt"]), **{"data.tokenizer.path": f["tok"]}),
        ValueError, r"data\.tokenizer\.path: the tokenizer .*other\.model.* differs"),
    "tokenizer file missing": (
        lambda f: _set(tiny_config(f["corpus"]), **{"data.tokenizer.path": str(f["tmp"] / "nope.model")}),
        ValueError, r"data\.tokenizer\.path: no file"),
    "vocab larger than the embedding": (
        lambda f: _set(tiny_config(f["corpus"]), **{"model.vocab_size": 100}), ValueError,
        r"model\.vocab_size: 100 is smaller than the tokenizer's vocabulary"),
    "model shape differs from init_from's": (
        lambda f: _set(sft_config(f["corpus"], f["qa"], f["pt"]), **{"model.d_model": 48}), ValueError,
        r"model\.d_model: 48 differs"),
    "data glob matching nothing": (
        lambda f: _set(tiny_config(f["corpus"]), **{"data.sources": str(f["tmp"] / "none" / "*.txt")}),
        sources.DataError, r"glob .* matches no file"),
    "unsupported data file": (
        lambda f: _set(tiny_config(f["corpus"]), **{"data.sources": str(f["tmp"] / "data.csv")}),
        sources.DataError, r"data\.csv: unsupported file type"),
    "bad-record policy unknown": (
        lambda f: _set(tiny_config(f["corpus"]), **{"data.on_bad_record": "ignore"}), ValueError,
        r"data\.on_bad_record"),
    "negative spike threshold": (
        lambda f: _set(tiny_config(f["corpus"]), **{"train.spike_k": -1.0}), ValueError, r"train\.spike_k"),
    "validation split smaller than a batch": (
        lambda f: _set(tiny_config(f["corpus"]), **{"data.validation_fraction": 0.013, "train.batch_size": 64}),
        ValueError, r"data\.validation_fraction"),
    "sft prompt loss weight above 1": (
        lambda f: _set(sft_config(f["corpus"], f["qa"], f["pt"]), **{"data.prompt_loss_weight": 2.0}),
        ValueError, r"data\.prompt_loss_weight"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_run_fails_fast_naming_the_key(name, corpus_dir, qa_jsonl, pretrained, other_tokenizer, tmp_path):
  (tmp_path / "data.csv").write_text("a,b\n")
  make, error, message = CASES[name]
  config = make({"corpus": corpus_dir, "qa": qa_jsonl, "pt": pretrained, "tok": other_tokenizer, "tmp": tmp_path})
  workdir = tmp_path / "run"
  start = time.time()
  with pytest.raises(error, match=message):
    train.run(config, str(workdir))
  assert time.time() - start < 10, name
  assert not (workdir / "metrics.jsonl").exists()
  assert not (workdir / "checkpoints").exists() or not os.listdir(workdir / "checkpoints")
