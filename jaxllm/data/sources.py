"""Document sources: random-access sequences of strings, one per document.

`documents(spec, split)` returns a `FileDocuments` that lists where each document lives
(file id, byte offset) and reads it lazily in `__getitem__`, so it can be a grain
MapDataset source, be pickled, and be read from several threads.

  spec "stdlib": the running Python's standard library `.py` files (no download needed),
                 one document per file; split by file with crc32 of the relative path.
  otherwise:     comma-separated globs (`**` allowed) of .txt/.text/.md files (one document
                 per file) and .jsonl files (one document per line, its "text" field);
                 split by document with crc32 of f"{file name}:{line}" (line 0 for whole files).

The split is split.py's. validation_fraction = 0 means no validation (an empty validation split). When
the split above leaves a side empty (a corpus of a few files), whole-file documents are cut into
paragraphs (at the first line after blank lines; the pieces of a file concatenate back to it) and
split by crc32 of f"{file name}:{first line of the paragraph}" (the relative path for "stdlib");
if a side is still empty, asking for it raises DataError saying what to change. The returned
documents' `split_info` says which split was used.
"""

import array
import glob
import io
import json
import os
import sysconfig
from collections.abc import Iterator, Sequence

import numpy as np

from jaxllm.data import split as split_lib

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
  of a JSONL line whose "text" field is the document, or, where `lengths` is given and
  lengths[i] >= 0, of a piece of text of lengths[i] bytes (a paragraph of a text file).
  `split_info` describes the train/validation split the documents were selected by.
  """

  def __init__(self, paths: Sequence[str], file_ids: np.ndarray, offsets: np.ndarray,
               lengths: np.ndarray | None = None, split_info: str = ""):
    self.paths = list(paths)
    self.file_ids = np.asarray(file_ids, np.int32)
    self.offsets = np.asarray(offsets, np.int64)
    self.lengths = None if lengths is None else np.asarray(lengths, np.int64)
    self.split_info = split_info

  def __len__(self) -> int:
    return len(self.offsets)

  def __getitem__(self, i: int) -> str:
    if not -len(self) <= i < len(self):
      raise IndexError(f"document {i} out of range for {len(self)} documents")
    path, offset = self.paths[self.file_ids[i]], int(self.offsets[i])
    if offset == WHOLE_FILE:
      with open(path, encoding="utf-8") as f:
        return f.read()
    if self.lengths is not None and self.lengths[i] >= 0:
      with open(path, "rb") as f:
        f.seek(offset)
        return f.read(int(self.lengths[i])).decode("utf-8")
    with open(path, "rb") as f:
      f.seek(offset)
      return json.loads(f.readline())["text"]

  def select(self, indices) -> "FileDocuments":
    return FileDocuments(self.paths, self.file_ids[indices], self.offsets[indices],
                         None if self.lengths is None else self.lengths[indices], self.split_info)


def documents(spec: str, split: str, *, validation_fraction: float = 0.02, bad: BadRecords | None = None
              ) -> FileDocuments:
  """The documents of `split` ("train" or "validation") described by `spec` (see module doc), with the
  `split_info` of the split. Bad lines or files raise DataError, or with `bad` are skipped and counted there."""
  split_lib.check_split(split)
  split_lib.check_fraction(validation_fraction)
  if spec == "stdlib":
    paths, names, file_ids, offsets, buckets = _index_stdlib()
  else:
    paths, file_ids, offsets, buckets = _index_globs(spec, bad)
    names = [os.path.basename(p) for p in paths]
  docs = FileDocuments(paths, file_ids, offsets)
  mask = split_lib.in_validation(buckets, validation_fraction)
  whole_files = bool((docs.offsets == WHOLE_FILE).all())
  how, unit = ("by file", "files") if whole_files else ("by document", "documents")
  if validation_fraction == 0:
    how = "no validation (validation_fraction=0)"
  info = f"{how}: {_describe(docs.file_ids, mask, whole_files)}"
  side = split_lib.empty_side(mask, validation_fraction)
  if side is not None:  # too few files (or documents): try paragraphs
    pieces, piece_buckets = _paragraphs(docs, names, buckets)
    piece_mask = split_lib.in_validation(piece_buckets, validation_fraction)
    if split_lib.empty_side(piece_mask, validation_fraction) is None:
      held_out = int(mask.sum())
      info = (f"by paragraph (too few {unit} for validation_fraction={validation_fraction}: "
              f"{len(mask) - held_out:,} train, {held_out:,} validation): "
              f"{_describe(pieces.file_ids, piece_mask, False)}")
      docs, mask = pieces, piece_mask
    else:
      tried = f", {len(pieces):,} documents by paragraph" if len(pieces) > len(mask) else ""
      info += f" (validation_fraction={validation_fraction} leaves {side} empty{', also by paragraph' * bool(tried)})"
      if split == side:
        raise DataError(f"spec {spec!r} has no documents in split {side!r} (validation_fraction="
                        f"{validation_fraction}, {len(mask):,} {unit}{tried}): {split_lib.fix(side)}")
  out = docs.select(split_lib.select(mask, split))
  out.split_info = info
  return out


def _describe(file_ids: np.ndarray, validation_mask: np.ndarray, whole_files: bool) -> str:
  """How many documents (of how many files) each side of a split has."""
  sides = []
  for name, keep in (("train", ~validation_mask), ("validation", validation_mask)):
    if whole_files:
      sides.append(f"{int(keep.sum()):,} files {name}")
    else:
      files = len(np.unique(file_ids[keep]))
      sides.append(f"{int(keep.sum()):,} documents ({files:,} files) {name}")
  return ", ".join(sides)


def _paragraphs(docs: FileDocuments, names: Sequence[str], buckets: np.ndarray
                ) -> tuple[FileDocuments, np.ndarray]:
  """`docs` with each whole-file document cut into paragraphs, and the split bucket of every document: for a
  paragraph, that of f"{names[file id]}:{line}" with its first line; a JSONL document keeps its bucket (that of
  f"{file name}:{line}" too). A paragraph runs from a non-blank line that starts the file or follows a blank
  line up to the next such line, and the first also holds any blank lines opening the file, so the pieces
  of a file concatenate back to it exactly."""
  file_ids, offsets, lengths, out = [], [], [], []
  for file_id, offset, bucket in zip(docs.file_ids.tolist(), docs.offsets.tolist(), np.asarray(buckets).tolist()):
    if offset != WHOLE_FILE:  # a JSONL line: one document already
      file_ids.append(file_id), offsets.append(offset), lengths.append(-1), out.append(bucket)
      continue
    with open(docs.paths[file_id], "rb") as f:
      data = f.read()
    starts, position, blank_before = [], 0, True  # (byte offset, 1-based line) of each paragraph
    for number, line in enumerate(io.BytesIO(data), 1):
      blank = not line.strip()
      if blank_before and not blank:
        starts.append((position, number))
      blank_before = blank
      position += len(line)
    starts = starts or [(0, 1)]  # a blank file (strict reading keeps it): one piece
    starts[0] = (0, starts[0][1])
    ends = [start for start, _ in starts[1:]] + [len(data)]
    for (start, number), end in zip(starts, ends):
      file_ids.append(file_id), offsets.append(start), lengths.append(end - start)
      out.append(split_lib.bucket(f"{names[file_id]}:{number}"))
  pieces = FileDocuments(docs.paths, np.asarray(file_ids, np.int32), np.asarray(offsets, np.int64),
                         np.asarray(lengths, np.int64))
  return pieces, np.asarray(out, np.int64)


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
  """Whole-file documents for the non-empty, utf-8 stdlib files, bucketed by relative path: (paths, relative
  paths, file ids, offsets, buckets)."""
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
  return paths, kept, file_ids, offsets, split_lib.buckets(kept)


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
  (1-based line `line_numbers[i]`), parsed and passed through `convert` in __getitem__. Picklable.
  `split_info` describes the train/validation split the records were selected by ("" before one)."""

  def __init__(self, paths, file_ids, offsets, line_numbers, convert, split_info: str = ""):
    self.paths, self.convert = list(paths), convert
    self.file_ids = np.asarray(file_ids, np.int32)
    self.offsets = np.asarray(offsets, np.int64)
    self.line_numbers = np.asarray(line_numbers, np.int64)
    self.split_info = split_info

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

  def select(self, indices, split_info: str = "") -> "JsonlRecords":
    return JsonlRecords(self.paths, self.file_ids[indices], self.offsets[indices], self.line_numbers[indices],
                        self.convert, split_info)


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
      buckets.append(split_lib.bucket(f"{os.path.basename(path)}:{line_number}"))  # same split wherever it lives
    if len(offsets) == count and bad is None:
      raise DataError(f"{path}: empty file (no documents)")
  if not len(offsets):
    raise DataError(f"{spec!r}: no usable documents in {len(paths)} files (bad ones: {bad and bad.counts()})")
  return paths, *(np.frombuffer(a, np.dtype(a.typecode)) for a in (file_ids, offsets, buckets))


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
