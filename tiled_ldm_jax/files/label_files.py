"""Label maps read lazily from large files: tiled (pyramidal) TIFFs and OME-Zarr labels.

Each reader is a row source for `label_maps.LabelMap` (`.shape`, `.dtype`, `.ids`,
`.read_rows(r0, r1)`): it holds no pixels, reads the tiles or chunks a band of rows needs,
and is checked whole when opened (one pass, a tile or chunk row at a time): single
channel, integer ids, every segment decodable, the ids it holds. `open_label_source`
chooses the reader from the file's contents (a TIFF signature, a folder holding an
OME-Zarr `labels` group), never from its name; PNGs are read by `label_maps.read_label_png`.
"""

from __future__ import annotations

import os

import numpy as np

from tiled_ldm_jax.files import image_files
from tiled_ldm_jax.files import ome_zarr
from tiled_ldm_jax.files import reading
from tiled_ldm_jax.files import tiff_rows

CHECK_BAND_BYTES = 64 << 20   # rows of an uncompressed label TIFF per read of the check
_TIFF_SIGNATURES = (b'II*\x00', b'MM\x00*', b'II+\x00', b'MM\x00+')   # TIFF, BigTIFF


def is_tiff(path) -> bool:
  """Whether `path` is a regular file starting with a TIFF signature (a FIFO, a device:
  refused by `reading`, never opened)."""
  if reading.kind(path) != 'file':
    return False
  with reading.open_regular(path) as f:
    return f.read(4) in _TIFF_SIGNATURES


def is_ome_zarr_labels(path) -> bool:
  """A folder with a `labels` group (v2 `.zattrs` or v3 `zarr.json`, which is then
  refused by name)."""
  return os.path.isdir(path) and any(
      os.path.lexists(os.path.join(path, 'labels', f)) for f in ('.zattrs', 'zarr.json'))


def _check_ids(dtype, what: str) -> None:
  if not np.issubdtype(dtype, np.integer):
    raise ValueError(f'{what}: label ids must be integers, the file holds {dtype}')


class TiffLabels:
  """The first page (full resolution) of a TIFF of label ids, tile row by tile row."""

  def __init__(self, path):
    self._rows = tiff_rows.TiffRows(path)
    name, shape, dtype = self._rows.name, self._rows.shape, self._rows.dtype
    if len(shape) != 2:
      raise ValueError(f'{name}: a label TIFF must be one channel [H, W], its first page '
                       f'is {list(shape)}')
    _check_ids(dtype, name)
    self.path, self.shape, self.dtype, self._name = self._rows.path, shape, dtype, name
    ids = set()
    step = max(self._rows._segment[0], 1)  # pylint: disable=protected-access
    raw = self._rows._raw  # pylint: disable=protected-access
    if raw:   # uncompressed strips are read by byte ranges: bands of CHECK_BAND_BYTES
      step = max(1, CHECK_BAND_BYTES // max(1, shape[1] * dtype.itemsize))
    # The check pass: every segment once, one segment row at a time (memory: that row);
    # a row of sparse segments (no bytes) is zeros, known without decoding.
    for ti, r0 in enumerate(range(0, shape[0], step)):
      if not raw and self._rows.segment_row_empty(ti):
        ids.add(0)
        continue
      ids.update(int(v) for v in np.unique(self.read_rows(r0, min(r0 + step, shape[0]))))
    self._rows.release()
    self.ids = sorted(ids)

  def read_rows(self, r0: int, r1: int) -> np.ndarray:
    return self._rows.read_rows(r0, r1)


class ZarrLabels:
  """Level 0 of the first label image of an OME-Zarr store's `labels/` group, through
  tensorstore (orbax's dependency), a chunk row at a time; the metadata checked first
  (`ome_zarr`)."""

  def __init__(self, path):
    name = image_files._printable(path)  # pylint: disable=protected-access
    labels = os.path.join(path, 'labels')
    doc = ome_zarr.attrs(labels, name)
    where = reading.printable(os.path.join(labels, '.zattrs'))
    first = reading.field(doc, 'labels[0]', str, where)
    if '/' in first or '\\' in first or first in ('', '.', '..'):
      raise ValueError(f'{where}: labels[0] {first[:40]!r} is not a folder name inside '
                       'labels/')
    array_path, _ = ome_zarr.level0(os.path.join(labels, first), name)
    self._array, meta = ome_zarr.open_array(array_path, name)
    shape = tuple(self._array.shape)
    if len(shape) < 2 or any(d != 1 for d in shape[:-2]):
      raise ValueError(f'{name}: a label image must be [.., H, W] with size-1 leading axes, '
                       f'got {list(shape)}')
    self.shape, self._lead = shape[-2:], len(shape) - 2
    self.dtype = np.dtype(self._array.dtype.numpy_dtype)
    _check_ids(self.dtype, name)
    self._name = name
    if self.shape[0] * self.shape[1] > tiff_rows.MAX_LABEL_PIXELS:
      raise ValueError(f'{name}: a label image of {self.shape[0]} x {self.shape[1]} pixels '
                       f'is not read (at most {tiff_rows.MAX_LABEL_PIXELS:,})')
    chunk = self._array.chunk_layout.read_chunk.shape[-2] or 512
    present = ome_zarr.chunk_rows_present(array_path, meta)
    fill = meta.get('fill_value')
    ids = set()
    for r0 in range(0, self.shape[0], chunk):
      if r0 // chunk not in present:      # no chunk file in this row: all fill value
        ids.add(int(fill) if isinstance(fill, (int, float)) and not isinstance(fill, bool)
                and float(fill).is_integer() else 0)
        continue
      ids.update(int(v) for v in np.unique(self.read_rows(r0, min(r0 + chunk, self.shape[0]))))
    self.ids = sorted(ids)

  def read_rows(self, r0: int, r1: int) -> np.ndarray:
    try:
      block = self._array[(0,) * self._lead + (slice(r0, r1),)].read().result()
    except Exception as e:  # pylint: disable=broad-except  # a damaged chunk: one line
      raise ValueError(f'{self._name}: cannot read the rows {r0}-{r1} ({str(e)[:120]})') from None
    return np.asarray(block)


def open_label_source(path):
  """A TIFF or OME-Zarr label source for `label_maps.LabelMap`, or None if the file is neither
  (by its contents)."""
  if is_tiff(path):
    return TiffLabels(path)
  if is_ome_zarr_labels(path):
    return ZarrLabels(path)
  if os.path.isdir(path):   # a folder is read as OME-Zarr or not at all: say why not
    name = image_files._printable(path)  # pylint: disable=protected-access
    if os.path.lexists(os.path.join(path, 'zarr.json')):
      raise ValueError(f'{name}: a Zarr v3 store (zarr.json); only Zarr v2 OME-Zarr '
                       'stores (.zattrs, .zarray) are read')
    raise ValueError(f'{name}: a folder without an OME-Zarr labels group (labels/.zattrs)')
  return None
