"""A sentencepiece tokenizer that round-trips any text exactly, and its in-memory trainer.

Ids: pad=0, unk=1, bos=2, eos=3, then the special tokens (<|system|>, ...), then 256 byte pieces
(byte fallback: text never seen in training, e.g. Chinese, still encodes and decodes exactly),
then learned pieces.
"""

import hashlib
import io
import os
import re
from collections.abc import Iterable, Sequence

import numpy as np
import sentencepiece as spm

from jaxllm.data.sources import DataError

DEFAULT_SPECIAL_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
MIN_CHARACTER_COVERAGE = 0.98  # sentencepiece refuses less


class Tokenizer:
  """Text <-> token ids. Build with `from_file`, `from_bytes` or `train_tokenizer`."""

  def __init__(self, processor: spm.SentencePieceProcessor):
    self._sp = processor

  @classmethod
  def from_bytes(cls, model_proto: bytes) -> "Tokenizer":
    return cls(spm.SentencePieceProcessor(model_proto=model_proto))

  @classmethod
  def from_file(cls, path: str) -> "Tokenizer":
    with open(path, "rb") as f:
      return cls.from_bytes(f.read())

  def __getstate__(self):  # picklable, e.g. for grain worker processes
    return self.model_bytes

  def __setstate__(self, model_proto: bytes):
    self.__init__(spm.SentencePieceProcessor(model_proto=model_proto))

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without BOS or EOS."""
    return self._sp.encode(text)

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`; pad and ids outside [0, vocab_size) are skipped."""
    ids = [int(i) for i in ids]
    return self._sp.decode([i for i in ids if 0 <= i < self.vocab_size and i != self.pad_id])

  def token_id(self, piece: str) -> int:
    """The id of a single piece (e.g. a special token); KeyError if it is not in the vocab."""
    token = self._sp.piece_to_id(piece)
    if token == self._sp.unk_id() and piece != self._sp.id_to_piece(token):
      raise KeyError(f"piece {piece!r} is not in the tokenizer vocabulary")
    return token

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  @property
  def pad_id(self) -> int:
    return self._sp.pad_id()

  @property
  def bos_id(self) -> int:
    return self._sp.bos_id()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  @property
  def model_bytes(self) -> bytes:
    """The serialized sentencepiece ModelProto."""
    return self._sp.serialized_model_proto()

  @property
  def sha256(self) -> str:
    return hashlib.sha256(self.model_bytes).hexdigest()

  def save(self, path: str) -> None:
    with open(path, "wb") as f:
      f.write(self.model_bytes)

  chat_template = None  # the built-in template of jaxllm/data/chat.py applies

  def save_to(self, directory: str) -> list[str]:
    """Writes tokenizer.model into `directory`."""
    self.save(os.path.join(directory, SENTENCEPIECE_FILE))
    return [SENTENCEPIECE_FILE]


SENTENCEPIECE_FILE = "tokenizer.model"


def find(directory: str) -> str | None:
  """The tokenizer file of a directory (a run, a Hugging Face model): tokenizer.model (sentencepiece) or
  tokenizer.json (Hugging Face), or None."""
  for name in (SENTENCEPIECE_FILE, "tokenizer.json"):
    if os.path.exists(os.path.join(directory, name)):
      return os.path.join(directory, name)
  return None


def load(path: str):
  """A tokenizer from a file (a sentencepiece .model, or a tokenizer.json with its directory's
  tokenizer_config.json) or from a directory holding one of them (`find`)."""
  if os.path.isdir(path):
    if (found := find(path)) is None:
      raise FileNotFoundError(f"{path}: no {SENTENCEPIECE_FILE} or tokenizer.json")
    path = found
  if path.endswith(".json"):
    from jaxllm.data.hf_tokenizer import HFTokenizer  # the `tokenizers` library, only when one is used
    return HFTokenizer.from_dir(os.path.dirname(os.path.abspath(path)))
  return Tokenizer.from_file(path)


def train_tokenizer(
    texts: Iterable[str],
    *,
    vocab_size: int,
    model_type: str = "bpe",
    special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
    max_sentences: int = 300_000,
    seed: int = 0,
    character_coverage: float = 0.9995,
) -> Tokenizer:
  """Trains a byte-fallback sentencepiece model in memory; same inputs give the same bytes.

  Sentencepiece trains on lines, so the non-empty lines of `texts` are the training sentences;
  if there are more than `max_sentences`, a random subset (drawn with `seed`) is used.
  `character_coverage` (in [0.98, 1], sentencepiece's range) is the share of the corpus's characters that get
  a piece of their own; the rarest others are left to byte fallback. A vocabulary too small for those characters (a corpus in a
  script of many characters, e.g. Chinese) raises DataError naming the smallest vocab_size that fits, and one
  larger than the corpus yields, the largest.
  """
  if not MIN_CHARACTER_COVERAGE <= character_coverage <= 1.0:
    raise DataError(f"data.tokenizer.character_coverage must be in [{MIN_CHARACTER_COVERAGE}, 1] (sentencepiece's "
                    f"range), got {character_coverage}")
  lines = [line for text in texts for line in text.split("\n") if line]
  if len(lines) > max_sentences:
    keep = np.random.default_rng(seed).choice(len(lines), max_sentences, replace=False)
    lines = [lines[i] for i in np.sort(keep)]
  model = io.BytesIO()
  try:
    _train(lines, model, vocab_size, model_type, special_tokens, character_coverage)
  except RuntimeError as e:
    if (error := _explain(e, vocab_size, character_coverage)) is None:
      raise
    raise error from None
  return Tokenizer.from_bytes(model.getvalue())


def _train(lines, model, vocab_size, model_type, special_tokens, character_coverage):
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines),
      model_writer=model,
      vocab_size=vocab_size,
      model_type=model_type,
      user_defined_symbols=list(special_tokens),
      pad_id=0, unk_id=1, bos_id=2, eos_id=3,
      byte_fallback=True,
      # Exact round trip: no normalization, keep every space, tab and leading space.
      normalization_rule_name="identity",
      remove_extra_whitespaces=False,
      add_dummy_prefix=False,
      allow_whitespace_only_pieces=True,
      split_digits=True,
      character_coverage=character_coverage,  # rare characters go to byte fallback
      max_sentence_length=16_384,  # bytes; longer lines are skipped by the trainer
      num_threads=1,  # the model depends on the thread count: 1 makes it machine-independent
      minloglevel=2,
  )


def _explain(error: RuntimeError, vocab_size: int, character_coverage: float) -> DataError | None:
  """Sentencepiece's errors about the vocabulary size (too small for the corpus's characters, or larger than
  the corpus yields) as a one-line DataError; None for any other error."""
  message = str(error)
  if m := re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", message):
    return DataError(
        f"data.tokenizer.vocab_size={vocab_size} is too small for the corpus: its characters at "
        f"data.tokenizer.character_coverage={character_coverage} need data.tokenizer.vocab_size >= {m[2]} (the "
        f"special tokens and 256 byte pieces included); raise it, or lower character_coverage (down to "
        f"{MIN_CHARACTER_COVERAGE}) to leave more rare characters to byte fallback")
  if m := re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", message):
    return DataError(f"data.tokenizer.vocab_size={vocab_size} is too large for the corpus: it yields at most "
                     f"{m[2]} pieces; set data.tokenizer.vocab_size <= {m[2]} (or train on more text)")
  return None
