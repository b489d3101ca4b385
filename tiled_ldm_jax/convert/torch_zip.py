"""Reads PyTorch zip checkpoints (`torch.save` since 1.6) without torch, running nothing.

A torch zip file holds `<name>/data.pkl`, a pickle of the saved object whose tensors are
`torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` calls, and one
`<name>/data/<key>` entry of raw bytes per storage, named by the pickle's persistent ids.

A pickle is a program: unpickling calls whatever globals it names. This reader's
unpickler resolves a global only from a fixed table of inert stand-ins written here
(a tensor record, storage dtype markers, a dict for `OrderedDict`); any other global is
refused with `CheckpointError` before anything is called, and nothing is imported. So a
file can describe data, never run code.

Tensors come back as `Tensor` records that read their bytes only when asked
(`np.asarray(t)`), from a memory map of the storage entry (torch stores entries
uncompressed), so a caller converting one tensor at a time holds one tensor at a time.
"""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import struct
import zipfile
import zlib
from typing import Any, Iterator, Mapping

import ml_dtypes
import numpy as np


class CheckpointError(ValueError):
  """The file is not a torch zip checkpoint this reader can read safely."""


# Bounds on what a file may make this reader allocate or walk, far above any real
# checkpoint (a full-size DiffInfinite `model-N.pt` pickle is a few MB and nests 4 deep).
MAX_PICKLE_BYTES = 64 * 2 ** 20     # the inflated data.pkl
MAX_PICKLE_DEPTH = 64               # containers inside containers
MAX_TENSOR_ELEMENTS = 2 ** 36       # elements of one tensor view
MAX_INFLATION = 64                  # inflated / compressed size of a deflated entry
_METHODS = {zipfile.ZIP_STORED: 'stored', zipfile.ZIP_DEFLATED: 'deflate'}


# torch storage class name -> numpy dtype of its elements.
STORAGE_DTYPES: dict[str, np.dtype] = {
    'FloatStorage': np.dtype(np.float32),
    'HalfStorage': np.dtype(np.float16),
    'BFloat16Storage': np.dtype(ml_dtypes.bfloat16),
    'DoubleStorage': np.dtype(np.float64),
    'LongStorage': np.dtype(np.int64),
    'IntStorage': np.dtype(np.int32),
    'ShortStorage': np.dtype(np.int16),
    'CharStorage': np.dtype(np.int8),
    'ByteStorage': np.dtype(np.uint8),
    'BoolStorage': np.dtype(np.bool_),
    'UntypedStorage': np.dtype(np.uint8),    # raw bytes
}


# ----------------------------------------------------------------------------- stand-ins
#
# Every object the pickle can name is one of these. None of them imports, evaluates or
# calls anything taken from the file, and none lets the pickle set arbitrary attributes
# (BUILD calls __setstate__, which is defined to refuse or to keep plain data only).


class _StorageType:
  """Stands for `torch.FloatStorage` etc. in a persistent id: only carries a dtype."""
  __slots__ = ('name', 'dtype')

  def __init__(self, name: str, dtype: np.dtype):
    self.name, self.dtype = name, dtype

  def __setstate__(self, state):
    raise pickle.UnpicklingError(f'cannot set state on storage type {self.name}')

  def __repr__(self):
    return f'torch.{self.name}'


class _Storage:
  """One `data/<key>` entry: where its bytes lie in the file and how to read them."""
  __slots__ = ('path', 'key', 'dtype', 'numel', 'offset', 'member', 'compressed', 'crc',
               'verified')

  def __init__(self, path, key, dtype, numel, offset, member, compressed, crc):
    self.path, self.key, self.dtype, self.numel = path, key, dtype, numel
    self.offset, self.member, self.compressed = offset, member, compressed
    self.crc, self.verified = crc, False

  def __setstate__(self, state):
    raise pickle.UnpicklingError('cannot set state on a storage')

  def array(self) -> np.ndarray:
    """The whole storage as a flat read-only array (a memory map where stored)."""
    if self.numel == 0:
      return np.empty((0,), self.dtype)
    if self.compressed:   # not what torch writes; read (and inflate) it into memory
      try:   # zipfile checks the CRC at the end of the entry
        with zipfile.ZipFile(self.path) as zf:
          data = zf.read(self.member)
      except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
        raise CheckpointError(f'checkpoint {self.path}: storage data/{self.key} is '
                              f'corrupt ({e})') from None
      return np.frombuffer(data, self.dtype)
    out = np.memmap(self.path, dtype=self.dtype, mode='r', offset=self.offset,
                    shape=(self.numel,))
    if not self.verified:   # once per storage: the bytes are the ones the zip declares
      raw = out.view(np.uint8)
      crc = 0
      for start in range(0, raw.size, 1 << 24):
        crc = zlib.crc32(raw[start:start + (1 << 24)], crc)
      if crc != self.crc:
        raise CheckpointError(f'checkpoint {self.path}: storage data/{self.key} fails its '
                              'CRC check (corrupt or truncated file)')
      self.verified = True
    return out


class Tensor:
  """A tensor of the checkpoint, read from its storage only when converted to an array."""
  __slots__ = ('storage', 'storage_offset', 'shape', 'stride')

  def __init__(self, storage: _Storage, storage_offset: int, shape: tuple[int, ...],
               stride: tuple[int, ...]):
    self.storage, self.storage_offset = storage, storage_offset
    self.shape, self.stride = shape, stride

  @property
  def dtype(self) -> np.dtype:
    return self.storage.dtype

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64))

  @property
  def nbytes(self) -> int:
    return self.size * self.dtype.itemsize

  def __setstate__(self, state):
    raise pickle.UnpicklingError('cannot set state on a tensor')

  def __repr__(self):
    return f'Tensor(shape={self.shape}, dtype={self.dtype}, key={self.storage.key!r})'

  def numpy(self, dtype=None) -> np.ndarray:
    """A new C-contiguous array (of `dtype`, default the stored one); the file is only
    mapped while it is copied, so the caller holds nothing but this array."""
    if self.size == 0:
      return np.empty(self.shape, dtype or self.dtype)
    flat = self.storage.array()
    item = self.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        flat[self.storage_offset:], shape=self.shape,
        strides=tuple(s * item for s in self.stride), writeable=False)
    return np.array(view, dtype=dtype or self.dtype, order='C')

  def __array__(self, dtype=None, copy=None):
    del copy   # always a fresh array
    return self.numpy(dtype)


def _check_view(storage: _Storage, offset: int, shape, stride) -> None:
  """Refuses a view that would read outside its storage (as_strided does not check)."""
  ok = (isinstance(offset, int) and offset >= 0 and isinstance(shape, tuple)
        and isinstance(stride, tuple) and len(shape) == len(stride)
        and all(isinstance(v, int) and v >= 0 for v in shape + stride))
  if not ok:
    raise pickle.UnpicklingError(
        f'bad tensor view: offset {offset!r}, size {shape!r}, stride {stride!r}')
  if 0 in shape:
    return
  numel = 1
  for n in shape:
    numel *= n
  if numel > MAX_TENSOR_ELEMENTS:
    raise pickle.UnpicklingError(f'tensor view of {numel} elements (size {shape[:8]}) on '
                                 f'storage data/{storage.key}: too large to be a weight')
  last = offset + sum((n - 1) * s for n, s in zip(shape, stride))
  if last >= storage.numel:
    raise pickle.UnpicklingError(
        f'tensor view (offset {offset}, size {shape}, stride {stride}) reads element '
        f'{last} of storage data/{storage.key} which has {storage.numel}')


class _StandIn:
  """A stand-in callable: BUILD on it is refused (a plain function would take the
  pickle's state into its `__dict__`, for the rest of the process)."""
  __slots__ = ('fn',)

  def __init__(self, fn):
    self.fn = fn

  def __call__(self, *args, **kwargs):
    return self.fn(*args, **kwargs)

  def __setstate__(self, state):
    raise pickle.UnpicklingError(f'cannot set state on {self.fn.__name__}')


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False,
                    backward_hooks=None, metadata=None):
  """Stands for `torch._utils._rebuild_tensor_v2`: records the view, reads nothing."""
  del requires_grad, backward_hooks, metadata   # training-time state, not data
  if not isinstance(storage, _Storage):
    raise pickle.UnpicklingError(f'tensor storage is a {type(storage).__name__}, not a '
                                 'storage record')
  size, stride = tuple(size), tuple(stride)
  _check_view(storage, storage_offset, size, stride)
  return Tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
  """Stands for `torch._utils._rebuild_parameter`: an nn.Parameter is its tensor."""
  del requires_grad, backward_hooks
  if not isinstance(data, Tensor):
    raise pickle.UnpicklingError(f'parameter data is a {type(data).__name__}, not a tensor')
  return data


class _OrderedDict(dict):
  """Stands for `collections.OrderedDict` (dicts keep order). torch attaches a
  `_metadata` dict to state dicts through BUILD; it is kept as plain data, nothing else."""

  def __setstate__(self, state):
    if isinstance(state, tuple) and len(state) == 2:   # (dict state, slot state)
      state = state[0] or state[1]
    if state is not None and not isinstance(state, dict):
      raise pickle.UnpicklingError(f'OrderedDict state is a {type(state).__name__}')
    self.metadata = state


class _TorchVersion(str):
  """Stands for `torch.torch_version.TorchVersion` (a str subclass in torch)."""

  def __setstate__(self, state):
    raise pickle.UnpicklingError('cannot set state on a version string')


_GLOBALS: dict[tuple[str, str], Any] = {
    ('torch._utils', '_rebuild_tensor_v2'): _StandIn(_rebuild_tensor),
    ('torch._utils', '_rebuild_parameter'): _StandIn(_rebuild_parameter),
    ('collections', 'OrderedDict'): _OrderedDict,
    ('torch.torch_version', 'TorchVersion'): _TorchVersion,
}
for _name, _dtype in STORAGE_DTYPES.items():
  _GLOBALS[('torch', _name)] = _StorageType(_name, _dtype)
_GLOBALS[('torch.storage', 'UntypedStorage')] = _GLOBALS[('torch', 'UntypedStorage')]


# ----------------------------------------------------------------------------- zip layout


def _data_offset(f, info: zipfile.ZipInfo) -> int:
  """Where a member's bytes start: after its local header's name and extra field (which
  may differ from the central directory's copy, so read them from the local header)."""
  f.seek(info.header_offset)
  header = f.read(30)
  if len(header) != 30 or header[:4] != b'PK\x03\x04':
    raise CheckpointError(f'bad local header for {info.filename}')
  name_len, extra_len = struct.unpack('<HH', header[26:30])
  return info.header_offset + 30 + name_len + extra_len


class _Archive:
  """The zip's directory: the pickle and where each storage entry lies."""

  def __init__(self, path: str):
    self.path = path
    self.file_size = os.path.getsize(path)
    with open(path, 'rb') as f:
      head = f.read(4)
    if head[:4] != b'PK\x03\x04':
      raise CheckpointError(_not_zip_message(path, head))
    try:
      zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
      raise CheckpointError(f'not a readable zip (truncated or corrupt: {e})') from None
    with zf:
      self.start_dir = zf.start_dir
      infos = zf.infolist()
      self.members = {i.filename: i for i in infos}
      if len(self.members) != len(infos):
        dup = sorted({i.filename for i in infos if sum(j.filename == i.filename
                                                        for j in infos) > 1})
        raise CheckpointError(f'the zip names an entry more than once: {_show(dup[0])}')
      pickles = [n for n in self.members if n.count('/') == 1 and n.endswith('/data.pkl')]
      if len(pickles) != 1:
        what = ('a TorchScript archive, not a saved state dict'
                if any(n.endswith('/constants.pkl') for n in self.members)
                else 'no <name>/data.pkl entry' if not pickles else 'several data.pkl entries')
        raise CheckpointError(f'not a torch.save zip checkpoint ({what})')
      self.prefix = pickles[0][:-len('data.pkl')]
      byteorder = self.members.get(self.prefix + 'byteorder')
      if byteorder is not None and _read_small(zf, byteorder, 64).strip() != b'little':
        raise CheckpointError('saved on a big-endian machine; only little-endian is supported')
      self.pickle = _read_small(zf, self.members[pickles[0]], MAX_PICKLE_BYTES)

  def storage(self, key: str, dtype: np.dtype, numel: int) -> _Storage:
    member = f'{self.prefix}data/{key}'
    info = self.members.get(member)
    if info is None:
      raise CheckpointError(f'storage data/{key} named by the pickle is missing from the zip')
    nbytes = numel * dtype.itemsize
    if info.file_size != nbytes:
      raise CheckpointError(f'storage data/{key} holds {info.file_size} bytes, but the pickle '
                            f'says {numel} x {dtype} = {nbytes} bytes')
    _check_entry(info)
    compressed = info.compress_type != zipfile.ZIP_STORED
    offset = 0
    if not compressed:
      with open(self.path, 'rb') as f:
        offset = _data_offset(f, info)
      if offset + nbytes > min(self.file_size, self.start_dir):
        raise CheckpointError(f'storage data/{key} runs past the end of its entry '
                              '(truncated file)')
    return _Storage(self.path, key, dtype, numel, offset, member, compressed, info.CRC)


def _show(name: str) -> str:
  """A name from the file, printable on one line (control characters escaped)."""
  return repr(name[:200])


def _check_entry(info: zipfile.ZipInfo) -> None:
  """Refuses entries this reader does not inflate safely: encryption, methods other
  than stored / deflate, and deflated entries that claim to inflate too far."""
  name = _show(info.filename)
  if info.flag_bits & 1:
    raise CheckpointError(f'zip entry {name} is encrypted')
  if info.compress_type not in _METHODS:
    raise CheckpointError(f'zip entry {name} uses compression method {info.compress_type}; '
                          'only stored and deflate are read')
  if (info.compress_type == zipfile.ZIP_DEFLATED
      and info.file_size > MAX_INFLATION * max(info.compress_size, 1024)):
    raise CheckpointError(f'zip entry {name} inflates {info.compress_size} bytes to '
                          f'{info.file_size} (a zip bomb?)')


def _read_small(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
  """A whole entry of at most `limit` bytes (declared size checked before inflating;
  zipfile stops at the declared size and checks the CRC)."""
  _check_entry(info)
  if info.file_size > limit:
    raise CheckpointError(f'zip entry {_show(info.filename)} declares {info.file_size} '
                          f'bytes; at most {limit} are read')
  try:
    data = zf.read(info)
  except (zipfile.BadZipFile, OSError, EOFError, zlib.error, NotImplementedError,
          RuntimeError) as e:
    raise CheckpointError(f'cannot read zip entry {_show(info.filename)} ({e})') from None
  if len(data) != info.file_size:
    raise CheckpointError(f'zip entry {_show(info.filename)} holds {len(data)} bytes, '
                          f'not the {info.file_size} it declares')
  return data


_LEGACY_MAGIC_PREFIX = b'\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19'


def _not_zip_message(path: str, head: bytes) -> str:
  with open(path, 'rb') as f:
    start = f.read(len(_LEGACY_MAGIC_PREFIX))
  if start == _LEGACY_MAGIC_PREFIX:
    return ('legacy (pre-1.6) torch format; it is not read (its pickle is interleaved with '
            'raw storages). Re-save it once with torch: torch.save(torch.load(path, '
            'weights_only=True), new_path)')
  return f'not a torch zip checkpoint (starts with {head!r})'


# ----------------------------------------------------------------------------- unpickling


class _Unpickler(pickle.Unpickler):
  """Resolves globals from `_GLOBALS` only; storages from the archive."""

  def __init__(self, data: bytes, archive: _Archive):
    super().__init__(io.BytesIO(data))
    self._archive = archive
    self._storages: dict[str, _Storage] = {}

  def find_class(self, module, name):
    stand_in = _GLOBALS.get((module, name))
    if stand_in is None:
      shown = f'{module}.{name}'
      shown = shown if shown.isprintable() and len(shown) < 200 else repr(shown[:200])
      raise CheckpointError(f'refusing global {shown} (not a tensor/state-dict type)')
    return stand_in

  def persistent_load(self, pid):
    ok = (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == 'storage'
          and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)
          and isinstance(pid[4], int) and pid[4] >= 0)
    if not ok:
      raise CheckpointError(f'unexpected persistent id {str(pid)[:80]}')
    _, stype, key, _, numel = pid
    known = self._storages.get(key)
    if known is None:
      known = self._storages[key] = self._archive.storage(key, stype.dtype, numel)
    elif (known.dtype, known.numel) != (stype.dtype, numel):
      raise CheckpointError(f'storage data/{key} is named as {known.dtype} x {known.numel} '
                            f'and as {stype.dtype} x {numel}')
    return known


# Opcodes that add to the container below their arguments (its depth is kept, not
# incremented per call): a dict of a thousand entries is not a thousand levels deep.
_IN_PLACE = frozenset({'APPEND', 'APPENDS', 'SETITEM', 'SETITEMS', 'ADDITEMS', 'BUILD'})
_MARK = -1


def _check_pickle(data: bytes) -> None:
  """Walks the opcodes without running them, simulating only how deep objects nest:
  refuses a truncated or malformed pickle, memo indices that the unpickler would
  allocate memory for, and nesting deeper than MAX_PICKLE_DEPTH (hashing or freeing a
  tuple nested a million deep recurses in C and crashes the interpreter)."""
  limit = len(data)
  stack: list[int] = []
  memo: dict[int, int] = {}

  def pop_mark() -> list[int]:
    items = []
    while stack and stack[-1] != _MARK:
      items.append(stack.pop())
    if not stack:
      raise CheckpointError('malformed pickle (no MARK)')
    stack.pop()
    return items

  def pop() -> int:
    if not stack or stack[-1] == _MARK:
      raise CheckpointError('malformed pickle (stack underflow)')
    return stack.pop()
  try:
    for op, arg, _ in pickletools.genops(data):
      name = op.name
      if name in ('PUT', 'BINPUT', 'LONG_BINPUT', 'GET', 'BINGET', 'LONG_BINGET'):
        if int(arg) > limit:
          raise CheckpointError(f'pickle memo index {arg} out of range')
      if name == 'MARK':
        stack.append(_MARK)
        continue
      if name in ('PUT', 'BINPUT', 'LONG_BINPUT', 'MEMOIZE'):
        if not stack or stack[-1] == _MARK:
          raise CheckpointError('malformed pickle (memo of nothing)')
        memo[int(arg) if name != 'MEMOIZE' else len(memo)] = stack[-1]
        continue
      if name in ('GET', 'BINGET', 'LONG_BINGET'):
        if int(arg) not in memo:
          raise CheckpointError(f'malformed pickle (memo index {arg} unset)')
        stack.append(memo[int(arg)])
        continue
      if name == 'DUP':
        stack.append(stack[-1] if stack else pop())
        continue
      before = list(op.stack_before)
      inputs: list[int] = []
      if pickletools.markobject in before:   # everything above the mark, then below it
        inputs.extend(pop_mark())
        before = before[:before.index(pickletools.markobject)]
      for _ in before:
        inputs.append(pop())
      if not op.stack_after:
        continue
      if name in _IN_PLACE:
        container, items = inputs[-1], inputs[:-1]
        depth = max([container] + [d + 1 for d in items])
      else:
        depth = max(inputs) + 1 if inputs else 0
      if depth > MAX_PICKLE_DEPTH:
        raise CheckpointError(f'pickle nests objects more than {MAX_PICKLE_DEPTH} deep')
      stack.append(depth)
  except (ValueError, struct.error) as e:
    if isinstance(e, CheckpointError):
      raise
    raise CheckpointError(f'malformed pickle ({e})') from None


def load(path: str) -> Any:
  """The object saved in a torch zip checkpoint, with `Tensor` records for tensors.

  Raises:
    CheckpointError (a ValueError) with a one-line message starting 'checkpoint <path>:'
    for anything it will not read: a global outside the state-dict set, a legacy or
    TorchScript file, a truncated zip, a missing or mis-sized storage entry.
  """
  try:
    archive = _Archive(path)
    _check_pickle(archive.pickle)
    try:
      return _Unpickler(archive.pickle, archive).load()
    except CheckpointError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      # Any other failure is a malformed pickle (a stand-in called with wrong arguments,
      # an opcode applied to the wrong type, ...): name it, but as a checkpoint error.
      raise CheckpointError(f'malformed pickle ({type(e).__name__}: {e})') from None
  except CheckpointError as e:
    raise CheckpointError(f'checkpoint {path}: {e}') from None


class StateDict(Mapping):
  """key -> numpy array, each read from the file when looked up (not held)."""

  def __init__(self, tensors: Mapping[str, Tensor], float_dtype=np.float32):
    self._tensors = dict(tensors)
    self._float = float_dtype

  def tensor(self, key: str) -> Tensor:
    return self._tensors[key]

  def __getitem__(self, key: str) -> np.ndarray:
    t = self._tensors[key]
    floating = t.dtype.kind == 'f' or t.dtype == ml_dtypes.bfloat16
    return t.numpy(self._float if floating and self._float is not None else None)

  def __iter__(self) -> Iterator[str]:
    return iter(self._tensors)

  def __len__(self) -> int:
    return len(self._tensors)


def tensors_of(obj: Any, what: str) -> dict[str, Tensor]:
  """The `Tensor` values of a loaded dict (others, e.g. ints, dropped)."""
  if not isinstance(obj, dict):
    raise CheckpointError(f'{what} is a {type(obj).__name__}, not a state dict')
  return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor)}
