"""Document sources: random-access sequences of strings, one per document.

`documents(spec, split)` returns a `FileDocuments` that lists where each document lives
(file id, byte offset) and reads it lazily in `__getitem__`, so it can be a grain
MapDataset source, be pickled, and be read from several threads.

  spec "stdlib": the running Python's standard library `.py` files (no download needed),
                 one document per file; split by file with crc32 of the relative path.
  otherwise:     comma-separated globs (`**` allowed) of .txt/.text/.md files (one document
                 per file) and .jsonl files (one document per line, its "text" field);
                 split by document with crc32 of f"{file name}:{line}" (line 0 for whole files).
"""

import array
import glob
import json
import os
import sysconfig
import zlib
from collections.abc import Iterator, Sequence

import numpy as np

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl",)
STDLIB_EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test",
                        "__pycache__"}
WHOLE_FILE = -1  # offset meaning "the document is the whole file"


class DataError(ValueError):
  """A problem with the input data: names the file (and 1-based line) at fault."""


class EmptyRecord(ValueError):
  """A well-formed record with nothing to learn from (an empty text, answer or reply)."""


BAD_CATEGORIES = ("invalid_utf8", "malformed_json", "missing_field", "empty")


class BadRecords:
  """Lenient reading (data.on_bad_record="skip"): a bad line is skipped and remembered here by category
  (BAD_CATEGORIES) instead of stopping the run. Strict reading passes no BadRecords: the first bad line raises
  DataError with its file and line. Lines are keyed by (file, line), so reading both splits counts each once."""

  def __init__(self):
    self.bad: dict[tuple[str, int], tuple[str, str]] = {}  # (path, line) -> (category, message)
    self.lines: dict[str, int] = {}                          # path -> records read (good and bad)

  def add(self, path: str, line: int, category: str, message: str):
    assert category in BAD_CATEGORIES, category
    self.bad[(path, line)] = (category, message)

  def counts(self) -> dict[str, int]:
    out = dict.fromkeys(BAD_CATEGORIES, 0)
    for category, _ in self.bad.values():
      out[category] += 1
    return out

  def check(self, max_fraction: float):
    """Raises DataError when more than `max_fraction` of the records read are bad (data.max_bad_fraction)."""
    total = sum(self.lines.values())
    if total and len(self.bad) > max_fraction * total:
      examples = "\n".join(f"  {p}:{line}: {c}: {m}" for (p, line), (c, m) in list(self.bad.items())[:5])
      raise DataError(f"{len(self.bad)} of {total} records are bad ({self.counts()}), more than "
                      f"data.max_bad_fraction={max_fraction}; the first:\n{examples}")


def _fail_or_skip(bad: BadRecords | None, path: str, line: int, category: str, message: str):
  if bad is None:
    raise DataError(f"{path}:{line}: {message}" if line else f"{path}: {message}")
  bad.add(path, line, category, message)


class FileDocuments(Sequence):
  """Documents stored in files: document i is file `paths[file_ids[i]]` at byte `offsets[i]`.

  An offset of WHOLE_FILE means the whole file is the document; any other offset is the start
  of a JSONL line whose "text" field is the document.
  """

  def __init__(self, paths: Sequence[str], file_ids: np.ndarray, offsets: np.ndarray):
    self.paths = list(paths)
    self.file_ids = np.asarray(file_ids, np.int32)
    self.offsets = np.asarray(offsets, np.int64)

  def __len__(self) -> int:
    return len(self.offsets)

  def __getitem__(self, i: int) -> str:
    if not -len(self) <= i < len(self):
      raise IndexError(f"document {i} out of range for {len(self)} documents")
    path, offset = self.paths[self.file_ids[i]], int(self.offsets[i])
    if offset == WHOLE_FILE:
      with open(path, encoding="utf-8") as f:
        return f.read()
    with open(path, "rb") as f:
      f.seek(offset)
      return json.loads(f.readline())["text"]


def documents(spec: str, split: str, *, validation_fraction: float = 0.02, bad: BadRecords | None = None
              ) -> FileDocuments:
  """The documents of `split` ("train" or "validation") described by `spec` (see module doc). Bad lines or
  files raise DataError, or with `bad` are skipped and counted there."""
  if split not in ("train", "validation"):
    raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
  if spec == "stdlib":
    paths, file_ids, offsets, buckets = _index_stdlib()
  else:
    paths, file_ids, offsets, buckets = _index_globs(spec, bad)
  in_validation = buckets < validation_fraction * 10_000
  keep = in_validation if split == "validation" else ~in_validation
  if not keep.any():
    raise DataError(f"spec {spec!r} has no documents in split {split!r} "
                    f"(validation_fraction={validation_fraction})")
  return FileDocuments(paths, file_ids[keep], offsets[keep])


def stdlib_files() -> tuple[str, list[str]]:
  """(root, sorted relative paths) of the stdlib .py files, without tests and site-packages."""
  root = sysconfig.get_paths()["stdlib"]
  relative_paths = []
  for directory, subdirs, files in os.walk(root):
    subdirs[:] = [d for d in subdirs if d not in STDLIB_EXCLUDED_DIRS]
    for name in files:
      if name.endswith(".py"):
        relative_paths.append(os.path.relpath(os.path.join(directory, name), root))
  return root, sorted(p.replace(os.sep, "/") for p in relative_paths)


def _index_stdlib():
  """Whole-file documents for the non-empty, utf-8 stdlib files, bucketed by relative path."""
  root, relative_paths = stdlib_files()
  kept = []
  for rel in relative_paths:
    try:
      with open(os.path.join(root, rel), encoding="utf-8") as f:
        if f.read().strip():
          kept.append(rel)
    except UnicodeDecodeError:
      continue
  paths = [os.path.join(root, rel) for rel in kept]
  file_ids = np.arange(len(paths), dtype=np.int32)
  offsets = np.full(len(paths), WHOLE_FILE, np.int64)
  return paths, file_ids, offsets, np.array([_bucket(rel) for rel in kept], np.int32)


def match_globs(spec: str) -> list[str]:
  """The sorted files matched by the comma-separated globs (`**` allowed) in `spec`; a glob matching none is
  an error."""
  paths = set()
  for pattern in (p.strip() for p in spec.split(",") if p.strip()):
    matched = [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
    if not matched:
      raise DataError(f"glob {pattern!r} matches no file")
    paths.update(matched)
  return sorted(paths)


class JsonlRecords(Sequence):
  """Records of JSONL files, read lazily: record i is the line at byte `offsets[i]` of `paths[file_ids[i]]`
  (1-based line `line_numbers[i]`), parsed and passed through `convert` in __getitem__. Picklable."""

  def __init__(self, paths, file_ids, offsets, line_numbers, convert):
    self.paths, self.convert = list(paths), convert
    self.file_ids = np.asarray(file_ids, np.int32)
    self.offsets = np.asarray(offsets, np.int64)
    self.line_numbers = np.asarray(line_numbers, np.int64)

  def __len__(self) -> int:
    return len(self.offsets)

  def __getitem__(self, i: int):
    if not -len(self) <= i < len(self):
      raise IndexError(f"record {i} out of range for {len(self)} records")
    with open(self.paths[self.file_ids[i]], "rb") as f:
      f.seek(int(self.offsets[i]))
      return self.convert(json.loads(f.readline()))

  def split_keys(self) -> list[str]:
    """f"{file name}:{line}" of each record: what the train/validation split hashes."""
    return [f"{os.path.basename(self.paths[f])}:{line}" for f, line in zip(self.file_ids, self.line_numbers)]

  def select(self, indices) -> "JsonlRecords":
    return JsonlRecords(self.paths, self.file_ids[indices], self.offsets[indices], self.line_numbers[indices],
                        self.convert)


def jsonl_records(spec: str, convert, *, what: str, bad: BadRecords | None = None) -> JsonlRecords:
  """Every non-blank line of the .jsonl files of `spec`, each validated now by `convert` (a ValueError becomes
  a DataError naming the file and line, or with `bad` is skipped and counted: EmptyRecord as "empty", any other
  as "missing_field"); `what` names the records in errors ("conversations")."""
  file_ids, offsets, line_numbers = array.array("i"), array.array("q"), array.array("q")
  paths = match_globs(spec)
  for file_id, path in enumerate(paths):
    if not path.endswith(JSONL_SUFFIXES):
      raise DataError(f"{path}: unsupported file type ({what} are read from .jsonl files)")
    count = len(offsets)
    for offset, line_number, record in _jsonl_lines(path, bad):
      try:
        convert(record)
      except ValueError as e:
        _fail_or_skip(bad, path, line_number, "empty" if isinstance(e, EmptyRecord) else "missing_field", str(e))
        continue
      file_ids.append(file_id)
      offsets.append(offset)
      line_numbers.append(line_number)
    if len(offsets) == count:
      raise DataError(f"{path}: empty file (no {what})")
  return JsonlRecords(paths, file_ids, offsets, line_numbers, convert)


def _jsonl_lines(path: str, bad: BadRecords | None = None):
  """(byte offset, 1-based line number, parsed JSON) of each non-blank line. A line that is not UTF-8 or not
  JSON raises DataError, or with `bad` is skipped and counted."""
  offset, read = 0, 0
  with open(path, "rb") as f:
    for line_number, line in enumerate(f, 1):
      if line.strip():
        read += 1
        try:
          text = line.decode("utf-8")
        except UnicodeDecodeError as e:
          _fail_or_skip(bad, path, line_number, "invalid_utf8", f"not valid UTF-8 ({e})")
        else:
          try:
            yield offset, line_number, json.loads(text)
          except ValueError as e:
            _fail_or_skip(bad, path, line_number, "malformed_json", f"invalid JSON ({e})")
      offset += len(line)
  if bad is not None:
    bad.lines[path] = read


def _index_globs(spec: str, bad: BadRecords | None = None):
  """Documents of the files matched by the comma-separated globs in `spec`."""
  paths = match_globs(spec)
  file_ids, offsets, buckets = array.array("i"), array.array("q"), array.array("i")
  for file_id, path in enumerate(paths):
    if path.endswith(JSONL_SUFFIXES):
      entries = list(_index_jsonl(path, bad))
    elif path.endswith(TEXT_SUFFIXES):
      entries = [(WHOLE_FILE, 0)] if _check_text_file(path, bad) else []
    else:
      raise DataError(f"{path}: unsupported file type (use {TEXT_SUFFIXES + JSONL_SUFFIXES})")
    count = len(offsets)
    for offset, line_number in entries:
      file_ids.append(file_id)
      offsets.append(offset)
      buckets.append(_bucket(f"{os.path.basename(path)}:{line_number}"))  # same split wherever the corpus lives
    if len(offsets) == count and bad is None:
      raise DataError(f"{path}: empty file (no documents)")
  if not len(offsets):
    raise DataError(f"{spec!r}: no usable documents in {len(paths)} files (bad ones: {bad and bad.counts()})")
  return paths, *(np.frombuffer(a, np.dtype(a.typecode)) for a in (file_ids, offsets, buckets))


def _bucket(key: str) -> int:
  """A document's split bucket in [0, 10000): it is in validation iff bucket < fraction * 10000."""
  return zlib.crc32(key.encode()) % 10_000


def _check_text_file(path: str, bad: BadRecords | None = None) -> bool:
  """True if the file is a usable document: utf-8 (else DataError, or with `bad` counted) and not blank."""
  with open(path, "rb") as f:
    data = f.read()
  if bad is not None:
    bad.lines[path] = 1
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    _fail_or_skip(bad, path, 0, "invalid_utf8", f"not valid utf-8 ({e})")
    return False
  if bad is not None and not text.strip():
    bad.add(path, 0, "empty", "blank file")
  return bool(text.strip()) if bad is not None else len(data) > 0


def _index_jsonl(path: str, bad: BadRecords | None = None) -> Iterator[tuple[int, int]]:
  """Yields (byte offset, 1-based line number) of each usable line: a JSON object with a non-blank string "text".
  Others raise DataError, or with `bad` are skipped and counted."""
  for offset, line_number, record in _jsonl_lines(path, bad):
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
      _fail_or_skip(bad, path, line_number, "missing_field", "no string 'text' field")
    elif not record["text"].strip():
      _fail_or_skip(bad, path, line_number, "empty", "empty 'text' (an empty document)")
    else:
      yield offset, line_number
