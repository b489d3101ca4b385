"""The one reading layer under every reader of outside files: what may be opened, and
budgets checked before any decoding.

- `kind(path, what)`: 'file' or 'folder' from `os.stat`, never an `open`: a FIFO, a
  device or a socket is refused here (opening a FIFO blocks until a writer comes), a
  symlink loop or a dangling link is named as such, a missing path raises
  FileNotFoundError.
- `open_regular(path, what)`: opens a regular file for reading without ever blocking
  (O_NONBLOCK, then `fstat` of what was opened: a path swapped for a FIFO after the
  `stat` is still refused).
- `read_json(path, what, ...)`: bytes, nesting depth and the parsed value's memory
  checked by a scan of the raw bytes before `json.loads` builds anything (nested empty
  arrays cost ~50x their bytes as Python objects); UTF-8 only (a UTF-16/32 byte order
  mark is named); NaN / Infinity refused where the caller says.
- `field(doc, 'a.b[0].c', type, where)`: one field of parsed JSON, its type checked; a
  missing field or a wrong type is one ValueError naming the field.
- `memory_budget()` / `check_bytes(...)`: the bytes one read may decode at once.

Every failure is one ValueError (or FileNotFoundError) line naming the file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import stat
from typing import Any, Iterator

import numpy as np

MAX_JSON_DEPTH = 64          # GeoJSON needs ~7 levels, OME-Zarr metadata ~5
JSON_CONTAINER_BYTES = 96    # a parsed list / dict (object, GC header, its parent's slot)
JSON_VALUE_BYTES = 40        # a parsed number or short string and its slot
DEFAULT_BUDGET = 4 << 30     # bytes one read may hold when the host's memory is unknown
_SCAN_CHUNK = 1 << 20       # bytes per block of the scan (its temporaries: ~30x that)


def printable(path) -> str:
  text = os.fspath(path)
  return text if text.isprintable() else repr(text)


def memory_budget(share: float = 0.5) -> int:
  """Bytes one read may hold at once: `share` of the host's available memory (or
  DEFAULT_BUDGET where that is unknown)."""
  from tiled_ldm_jax import memory  # pylint: disable=g-import-not-at-top
  avail = memory.host_available()
  return DEFAULT_BUDGET if avail is None else int(avail * share)


def check_bytes(name: str, what: str, need: int, budget: int | None = None) -> None:
  """ValueError if decoding `need` bytes would pass the budget (default: memory_budget)."""
  budget = memory_budget() if budget is None else budget
  if need > budget:
    raise ValueError(f'{name}: the {what} needs {need / 2 ** 20:,.0f} MiB decoded, more '
                     f'than the {budget / 2 ** 20:,.0f} MiB read at once')


_KINDS = ((stat.S_ISFIFO, 'a FIFO (named pipe)'), (stat.S_ISCHR, 'a character device'),
          (stat.S_ISBLK, 'a block device'), (stat.S_ISSOCK, 'a socket'))


def _not_regular(mode: int) -> str:
  return next((text for test, text in _KINDS if test(mode)), 'not a regular file')


def kind(path, what: str = 'file', allow: tuple[str, ...] = ('file', 'folder')) -> str:
  """'file' or 'folder' (one of `allow`) by `os.stat` (module doc)."""
  name = printable(path)
  try:
    st = os.stat(path)
  except FileNotFoundError:
    if os.path.islink(path):
      raise ValueError(f'{name}: the {what} is a symlink to nothing '
                       f'({printable(os.readlink(path))})') from None
    raise FileNotFoundError(f'{what} not found: {name}') from None
  except OSError as e:
    if e.errno == errno.ELOOP:
      raise ValueError(f'{name}: the {what} is a symlink loop') from None
    raise ValueError(f'{name}: cannot read the {what} ({e.strerror})') from None
  found = ('file' if stat.S_ISREG(st.st_mode) else
           'folder' if stat.S_ISDIR(st.st_mode) else None)
  if found is None:
    raise ValueError(f'{name}: the {what} is {_not_regular(st.st_mode)}; only regular '
                     'files and folders are read')
  if found not in allow:
    raise ValueError(f'{name}: the {what} is a {found}, expected a '
                     f'{" or ".join(allow)}')
  return found


@contextlib.contextmanager
def open_regular(path, what: str = 'file') -> Iterator[Any]:
  """A binary file object of the regular file `path` (module doc)."""
  kind(path, what, allow=('file',))
  name = printable(path)
  try:
    fd = os.open(path, os.O_RDONLY | getattr(os, 'O_NONBLOCK', 0) |
                 getattr(os, 'O_CLOEXEC', 0))
  except OSError as e:
    raise ValueError(f'{name}: cannot open the {what} ({e.strerror})') from None
  try:
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
      raise ValueError(f'{name}: the {what} is {_not_regular(mode)}; only regular files '
                       'are read')
    os.set_blocking(fd, True)
  except BaseException:
    os.close(fd)
    raise
  with os.fdopen(fd, 'rb') as f:
    yield f


def read_bytes(path, what: str, max_bytes: int) -> bytes:
  """The whole regular file, refused unread if larger than `max_bytes`."""
  with open_regular(path, what) as f:
    size = os.fstat(f.fileno()).st_size
    if size > max_bytes:
      raise ValueError(f'{printable(path)}: the {what} is {size:,} bytes, more than the '
                       f'{max_bytes:,} read')
    raw = f.read(max_bytes + 1)
  if len(raw) > max_bytes:      # grew while read
    raise ValueError(f'{printable(path)}: the {what} is more than {max_bytes:,} bytes')
  return raw


def scan_json(raw: bytes) -> tuple[int, int, int]:
  """(deepest nesting, containers, commas) of JSON text outside its strings, from the
  bytes alone (numpy, in chunks: a few bytes of temporaries per input byte)."""
  in_string, backslashes, depth = 0, 0, 0
  deepest = containers = commas = 0
  for c0 in range(0, len(raw), _SCAN_CHUNK):
    a = np.frombuffer(raw, np.uint8, min(_SCAN_CHUNK, len(raw) - c0), c0)
    n = len(a)
    # A quote is escaped if an odd run of backslashes precedes it (runs may start in
    # the previous chunk: `backslashes` carries the run at its end).
    idx = np.arange(n, dtype=np.int32)
    last_other = np.maximum.accumulate(np.where(a != 0x5C, idx, -1))
    q = np.flatnonzero(a == 0x22)
    before = np.where(q > 0, last_other[np.maximum(q - 1, 0)], -1)
    run = np.where(q > 0, q - 1 - before, 0)
    run = run + np.where(before < 0, backslashes, 0)
    toggles = np.zeros(n, np.int8)
    toggles[q[run % 2 == 0]] = 1
    inside = (np.cumsum(toggles, dtype=np.int32) + in_string) & 1
    outside = inside == 0
    opens = ((a == 0x5B) | (a == 0x7B)) & outside
    closes = ((a == 0x5D) | (a == 0x7D)) & outside
    level = np.cumsum(opens.astype(np.int8) - closes.astype(np.int8), dtype=np.int32)
    if n:
      deepest = max(deepest, depth + int(level.max()))
      depth += int(level[-1])
      in_string = int(inside[-1])
      backslashes = (n - 1 - int(last_other[-1])) + (backslashes if last_other[-1] < 0 else 0)
    containers += int(opens.sum())
    commas += int(((a == 0x2C) & outside).sum())
  return deepest, containers, commas


def _refuse_constant(value: str):
  raise ValueError(f'{value} is not a JSON number')


def read_json(path, what: str, *, max_bytes: int, max_depth: int = MAX_JSON_DEPTH,
              budget: int | None = None, allow_nan: bool = True,
              max_ratio: float | None = None) -> Any:
  """The parsed JSON value of `path` (module doc); the caller checks its shape.
  `allow_nan`: NaN / Infinity (Python's json writes them) read, else refused.
  `max_ratio`: the parsed value may also take at most this many times the file's bytes
  (plus 64 MiB), whatever memory the host has (a format's usual density)."""
  name = printable(path)
  raw = read_bytes(path, what, max_bytes)
  for bom, enc in ((b'\xff\xfe\x00\x00', 'UTF-32'), (b'\x00\x00\xfe\xff', 'UTF-32'),
                   (b'\xff\xfe', 'UTF-16'), (b'\xfe\xff', 'UTF-16')):
    if raw.startswith(bom):
      raise ValueError(f'{name}: the {what} is {enc} text (its byte order mark); JSON is '
                       'read as UTF-8')
  deepest, containers, commas = scan_json(raw)
  if deepest > max_depth:
    raise ValueError(f'{name}: the {what} nests {deepest} levels deep; at most '
                     f'{max_depth} are read')
  need = 2 * len(raw) + containers * JSON_CONTAINER_BYTES + (commas + containers) * \
      JSON_VALUE_BYTES
  what_parsed = f'{what} (parsed: {containers:,} arrays / objects, {commas:,} commas)'
  check_bytes(name, what_parsed, need, budget)
  if max_ratio is not None and need > max_ratio * len(raw) + (64 << 20):
    raise ValueError(f'{name}: the {what_parsed} would take {need / len(raw):.0f}x its '
                     f'{len(raw):,} bytes as Python objects; at most {max_ratio:.0f}x '
                     'are read')
  try:
    return json.loads(raw.decode('utf-8-sig'),
                      **({} if allow_nan else {'parse_constant': _refuse_constant}))
  except (ValueError, RecursionError) as e:   # JSONDecodeError, UnicodeDecodeError
    raise ValueError(f'{name}: the {what} is not valid JSON ({type(e).__name__}: '
                     f'{" ".join(str(e).split())[:160]})') from None


_TYPE_NAMES = {dict: 'an object', list: 'an array', str: 'a string', int: 'an integer',
               float: 'a number', bool: 'true or false'}


def type_name(value) -> str:
  if value is None:
    return 'null'
  for t in (bool, dict, list, str, int, float):
    if isinstance(value, t):
      return _TYPE_NAMES[t]
  return type(value).__name__


def field(doc: Any, path: str, kinds, where: str, default: Any = ...) -> Any:
  """The value at `path` ('multiscales[0].datasets[0].path') of parsed JSON `doc`, one of
  `kinds` (a type or tuple; int never matches a bool); a missing step or a wrong type is
  one ValueError '<where>: <path> ...'. With `default`, a missing last key gives it."""
  kinds = kinds if isinstance(kinds, tuple) else (kinds,)
  steps = re.findall(r'\.?([^.\[\]]+)|\[(\d+)\]', path)
  value, done = doc, ''
  for i, (key, index) in enumerate(steps):
    here = done + (f'[{index}]' if index else ('.' if done else '') + key)
    if index:
      if not isinstance(value, list):
        raise ValueError(f'{where}: {done or "the top level"} must be an array, got '
                         f'{type_name(value)}')
      if int(index) >= len(value):
        raise ValueError(f'{where}: {here} is missing ({done} has {len(value)} items)')
      value = value[int(index)]
    else:
      if not isinstance(value, dict):
        raise ValueError(f'{where}: {done or "the top level"} must be an object, got '
                         f'{type_name(value)}')
      if key not in value:
        if default is not ... and i == len(steps) - 1:
          return default
        raise ValueError(f'{where}: {here} is missing')
      value = value[key]
    done = here
  ok = any(isinstance(value, k) and not (k in (int, float) and isinstance(value, bool))
           for k in kinds)
  if not ok:
    raise ValueError(f'{where}: {path} must be '
                     f'{" or ".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)}, got '
                     f'{type_name(value)}')
  return value
