"""Safetensors files with numpy (no torch): the one reader, with its checks, and the header.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON
(`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, the
offsets relative to the data), then the data. A file from elsewhere is untrusted input:
`read_header` checks, before any tensor is read, what the safetensors library checks: a
bounded header, known dtypes, a byte span per tensor that agrees with its shape and dtype,
spans that neither overlap nor leave holes, and data that ends where the file ends (a
truncated file fails here, naming the first tensor it cuts). Errors name the file and the
tensor. `read` reads a tensor (or rows of it) whole, or memory-maps it from MAP_BYTES on.
"""

from __future__ import annotations

import dataclasses
import json
import math
import mmap
import os

import ml_dtypes
import numpy as np

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's limit
MAP_BYTES = 1 << 20  # tensors (regions) from this size on are memory-mapped, not read
DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
          "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32,
          "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
CODES = {np.dtype(v): k for k, v in DTYPES.items()}


@dataclasses.dataclass(frozen=True)
class Tensor:
  """Where a tensor lies: `start`, `stop` are absolute offsets in `file`."""
  file: str
  name: str
  dtype: np.dtype
  shape: tuple
  start: int
  stop: int


def _unique_keys(pairs):
  keys = [k for k, _ in pairs]
  if len(set(keys)) != len(keys):
    raise ValueError(f"key {next(k for k in keys if keys.count(k) > 1)!r} appears twice")
  return dict(pairs)


def _is_int(x):
  return isinstance(x, int) and not isinstance(x, bool)


def _tensor(file, name, entry, data_start, data_size) -> Tensor:
  where = f"tensor {name!r} in {file}"
  if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
    raise ValueError(f"{where}: header entry {entry!r} is not "
                     "{'dtype', 'shape', 'data_offsets'}")
  if entry["dtype"] not in DTYPES:
    raise ValueError(f"{where}: dtype {entry['dtype']!r} is not supported "
                     f"(supported: {', '.join(DTYPES)})")
  dtype, shape, offsets = np.dtype(DTYPES[entry["dtype"]]), entry["shape"], entry["data_offsets"]
  if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
    raise ValueError(f"{where}: shape {shape!r} is not a list of sizes")
  if (not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_int, offsets))
      or not 0 <= offsets[0] <= offsets[1]):
    raise ValueError(f"{where}: data_offsets {offsets!r} are not [begin, end] with "
                     "0 <= begin <= end")
  want = math.prod(shape) * dtype.itemsize
  if offsets[1] - offsets[0] != want:
    raise ValueError(f"{where}: shape {shape} of {entry['dtype']} is {want} bytes, but its "
                     f"data_offsets {offsets} span {offsets[1] - offsets[0]} bytes")
  if offsets[1] > data_size:
    raise ValueError(f"{where}: its data_offsets {offsets} lie past the end of the data "
                     f"({data_size} bytes): the file is truncated or corrupt")
  return Tensor(file, name, dtype, tuple(shape), data_start + offsets[0],
                data_start + offsets[1])


def read_header(file) -> dict[str, Tensor]:
  """name -> Tensor of every tensor of a safetensors file, checked (module docstring)."""
  file = os.fspath(file)
  size = os.path.getsize(file)
  with open(file, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise ValueError(f"{file}: not a safetensors file (only {size} bytes, less than the "
                       "8-byte header length)")
    n = int.from_bytes(head, "little")
    if n > MAX_HEADER_BYTES:
      raise ValueError(f"{file}: header length {n} bytes is over the limit of "
                       f"{MAX_HEADER_BYTES}: not a safetensors file, or corrupt")
    if 8 + n > size:
      raise ValueError(f"{file}: header length {n} bytes runs past the end of the file "
                       f"({size} bytes): the file is truncated or corrupt")
    text = f.read(n)
  try:
    header = json.loads(text, object_pairs_hook=_unique_keys)
  except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
    raise ValueError(f"{file}: header is not valid JSON ({e})") from e
  if not isinstance(header, dict):
    raise ValueError(f"{file}: header is a JSON {type(header).__name__}, not an object")
  header.pop("__metadata__", None)
  data_start, data_size = 8 + n, size - 8 - n
  tensors = {name: _tensor(file, name, entry, data_start, data_size)
             for name, entry in header.items()}
  end, last = data_start, None
  for t in sorted(tensors.values(), key=lambda t: (t.start, t.stop)):
    if t.start < end:
      raise ValueError(f"tensor {t.name!r} in {file}: its bytes [{t.start - data_start}, "
                       f"{t.stop - data_start}) overlap those of tensor {last!r}")
    if t.start > end:
      raise ValueError(f"tensor {t.name!r} in {file}: {t.start - end} bytes before it belong "
                       "to no tensor (a hole in the data)")
    end, last = t.stop, t.name
  if end != size:
    raise ValueError(f"{file}: {size - end} bytes after the last tensor's data belong to no "
                     "tensor")
  return tensors


def read(t: Tensor, rows=None, copy=True) -> np.ndarray:
  """Tensor `t` (or its rows [start, stop)): a plain read, or from MAP_BYTES on a read-only
  memory map with pages filled up front, copied unless `copy` is False."""
  shape, start, stop = list(t.shape), t.start, t.stop
  if rows is not None:
    if not (shape and 0 <= rows[0] <= rows[1] <= shape[0]):
      raise ValueError(f"rows {tuple(rows)} of tensor {t.name!r} in {t.file} of shape "
                       f"{t.shape}")
    row = (t.stop - t.start) // shape[0] if shape[0] else 0
    start, stop, shape[0] = t.start + rows[0] * row, t.start + rows[1] * row, rows[1] - rows[0]
  nbytes = stop - start
  with open(t.file, "rb") as f:
    size = os.fstat(f.fileno()).st_size
    if stop > size:
      raise ValueError(f"tensor {t.name!r} in {t.file}: its data ends at byte {stop}, past the "
                       f"end of the file ({size} bytes): was it truncated after it was opened?")
    if nbytes < MAP_BYTES:
      f.seek(start)
      buf = bytearray(nbytes)
      got = f.readinto(buf)
      if got != nbytes:
        raise ValueError(f"tensor {t.name!r} in {t.file}: read {got} of its {nbytes} bytes")
      return np.frombuffer(buf, t.dtype).reshape(shape)
    base = start - start % mmap.ALLOCATIONGRANULARITY
    m = mmap.mmap(f.fileno(), stop - base, prot=mmap.PROT_READ,
                  flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0), offset=base)
  a = np.frombuffer(m, t.dtype, nbytes // t.dtype.itemsize, start - base).reshape(shape)
  return np.array(a) if copy else a


def header_bytes(tensors) -> bytes:
  """The length and JSON header of a file holding `tensors` ((name, dtype, shape) in the
  order of their data), padded to 8 bytes as the safetensors library does."""
  header, offset = {"__metadata__": {"format": "pt"}}, 0
  for name, dtype, shape in tensors:
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    header[name] = {"dtype": CODES[np.dtype(dtype)], "shape": list(shape),
                    "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  text = json.dumps(header, separators=(",", ":")).encode()
  text += b" " * (-len(text) % 8)
  return len(text).to_bytes(8, "little") + text
