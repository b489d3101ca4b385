"""Writes torch zip checkpoints by hand (no torch): fixtures for tests and benchmarks.

The layout `torch.save` produces: `<name>/data.pkl` (a protocol 2 pickle whose tensors
are `torch._utils._rebuild_tensor_v2` calls on persistent-id storage records),
`<name>/data/<key>` (raw little-endian bytes, stored uncompressed at 64-byte aligned
offsets), `<name>/byteorder`, `<name>/.format_version`, `<name>/version`. The pickle is
emitted opcode by opcode, so tests can also splice in hostile opcodes (`Raw`).
"""

from __future__ import annotations

import dataclasses
import struct
import zipfile
from typing import Any, Callable

import ml_dtypes
import numpy as np

# numpy dtype -> torch storage class name.
_STORAGE_NAMES = {
    np.dtype(np.float32): 'FloatStorage', np.dtype(np.float16): 'HalfStorage',
    np.dtype(ml_dtypes.bfloat16): 'BFloat16Storage', np.dtype(np.float64): 'DoubleStorage',
    np.dtype(np.int64): 'LongStorage', np.dtype(np.int32): 'IntStorage',
    np.dtype(np.int16): 'ShortStorage', np.dtype(np.int8): 'CharStorage',
    np.dtype(np.uint8): 'ByteStorage', np.dtype(np.bool_): 'BoolStorage',
}
_ALIGN = 64


@dataclasses.dataclass
class View:
  """A tensor that is a strided view of a flat storage (for non-contiguous tensors)."""
  storage: np.ndarray                     # 1-D, the whole storage
  offset: int
  shape: tuple[int, ...]
  stride: tuple[int, ...]                 # in elements, as torch counts them
  storage_name: str | None = None         # override the storage class (e.g. a wrong dtype)
  numel: int | None = None                # override the element count in the record


@dataclasses.dataclass
class Lazy:
  """A contiguous tensor whose bytes are produced only when written (big fixtures)."""
  shape: tuple[int, ...]
  dtype: Any
  make: Callable[[], np.ndarray]


@dataclasses.dataclass
class Raw:
  """Pickle opcodes inserted verbatim where a value would go (must push one object)."""
  opcodes: bytes


def global_op(module: str, name: str) -> bytes:
  return b'c' + module.encode() + b'\n' + name.encode() + b'\n'


class _PickleWriter:
  """Emits protocol 2 opcodes for plain data and tensors; storages are collected."""

  def __init__(self):
    self.out = bytearray(b'\x80\x02')
    self.storages: list[tuple[str, Any]] = []   # (key, array or Lazy), in order

  def save(self, obj) -> None:
    o = self.out
    if isinstance(obj, Raw):
      o += obj.opcodes
    elif obj is None:
      o += b'N'
    elif isinstance(obj, bool):
      o += b'\x88' if obj else b'\x89'
    elif isinstance(obj, int):
      self._int(obj)
    elif isinstance(obj, float):
      o += b'G' + struct.pack('>d', obj)
    elif isinstance(obj, str):
      data = obj.encode('utf-8')
      o += b'X' + struct.pack('<I', len(data)) + data
    elif isinstance(obj, tuple):
      o += b'('
      for v in obj:
        self.save(v)
      o += b't'
    elif isinstance(obj, list):
      o += b']'
      for v in obj:
        self.save(v)
        o += b'a'
    elif isinstance(obj, dict):
      self._dict(obj, ordered=isinstance(obj, OrderedDict))
    elif isinstance(obj, (np.ndarray, np.generic, Lazy, View)):
      self._tensor(obj)
    else:
      raise TypeError(f'cannot write a {type(obj).__name__}')

  def _int(self, v: int) -> None:
    if -2**31 <= v < 2**31:
      self.out += b'J' + struct.pack('<i', v)
    else:
      data = v.to_bytes((v.bit_length() + 8) // 8, 'little', signed=True)
      self.out += b'\x8a' + bytes([len(data)]) + data

  def _dict(self, d: dict, ordered: bool = False) -> None:
    if ordered:
      self.out += global_op('collections', 'OrderedDict') + b')R'
    else:
      self.out += b'}'
    for k, v in d.items():
      self.save(k)
      self.save(v)
      self.out += b's'

  def _tensor(self, t) -> None:
    if isinstance(t, View):
      storage, offset, shape, stride = t.storage, t.offset, t.shape, t.stride
      name = t.storage_name or _STORAGE_NAMES[storage.dtype]
      numel = storage.size if t.numel is None else t.numel
    else:
      if not isinstance(t, Lazy):
        t = np.asarray(t)
      shape, offset = tuple(t.shape), 0
      stride = tuple(int(s) for s in _contiguous_strides(shape))
      storage, name = t, _STORAGE_NAMES[np.dtype(t.dtype)]
      numel = int(np.prod(shape, dtype=np.int64))
    key = str(len(self.storages))
    self.storages.append((key, storage))
    o = self.out
    o += global_op('torch._utils', '_rebuild_tensor_v2') + b'('
    o += b'('
    self.save('storage')
    o += global_op('torch', name)
    self.save(key)
    self.save('cpu')
    self.save(int(numel))
    o += b'tQ'   # TUPLE, BINPERSID
    self.save(int(offset))
    self.save(tuple(int(s) for s in shape))
    self.save(tuple(int(s) for s in stride))
    o += b'\x89' + global_op('collections', 'OrderedDict') + b')R'   # requires_grad, hooks
    o += b'tR'


def _contiguous_strides(shape):
  strides, acc = [], 1
  for n in reversed(shape):
    strides.append(acc)
    acc *= max(int(n), 1)
  return tuple(reversed(strides))


class OrderedDict(dict):
  """A dict written as `collections.OrderedDict` (how torch state dicts are pickled)."""


def pickle_bytes(obj) -> tuple[bytes, list[tuple[str, Any]]]:
  """(data.pkl bytes, [(storage key, array)]) for `obj`."""
  w = _PickleWriter()
  w.save(obj)
  w.out += b'.'
  return bytes(w.out), w.storages


def _aligned_info(zf: zipfile.ZipFile, name: str) -> zipfile.ZipInfo:
  """A STORED entry whose data starts at a multiple of 64 bytes (as torch writes them):
  the local header's extra field is padded."""
  info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
  info.compress_type = zipfile.ZIP_STORED
  start = zf.fp.tell() + 30 + len(name.encode())
  pad = (-(start + 4)) % _ALIGN
  info.extra = struct.pack('<HH', 0x4246, pad) + b'Z' * pad
  return info


def _write_storage(zf: zipfile.ZipFile, name: str, storage) -> None:
  info = _aligned_info(zf, name)
  if isinstance(storage, Lazy):
    info.file_size = int(np.prod(storage.shape, dtype=np.int64)) * np.dtype(storage.dtype).itemsize
    data = np.ascontiguousarray(storage.make(), dtype=storage.dtype)
    assert data.shape == tuple(storage.shape), (data.shape, storage.shape)
  else:
    data = np.ascontiguousarray(storage)
    info.file_size = data.nbytes
  with zf.open(info, 'w') as f:
    f.write(memoryview(data.reshape(-1).view(np.uint8)))


def save(path: str, obj, archive_name: str = 'archive', pickle_data: bytes | None = None,
         skip_storages: tuple[str, ...] = ()) -> None:
  """Writes `obj` (dicts, OrderedDicts, lists, tuples, scalars, str, numpy arrays, View,
  Lazy, Raw) as a torch zip checkpoint. `pickle_data` replaces the pickle (hostile
  tests); `skip_storages` leaves those data entries out (corrupt-file tests)."""
  data, storages = pickle_bytes(obj)
  if pickle_data is not None:
    data = pickle_data
  with zipfile.ZipFile(path, 'w', zipfile.ZIP_STORED) as zf:
    zf.writestr(f'{archive_name}/data.pkl', data)
    zf.writestr(f'{archive_name}/.format_version', '1')
    zf.writestr(f'{archive_name}/.storage_alignment', str(_ALIGN))
    zf.writestr(f'{archive_name}/byteorder', 'little')
    for key, storage in storages:
      if key not in skip_storages:
        _write_storage(zf, f'{archive_name}/data/{key}', storage)
    zf.writestr(f'{archive_name}/version', '3\n')
