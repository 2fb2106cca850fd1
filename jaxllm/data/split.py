"""The train/validation split, shared by every source (documents, conversations, preference pairs).

Each record has a key that names it wherever the corpus lives (a relative path, f"{file name}:{line}", a
conversation's JSON); its bucket is crc32(key as UTF-8) % 10_000, and it is in validation iff
bucket < validation_fraction * 10_000. So the split is deterministic, stable when records are added or removed,
and copies of a record (same key) never straddle it. validation_fraction = 0 means no validation.
"""

import zlib
from collections.abc import Iterable

import numpy as np

BUCKETS = 10_000
SPLITS = ("train", "validation")


def bucket(key: str) -> int:
  """The split bucket of a record key, in [0, BUCKETS)."""
  return zlib.crc32(key.encode()) % BUCKETS


def buckets(keys: Iterable[str]) -> np.ndarray:
  """[N] int64 buckets of `keys`."""
  return np.array([bucket(k) for k in keys], np.int64)


def in_validation(bucket_values, validation_fraction: float) -> np.ndarray:
  """[N] bool: which records (given their buckets) are in validation."""
  return np.asarray(bucket_values) < validation_fraction * BUCKETS


def indices(keys: Iterable[str], split: str, validation_fraction: float) -> np.ndarray:
  """The increasing indices of the records of `split` ("train" or "validation"), given every record's key."""
  check_split(split)
  return select(in_validation(buckets(keys), validation_fraction), split)


def select(validation_mask: np.ndarray, split: str) -> np.ndarray:
  """The increasing indices of `split` given the [N] bool mask of the validation records."""
  return np.flatnonzero(validation_mask if split == "validation" else ~np.asarray(validation_mask))


def check_split(split: str):
  if split not in SPLITS:
    raise ValueError(f"split must be 'train' or 'validation', got {split!r}")


def check_fraction(validation_fraction: float):
  if not 0.0 <= validation_fraction <= 1.0:
    raise ValueError(f"validation_fraction must be in [0, 1] (0 = no validation), got {validation_fraction}")


def empty_side(validation_mask: np.ndarray, validation_fraction: float) -> str | None:
  """The side ("train" or "validation") that the split leaves empty, or None. An empty validation with
  validation_fraction = 0 is what was asked for: None."""
  mask = np.asarray(validation_mask, bool)
  if mask.all():
    return "train"
  if validation_fraction > 0 and not mask.any():
    return "validation"
  return None


def fix(side: str) -> str:
  """What to change in the config when `side` of the split is empty."""
  if side == "validation":
    return "raise data.validation_fraction, or set it to 0 for no validation"
  return "lower data.validation_fraction"


def describe(n_train: int, n_validation: int, what: str) -> str:
  """"1,234 {what} train, 56 {what} validation"."""
  return f"{n_train:,} {what} train, {n_validation:,} {what} validation"


class SplitList(list):
  """A list of records with the `split_info` of the split it was selected by (a plain list otherwise)."""

  def __init__(self, items=(), split_info: str = ""):
    super().__init__(items)
    self.split_info = split_info
