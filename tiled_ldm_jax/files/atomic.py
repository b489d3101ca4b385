"""The one atomic-write helper: a temporary name beside the target, fsync, rename.

Every file the project writes (images, masks, JSON records, metrics) goes through
`atomic_path` or `write_json`, so a final name never holds a partial file: a reader sees
either nothing or the whole file, and an interrupted run leaves only hidden `.tmp` files,
which are removed when the write fails inside Python.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Any, Iterator


def _suffix(path) -> str:
  return os.path.splitext(os.fspath(path))[1].lower()


@contextlib.contextmanager
def atomic_path(path) -> Iterator[str]:
  """Yields a temporary path in `path`'s folder; renamed to `path` if the body succeeds.

  The temporary file keeps `path`'s suffix (some writers dispatch on it), starts with
  '.' and is removed on any exception, so `path` is either untouched or complete.
  """
  path = os.path.abspath(os.fspath(path))
  folder, name = os.path.split(path)
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f'.{name}.', suffix='.tmp' + _suffix(path), dir=folder)
  os.close(fd)
  try:
    yield tmp
    with open(tmp, 'rb+') as f:
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)    # mkstemp creates 0600
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise


def write_json(path, obj: Any, **kwargs) -> None:
  """`json.dump(obj)` to `path`, atomically (indent 1 unless given)."""
  kwargs.setdefault('indent', 1)
  with atomic_path(path) as tmp:
    with open(tmp, 'w') as f:
      json.dump(obj, f, **kwargs)
