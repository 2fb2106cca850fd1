"""A Hugging Face `tokenizer.json` tokenizer (the `tokenizers` library; no torch) behind the interface of
jaxllm.data.tokenizer.Tokenizer, with the model's chat template from `tokenizer_config.json` (or
`chat_template.jinja`) rendered as transformers renders it (jinja2, sandboxed, trim_blocks and lstrip_blocks).

Llama 3, Qwen2 and most current models ship this format rather than a sentencepiece `tokenizer.model`. The
special tokens come from tokenizer_config.json: eos_token (required, else "<|endoftext|>"), bos_token (absent
for Qwen2: EOS stands in where jaxllm needs a first token), pad_token (absent: EOS fills padding, which the model
never sees, and decode keeps it). `encode` adds no special tokens (the template writes the BOS it wants).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable

FILES = ("tokenizer.json", "tokenizer_config.json")


def _content(token) -> str | None:
  return token.get("content") if isinstance(token, dict) else token


class HFTokenizer:
  """Text <-> token ids of a tokenizer.json; `render_chat` applies its chat template."""

  def __init__(self, tokenizer_json: bytes, config_json: bytes = b"{}", chat_template: str | None = None):
    import tokenizers  # the [hf] extra (and [test]); sentencepiece runs need nothing of it
    self._json, self._config_json = tokenizer_json, config_json
    self._tok = tokenizers.Tokenizer.from_str(tokenizer_json.decode())
    self.config = json.loads(config_json or b"{}")
    template = chat_template or self.config.get("chat_template")
    if isinstance(template, list):  # [{"name", "template"}, ...]: the default one
      template = {t.get("name"): t.get("template") for t in template}.get("default")
    self.chat_template: str | None = template
    self._template = None
    eos = _content(self.config.get("eos_token")) or "<|endoftext|>"
    self.eos_id = self.token_id(eos)
    bos, pad = _content(self.config.get("bos_token")), _content(self.config.get("pad_token"))
    self.bos_id = self.token_id(bos) if bos else self.eos_id
    self.pad_id = self.token_id(pad) if pad else self.eos_id  # what padding holds (never seen by the model)
    self._skip = {self.pad_id} if pad else set()  # decode drops a pad token, not EOS standing in for one

  @classmethod
  def from_dir(cls, directory: str) -> "HFTokenizer":
    read = lambda name: open(os.path.join(directory, name), "rb").read() if os.path.exists(
        os.path.join(directory, name)) else None
    jinja = read("chat_template.jinja")  # where transformers >= 4.43 saves it
    return cls(read("tokenizer.json"), read("tokenizer_config.json") or b"{}", jinja.decode() if jinja else None)

  def __getstate__(self):  # picklable, e.g. for grain worker processes
    return self._json, self._config_json, self.chat_template

  def __setstate__(self, state):
    self.__init__(*state)

  def encode(self, text: str) -> list[int]:
    """Token ids of `text` (special tokens written in it become their ids), without BOS or EOS."""
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`, special tokens included; a pad token (if the config names one) and ids outside
    [0, vocab_size) are skipped."""
    ids = [int(i) for i in ids]
    return self._tok.decode([i for i in ids if 0 <= i < self.vocab_size and i not in self._skip],
                            skip_special_tokens=False)

  def token_id(self, piece: str) -> int:
    token = self._tok.token_to_id(piece)
    if token is None:
      raise KeyError(f"piece {piece!r} is not in the tokenizer vocabulary")
    return token

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  @property
  def model_bytes(self) -> bytes:
    """What identifies the tokenizer: its tokenizer.json, and its config with the template (as JSON with sorted
    keys, so that a copy written by `save_to` is the same tokenizer)."""
    config = dict(self.config, chat_template=self.chat_template)
    return self._json + b"\0" + json.dumps(config, sort_keys=True).encode()

  @property
  def sha256(self) -> str:
    return hashlib.sha256(self.model_bytes).hexdigest()

  def save_to(self, directory: str) -> list[str]:
    """Writes tokenizer.json, tokenizer_config.json (with the chat template) into `directory`."""
    config = dict(self.config)
    if self.chat_template:
      config["chat_template"] = self.chat_template
    for name, data in (("tokenizer.json", self._json), ("tokenizer_config.json", json.dumps(config, indent=2).encode())):
      with open(os.path.join(directory, name), "wb") as f:
        f.write(data)
    return list(FILES)

  def render_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The chat template's text of `messages` (as transformers' apply_chat_template(tokenize=False))."""
    if not self.chat_template:
      raise ValueError("the tokenizer has no chat_template (tokenizer_config.json)")
    if self._template is None:
      from jinja2.sandbox import ImmutableSandboxedEnvironment

      def raise_exception(message):
        raise ValueError(f"chat template: {message}")

      env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
      env.globals["raise_exception"] = raise_exception
      self._template = env.from_string(self.chat_template)
    specials = {k: _content(self.config.get(k)) or "" for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, **specials)
