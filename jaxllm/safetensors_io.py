"""The safetensors format, read and written tensor by tensor with numpy (no torch, no extra dependency).

A file is: 8 bytes (little-endian uint64) N, then N bytes of JSON {name: {"dtype", "shape", "data_offsets":
[begin, end]}, "__metadata__": {str: str}}, padded with spaces to a multiple of 8, then the tensors' raw
little-endian bytes, back to back, offsets counted from the end of the header. Reading memory-maps the file, so a
tensor is read from disk only when it is used; writing lays out the header from shapes alone, then writes each
tensor as its producer makes it, so at most one tensor is ever held in memory besides the caller's.

A checkpoint of several files ("shards") has an index, `<prefix>.safetensors.index.json`:
{"metadata": {"total_size": bytes}, "weight_map": {name: file}} (Hugging Face's layout).
"""

from __future__ import annotations

import json
import os
import re
import struct
from typing import Callable, Iterable, NamedTuple

import ml_dtypes
import numpy as np

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}


class Entry(NamedTuple):
  """A tensor to write: its name, shape, dtype, and a function that makes it (called once, when written)."""
  name: str
  shape: tuple
  dtype: np.dtype
  make: Callable[[], np.ndarray]

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def read_header(path: str) -> tuple[dict, int]:
  """(header without __metadata__, byte offset of the data) of one .safetensors file."""
  with open(path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(n))
  header.pop("__metadata__", None)
  return header, 8 + n


class Reader:
  """The tensors of one or more .safetensors files, by name; `get` returns a read-only memory-mapped array."""

  def __init__(self, files: Iterable[str]):
    self._where: dict[str, tuple[str, dict, int]] = {}
    self._maps: dict[str, np.memmap] = {}
    for path in files:
      header, start = read_header(path)
      for name, info in header.items():
        if info["dtype"] not in DTYPES:
          raise ValueError(f"{path}: tensor {name} has dtype {info['dtype']}, not one of {sorted(DTYPES)}")
        self._where[name] = (path, info, start)

  def keys(self) -> list[str]:
    return list(self._where)

  def __contains__(self, name: str) -> bool:
    return name in self._where

  def shape(self, name: str) -> tuple:
    return tuple(self._where[name][1]["shape"])

  def get(self, name: str) -> np.ndarray:
    path, info, start = self._where[name]
    if path not in self._maps:
      self._maps[path] = np.memmap(path, dtype=np.uint8, mode="r")
    begin, end = info["data_offsets"]
    raw = self._maps[path][start + begin:start + end]
    return raw.view(DTYPES[info["dtype"]]).reshape(info["shape"])


def write(path: str, entries: list[Entry], metadata: dict | None = None) -> int:
  """Writes `entries` to one file in order; returns the bytes of tensor data written."""
  header, offset = {}, 0
  for e in entries:
    header[e.name] = {"dtype": NAMES[np.dtype(e.dtype)], "shape": list(e.shape),
                      "data_offsets": [offset, offset + e.nbytes]}
    offset += e.nbytes
  if metadata:
    header = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}, **header}
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)) + blob)
    for e in entries:
      x = np.asarray(e.make(), dtype=np.dtype(e.dtype).newbyteorder("<"), order="C")
      if x.shape != tuple(e.shape):
        raise ValueError(f"{path}: tensor {e.name} has shape {x.shape}, expected {tuple(e.shape)}")
      f.write(x.reshape(-1).view(np.uint8).data)
  return offset


def parse_size(size) -> int:
  """Bytes of "2GB" (10^9), "500MiB" (2^20), or an int."""
  if isinstance(size, (int, float)):
    return int(size)
  m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?)B?\s*", str(size), re.IGNORECASE)
  if not m:
    raise ValueError(f"max_shard_size: {size!r} is not a size like 2GB, 500MB or 1000000")
  base = 1024 if m.group(3) else 1000
  return int(float(m.group(1)) * base ** "_KMGT".index((m.group(2) or "_").upper()))


def write_sharded(directory: str, entries: list[Entry], *, max_shard_size="5GB", prefix: str = "model",
                  metadata: dict | None = None) -> list[str]:
  """Writes `entries` as `<prefix>.safetensors`, or, past `max_shard_size` bytes, as shards
  `<prefix>-0000i-of-0000n.safetensors` (consecutive entries, each shard at most max_shard_size unless one
  tensor alone is larger) plus `<prefix>.safetensors.index.json`. Returns the files written."""
  limit = parse_size(max_shard_size)
  shards: list[list[Entry]] = [[]]
  for e in entries:
    if shards[-1] and sum(x.nbytes for x in shards[-1]) + e.nbytes > limit:
      shards.append([])
    shards[-1].append(e)
  if len(shards) == 1:
    names = [f"{prefix}.safetensors"]
  else:
    names = [f"{prefix}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  total = sum(write(os.path.join(directory, n), s, metadata) for n, s in zip(names, shards))
  if len(shards) > 1:
    index = {"metadata": {"total_size": total}, "weight_map": {e.name: n for n, s in zip(names, shards) for e in s}}
    with open(os.path.join(directory, f"{prefix}.safetensors.index.json"), "w") as f:
      json.dump(index, f, indent=2)
  return names


def files_of(directory: str, prefix: str = "model") -> list[str]:
  """The .safetensors files of a checkpoint in `directory`: those its index names, else `<prefix>.safetensors`."""
  index = os.path.join(directory, f"{prefix}.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      names = dict.fromkeys(json.load(f)["weight_map"].values())
    return [os.path.join(directory, n) for n in names]
  single = os.path.join(directory, f"{prefix}.safetensors")
  if os.path.exists(single):
    return [single]
  found = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors"))
  raise FileNotFoundError(f"{directory}: no {prefix}.safetensors nor {prefix}.safetensors.index.json"
                          + (f" (found {found})" if found else ""))
