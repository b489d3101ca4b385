"""Reads `.safetensors` files with numpy alone, the header validated before anything is
mapped: a size bounded by the file, strict JSON of the documented shape, known dtypes,
and data ranges that tile the data section exactly. Every failure is one
`SafetensorsFileError` (a ValueError) line naming the file and, where one is at fault,
the tensor. Tensors are memory-mapped and copied out only when looked up.

Layout: an 8-byte little-endian header length N, N bytes of JSON
`{name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, "__metadata__":
{str: str}}`, then the data section (offsets are relative to its start).
"""

from __future__ import annotations

import json
import os
import struct
from typing import Iterator, Mapping

import ml_dtypes
import numpy as np


class SafetensorsFileError(ValueError):
  """The file is not a safetensors file this reader reads."""


DTYPES = {
    'F64': np.dtype(np.float64), 'F32': np.dtype(np.float32), 'F16': np.dtype(np.float16),
    'BF16': np.dtype(ml_dtypes.bfloat16), 'I64': np.dtype(np.int64),
    'I32': np.dtype(np.int32), 'I16': np.dtype(np.int16), 'I8': np.dtype(np.int8),
    'U64': np.dtype(np.uint64), 'U32': np.dtype(np.uint32), 'U16': np.dtype(np.uint16),
    'U8': np.dtype(np.uint8), 'BOOL': np.dtype(np.bool_),
}
MAX_HEADER_BYTES = 100 * 2 ** 20


class _Entry:
  __slots__ = ('dtype', 'shape', 'begin', 'end')

  def __init__(self, dtype, shape, begin, end):
    self.dtype, self.shape, self.begin, self.end = dtype, shape, begin, end


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _parse_header(path: str, raw: bytes) -> dict[str, _Entry]:
  def fail(msg):
    raise SafetensorsFileError(f'safetensors {path}: {msg}')
  try:
    header = json.loads(raw.decode('utf-8'))
  except (ValueError, RecursionError) as e:
    fail(f'header is not valid JSON ({type(e).__name__})')
  if not isinstance(header, dict):
    fail(f'header is a JSON {type(header).__name__}, not an object')
  entries = {}
  for name, spec in header.items():
    shown = repr(name[:100])
    if name == '__metadata__':
      if not (isinstance(spec, dict) and all(isinstance(v, str) for v in spec.values())):
        fail('__metadata__ must map strings to strings')
      continue
    if not isinstance(spec, dict) or set(spec) != {'dtype', 'shape', 'data_offsets'}:
      fail(f'tensor {shown}: expected exactly dtype, shape and data_offsets')
    dtype, shape, offsets = spec['dtype'], spec['shape'], spec['data_offsets']
    if dtype not in DTYPES:
      fail(f'tensor {shown}: dtype {str(dtype)[:20]!r} is not read (known: '
           f'{", ".join(DTYPES)})')
    if not (isinstance(shape, list) and len(shape) <= 8 and all(map(_is_int, shape))):
      fail(f'tensor {shown}: shape must be a list of at most 8 non-negative integers')
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_int, offsets))
            and offsets[0] <= offsets[1]):
      fail(f'tensor {shown}: data_offsets must be [begin, end] with begin <= end')
    nbytes = int(np.prod(shape, dtype=object)) * DTYPES[dtype].itemsize
    if offsets[1] - offsets[0] != nbytes:
      fail(f'tensor {shown}: {dtype} {shape} needs {nbytes} bytes, data_offsets give '
           f'{offsets[1] - offsets[0]}')
    entries[name] = _Entry(DTYPES[dtype], tuple(shape), offsets[0], offsets[1])
  return entries


class SafetensorsFile(Mapping):
  """name -> numpy array (a fresh copy, read when looked up)."""

  def __init__(self, path: str):
    self.path = os.fspath(path)
    size = os.path.getsize(self.path)
    with open(self.path, 'rb') as f:
      head = f.read(8)
      if len(head) != 8:
        raise SafetensorsFileError(f'safetensors {self.path}: shorter than its 8-byte '
                                   'header length')
      (n,) = struct.unpack('<Q', head)
      if n > min(MAX_HEADER_BYTES, size - 8):
        raise SafetensorsFileError(f'safetensors {self.path}: header length {n} exceeds '
                                   f'the file ({size} bytes) or {MAX_HEADER_BYTES}')
      raw = f.read(n)
    self._entries = _parse_header(self.path, raw)
    self._data_start = 8 + n
    data_size = size - self._data_start
    spans = sorted((e.begin, e.end, k) for k, e in self._entries.items())
    pos = 0
    for begin, end, name in spans:
      if begin != pos:
        raise SafetensorsFileError(
            f'safetensors {self.path}: tensor {name[:100]!r} starts at {begin}, expected '
            f'{pos} (data ranges must tile the data section without gaps or overlaps)')
      pos = end
    if pos != data_size:
      raise SafetensorsFileError(f'safetensors {self.path}: the tensors cover {pos} bytes '
                                 f'of a {data_size}-byte data section (truncated or '
                                 'padded file)')

  def shape(self, key: str) -> tuple[int, ...]:
    return self._entries[key].shape

  def __getitem__(self, key: str) -> np.ndarray:
    e = self._entries[key]
    count = int(np.prod(e.shape, dtype=np.int64))
    if count == 0:
      return np.empty(e.shape, e.dtype)
    view = np.memmap(self.path, dtype=e.dtype, mode='r', offset=self._data_start + e.begin,
                     shape=(count,))
    return np.array(view).reshape(e.shape)

  def __iter__(self) -> Iterator[str]:
    return iter(self._entries)

  def __len__(self) -> int:
    return len(self._entries)


def load(path: str) -> SafetensorsFile:
  """The tensors of a safetensors file (validated; each read when looked up)."""
  return SafetensorsFile(path)
