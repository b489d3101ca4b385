"""OME-Zarr stores from outside, checked before tensorstore opens them: the group's
`.zattrs` and the array's `.zarray` read through `reading.read_json` (size, depth) and
checked field by field (`reading.field`), the declared shape, chunk and dtype within
budgets, every entry of the array folder a regular file or folder (a FIFO chunk would
block tensorstore's read). Used by `label_files.ZarrLabels` (--mask, --keep_mask) and
`large_images.ZarrImage` (--init_image).
"""

from __future__ import annotations

import os
import stat

import numpy as np

from tiled_ldm_jax.files import reading

MAX_METADATA_BYTES = 1 << 20      # .zattrs / .zarray are a few hundred bytes
MAX_CHUNK_BYTES = 1 << 30         # one decoded chunk
MAX_TOTAL_BYTES = 1 << 36         # the whole array decoded (64 GiB: a 150k px RGB slide)
MAX_ENTRIES = 1 << 22             # files listed in one array folder


def attrs(group: str, name: str) -> dict:
  """The group's `.zattrs` object; a Zarr v3 group (zarr.json) is named as such."""
  path = os.path.join(group, '.zattrs')
  if not os.path.lexists(path) and os.path.lexists(os.path.join(group, 'zarr.json')):
    where = '' if reading.printable(group) == name else f' {reading.printable(group)} is'
    raise ValueError(f'{name}:{where} a Zarr v3 group (zarr.json); only Zarr v2 stores '
                     '(.zattrs, .zarray) are read')
  try:
    doc = reading.read_json(path, 'OME-Zarr .zattrs', max_bytes=MAX_METADATA_BYTES)
  except FileNotFoundError:
    raise ValueError(f'{name}: {reading.printable(path)} is missing') from None
  if not isinstance(doc, dict):
    raise ValueError(f'{reading.printable(path)}: the top level must be an object, got '
                     f'{reading.type_name(doc)}')
  return doc


def level0(group: str, name: str) -> tuple[str, list]:
  """(path of the multiscale's level 0 array, axis names or []) of an image group."""
  doc = attrs(group, name)
  where = reading.printable(os.path.join(group, '.zattrs'))
  rel = reading.field(doc, 'multiscales[0].datasets[0].path', str, where)
  if '/' in rel or '\\' in rel or rel in ('', '.', '..'):
    raise ValueError(f'{where}: multiscales[0].datasets[0].path {rel[:40]!r} is not a '
                     'folder name inside the group')
  axes = reading.field(doc, 'multiscales[0].axes', list, where, default=[])
  names = []
  for i, a in enumerate(axes):
    names.append(reading.field(a, 'name', str, f'{where}: multiscales[0].axes[{i}]')
                 if isinstance(a, dict) else reading.field(
                     {'a': a}, 'a', str, f'{where}: multiscales[0].axes[{i}]'))
  return os.path.join(group, rel), names


def _check_entries(folder: str, name: str) -> None:
  """Every entry under the array folder a regular file or folder (by stat, unopened)."""
  count = 0
  for root, dirs, files in os.walk(folder):
    for entry in dirs + files:
      count += 1
      if count > MAX_ENTRIES:
        raise ValueError(f'{name}: more than {MAX_ENTRIES} files in {folder}')
      full = os.path.join(root, entry)
      try:
        mode = os.stat(full).st_mode
      except OSError as e:
        raise ValueError(f'{name}: {reading.printable(full)}: {e.strerror}') from None
      if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        reading.kind(full, 'Zarr chunk')   # raises, naming what it is


def chunk_rows_present(path: str, meta: dict) -> set[int]:
  """The chunk-row indices (along the second-last axis) of the chunk files present in
  the array folder `path`: a row with none is all fill value, and need not be read."""
  sep = meta.get('dimension_separator') or '.'
  ndim, rows = len(meta['shape']), set()
  for root, _, files in os.walk(path):
    rel = os.path.relpath(root, path)
    for f in files:
      key = f if rel == '.' else os.path.join(rel, f).replace(os.sep, '/')
      parts = key.split(sep if sep in ('.', '/') else '.')
      if len(parts) == ndim and all(p.isdigit() for p in parts):
        rows.add(int(parts[-2]) if ndim > 1 else 0)
  return rows


def open_array(path: str, name: str, *, band_rows_budget: int | None = None):
  """(the tensorstore array at `path` (a Zarr v2 array folder), its `.zarray`), the
  metadata checked first (module doc). `band_rows_budget`: bytes a chunk row (the chunks' rows across the
  whole width) may take decoded (default `reading.memory_budget(0.25)`)."""
  if not os.path.isdir(path):
    reading.kind(path, 'OME-Zarr array', allow=('folder',))
  zarray = os.path.join(path, '.zarray')
  if not os.path.lexists(zarray) and os.path.lexists(os.path.join(path, 'zarr.json')):
    raise ValueError(f'{name}: {reading.printable(path)} is a Zarr v3 array (zarr.json); '
                     'only Zarr v2 arrays (.zarray) are read')
  try:
    meta = reading.read_json(zarray, 'Zarr .zarray', max_bytes=MAX_METADATA_BYTES)
  except FileNotFoundError:
    raise ValueError(f'{name}: {reading.printable(zarray)} is missing') from None
  where = reading.printable(zarray)
  if reading.field(meta, 'zarr_format', int, where) != 2:
    raise ValueError(f'{where}: zarr_format {meta["zarr_format"]} is not 2')
  shape = reading.field(meta, 'shape', list, where)
  chunks = reading.field(meta, 'chunks', list, where)
  for key, values, low in (('shape', shape, 0), ('chunks', chunks, 1)):
    for i in range(len(values)):
      v = reading.field(values, f'[{i}]', int, f'{where}: {key}')
      if v < low:
        raise ValueError(f'{where}: {key}[{i}] is {v}, must be >= {low}')
  if len(chunks) != len(shape) or not shape:
    raise ValueError(f'{where}: shape {shape} and chunks {chunks} differ in length')
  text = reading.field(meta, 'dtype', str, where)
  try:
    dtype = np.dtype(text)
  except TypeError:
    dtype = None
  if dtype is None or dtype.kind not in 'uif' or dtype.itemsize > 8 or dtype.fields:
    raise ValueError(f'{where}: dtype {text[:40]!r} is not a plain number type')
  item = dtype.itemsize
  total = int(np.prod(shape, dtype=object)) * item
  if total > MAX_TOTAL_BYTES:
    raise ValueError(f'{where}: shape {shape} of {dtype} declares {total / 2 ** 30:,.0f} '
                     f'GiB; at most {MAX_TOTAL_BYTES >> 30} GiB are read')
  chunk = int(np.prod(chunks, dtype=object)) * item
  reading.check_bytes(where, f'chunk {chunks} of {dtype}', chunk,
                      min(MAX_CHUNK_BYTES, reading.memory_budget(0.25)))
  # A read of rows decodes whole chunks across the other axes: a row of chunks at once.
  rows = chunks[-2] if len(shape) > 1 else 1
  across = rows * item * int(np.prod([-(-s // c) * c for i, (s, c) in
                                      enumerate(zip(shape, chunks)) if i != len(shape) - 2],
                                     dtype=object))
  reading.check_bytes(where, f'row of chunks ({rows} rows across shape {shape})', across,
                      reading.memory_budget(0.25) if band_rows_budget is None
                      else band_rows_budget)
  _check_entries(path, name)
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  try:
    return ts.open({'driver': 'zarr', 'kvstore': {'driver': 'file', 'path': path}},
                   open=True).result(), meta
  except Exception as e:  # pylint: disable=broad-except  # tensorstore's own error types
    raise ValueError(f'{name}: cannot open the Zarr array {reading.printable(path)} '
                     f'({" ".join(str(e).split())[:160]})') from None
