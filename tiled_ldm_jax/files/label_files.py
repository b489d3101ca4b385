"""Label maps read lazily from large files: tiled (pyramidal) TIFFs and OME-Zarr labels.

Each reader is a row source for `masks.LabelMap` (`.shape`, `.dtype`, `.ids`,
`.read_rows(r0, r1)`): it holds no pixels, reads the tiles or chunks a band of rows needs,
and is checked whole when opened (one pass, a tile or chunk row at a time): single
channel, integer ids, every segment decodable, the ids it holds. `open_label_source`
chooses the reader from the file's contents (a TIFF signature, a folder holding an
OME-Zarr `labels` group), never from its name; PNGs are read by `masks.read_label_png`.
"""

from __future__ import annotations

import json
import os

import numpy as np

from tiled_ldm_jax.files import image_files
from tiled_ldm_jax.files import tiff_rows

_TIFF_SIGNATURES = (b'II*\x00', b'MM\x00*', b'II+\x00', b'MM\x00+')   # TIFF, BigTIFF


def is_tiff(path) -> bool:
  if not os.path.isfile(path):
    return False
  with open(path, 'rb') as f:
    return f.read(4) in _TIFF_SIGNATURES


def is_ome_zarr_labels(path) -> bool:
  return os.path.isdir(path) and os.path.isfile(os.path.join(path, 'labels', '.zattrs'))


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
    for r0 in range(0, shape[0], step * 4):           # the check pass: every segment once
      ids.update(int(v) for v in np.unique(self.read_rows(r0, min(r0 + step * 4, shape[0]))))
    self.ids = sorted(ids)

  def read_rows(self, r0: int, r1: int) -> np.ndarray:
    return self._rows.read_rows(r0, r1)


class ZarrLabels:
  """Level 0 of the first label image of an OME-Zarr store's `labels/` group, through
  tensorstore (orbax's dependency), a chunk row at a time."""

  def __init__(self, path):
    import tensorstore as ts  # pylint: disable=g-import-not-at-top
    name = image_files._printable(path)  # pylint: disable=protected-access
    try:
      with open(os.path.join(path, 'labels', '.zattrs')) as f:
        label_names = json.load(f).get('labels') or []
      if not label_names or not isinstance(label_names[0], str) or '/' in label_names[0] \
          or label_names[0] in ('.', '..'):
        raise ValueError('no label image listed in labels/.zattrs')
      group = os.path.join(path, 'labels', label_names[0])
      with open(os.path.join(group, '.zattrs')) as f:
        level0 = json.load(f)['multiscales'][0]['datasets'][0]['path']
      if not isinstance(level0, str) or '/' in level0 or level0 in ('.', '..'):
        raise ValueError(f'bad dataset path {str(level0)[:40]!r}')
      self._array = ts.open({'driver': 'zarr', 'kvstore': {
          'driver': 'file', 'path': os.path.join(group, level0)}}, open=True).result()
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
      raise ValueError(f'{name}: not a readable OME-Zarr labels group ({str(e)[:120]})') from None
    shape = tuple(self._array.shape)
    if len(shape) < 2 or any(d != 1 for d in shape[:-2]):
      raise ValueError(f'{name}: a label image must be [.., H, W] with size-1 leading axes, '
                       f'got {list(shape)}')
    self.shape, self._lead = shape[-2:], len(shape) - 2
    self.dtype = np.dtype(self._array.dtype.numpy_dtype)
    _check_ids(self.dtype, name)
    self._name = name
    chunk = self._array.chunk_layout.read_chunk.shape[-2] or 512
    ids = set()
    for r0 in range(0, self.shape[0], chunk):
      ids.update(int(v) for v in np.unique(self.read_rows(r0, min(r0 + chunk, self.shape[0]))))
    self.ids = sorted(ids)

  def read_rows(self, r0: int, r1: int) -> np.ndarray:
    try:
      block = self._array[(0,) * self._lead + (slice(r0, r1),)].read().result()
    except Exception as e:  # pylint: disable=broad-except  # a damaged chunk: one line
      raise ValueError(f'{self._name}: cannot read the rows {r0}-{r1} ({str(e)[:120]})') from None
    return np.asarray(block)


def open_label_source(path):
  """A TIFF or OME-Zarr label source for `masks.LabelMap`, or None if the file is neither
  (by its contents)."""
  if is_tiff(path):
    return TiffLabels(path)
  if is_ome_zarr_labels(path):
    return ZarrLabels(path)
  return None
