"""OME-Zarr (NGFF 0.4) stores of generated images and their label masks, via tensorstore.

Layout of `sampleNNNN.zarr` (Zarr v2, nested chunk keys "/", blosc zstd bit-shuffled
chunks):

  .zgroup, .zattrs      multiscales (axes c, y, x) + omero (channel colours)
  0, 1, ..., n          image levels [C, h_l, w_l] uint8, chunks [1, tile, tile]
  labels/.zattrs        {"labels": ["tissue"]}
  labels/tissue/        multiscales (axes c, y, x with c = 1) + image-label; levels
                        [1, h_l, w_l] of label ids (uint8 or uint16)

Axes are channel-first because NGFF 0.4 orders axes time, channel, space; readers
(ome-zarr-py / napari-ome-zarr, vizarr, QuPath) show the three channels with the omero
colours red, green, blue, i.e. the RGB image. Level l is the 2x2 rounded box mean of
level l-1 (`writers.downsample2x`, sides `ceil(side / 2)`, the same pyramid as
`writers.write_tiff`); label levels take the top-left id of each 2x2 block (nearest), so
ids stay ids. `coordinateTransformations` scale each level by 2^l, times `mpp`
micrometres per pixel when given.

Writing is split so that several processes could each write their own rows:

  tmp = create_store(path, shape, ...)        # once: metadata, empty arrays, hidden name
  write_bands(tmp, bands)                     # any process: its rows of every level
  write_bands(tmp, label_bands, array='labels')
  finalize(tmp, path)                         # once, after all writers: rename

`write_ome_zarr` does the three for one process. Until `finalize` the store lives under
a hidden temporary name (`.sampleNNNN.zarr.partial`), so a store at the final name is
always complete; on an error `write_ome_zarr` removes the temporary store.

Memory: one band plus, per level, less than one chunk row (`tile` rows) being gathered
so that every chunk is written once, whole (no read-modify-write); tensorstore
compresses the chunks of a write on its own thread pool.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from typing import Any, Iterable, Sequence

import numpy as np

from tiled_ldm_jax.output import writers

NGFF_VERSION = '0.4'
LABEL_NAME = 'tissue'
# Bit-shuffle groups the smooth high bits of neighbouring uint8 samples apart from their
# noisy low bits: 17% smaller than byte shuffle (a no-op on uint8) at the same speed.
DEFAULT_COMPRESSOR = {'id': 'blosc', 'cname': 'zstd', 'clevel': 3, 'shuffle': 2,
                      'blocksize': 0}
_CHANNEL_COLOURS = {1: ['FFFFFF'], 3: ['FF0000', '00FF00', '0000FF'],
                    4: ['FF0000', '00FF00', '0000FF', 'FFFFFF']}
_CHANNEL_NAMES = {1: ['gray'], 3: ['red', 'green', 'blue'], 4: ['red', 'green', 'blue', 'alpha']}


def _tensorstore():
  import tensorstore  # pylint: disable=g-import-not-at-top
  return tensorstore


def temp_store_path(path) -> str:
  """The hidden name a store is written under until `finalize`; fixed, so that several
  processes find the same store."""
  path = os.path.abspath(os.fspath(path))
  folder, name = os.path.split(path)
  return os.path.join(folder, f'.{name}.partial')


def _write_json(path: str, obj: Any) -> None:
  with open(path, 'w') as f:
    json.dump(obj, f, indent=1)


def _read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def _multiscales(name: str, n_levels: int, mpp: float | None, kind: str) -> dict:
  unit = {'unit': 'micrometer'} if mpp is not None else {}
  axes = [{'name': 'c', 'type': 'channel'},
          {'name': 'y', 'type': 'space', **unit}, {'name': 'x', 'type': 'space', **unit}]
  pixel = 1.0 if mpp is None else float(mpp)
  datasets = [{'path': str(level), 'coordinateTransformations': [
      {'type': 'scale', 'scale': [1.0, pixel * 2 ** level, pixel * 2 ** level]}]}
              for level in range(n_levels)]
  method = ('2x2 box mean, rounded; an odd last row/column is paired with itself'
            if kind == 'mean' else 'top-left id of each 2x2 block')
  return {'version': NGFF_VERSION, 'name': name, 'axes': axes, 'datasets': datasets,
          'type': kind, 'metadata': {'method': method}}


def _omero(name: str, channels: int) -> dict:
  window = {'min': 0, 'max': 255, 'start': 0, 'end': 255}
  return {'name': name, 'version': NGFF_VERSION, 'rdefs': {'model': 'color'},
          'channels': [{'label': label, 'color': colour, 'window': window, 'active': True,
                        'coefficient': 1, 'family': 'linear', 'inverted': False}
                       for label, colour in zip(_CHANNEL_NAMES[channels],
                                                _CHANNEL_COLOURS[channels])]}


def _array_spec(path: str, shape: Sequence[int] | None = None, chunks=None, dtype=None,
                compressor=None, workers: int | None = None) -> dict:
  spec = {'driver': 'zarr', 'kvstore': {'driver': 'file', 'path': path}}
  if workers:
    spec['context'] = {'data_copy_concurrency': {'limit': workers}}
  if shape is not None:
    spec['metadata'] = {'shape': list(shape), 'chunks': list(chunks),
                        'dtype': np.dtype(dtype).str, 'compressor': compressor,
                        'fill_value': 0, 'order': 'C', 'filters': None,
                        'dimension_separator': '/'}
    spec['create'] = True
  return spec


def create_store(path, shape: Sequence[int], *, tile: int = writers.DEFAULT_TILE,
                 levels: int | None = None, mpp: float | None = None,
                 labels_dtype=np.uint8, compressor: dict | None = None) -> str:
  """Creates the (empty) store for `path` under its temporary name and returns that name.

  Args:
    path: the final store, e.g. `.../sample0000.zarr` (written by `finalize`).
    shape: image `(H, W, C)`, C in 1, 3, 4.
    tile: chunk side (chunks are `[1, tile, tile]`); levels are halved until one chunk.
    levels: number of levels including level 0 (default: until one tile).
    mpp: microns per pixel of level 0, in the coordinate transformations (None: pixels).
    labels_dtype: dtype of the label ids (uint8 or uint16), None for no labels group.
    compressor: numcodecs JSON of the chunk compressor (default `DEFAULT_COMPRESSOR`).

  A leftover temporary store of an interrupted run is replaced.
  """
  height, width, channels = (int(v) for v in shape)
  if channels not in _CHANNEL_COLOURS:
    raise ValueError(f'channels must be 1, 3 or 4, got {channels}')
  if mpp is not None and not mpp > 0:
    raise ValueError(f'mpp must be positive microns per pixel, got {mpp}')
  if labels_dtype is not None and np.dtype(labels_dtype) not in (np.uint8, np.uint16):
    raise ValueError(f'labels_dtype must be uint8 or uint16, got {labels_dtype}')
  compressor = DEFAULT_COMPRESSOR if compressor is None else compressor
  shapes = writers.pyramid_shapes(height, width, tile, levels)
  tmp = temp_store_path(path)
  name = os.path.basename(os.path.abspath(os.fspath(path)))
  if os.path.lexists(tmp):
    shutil.rmtree(tmp)
  os.makedirs(tmp)
  _write_group(tmp, {'multiscales': [_multiscales(name, len(shapes), mpp, 'mean')],
                     'omero': _omero(name, channels)})
  _create_levels(tmp, shapes, channels, np.uint8, tile, compressor)
  if labels_dtype is not None:
    _write_group(os.path.join(tmp, 'labels'), {'labels': [LABEL_NAME]})
    label_group = os.path.join(tmp, 'labels', LABEL_NAME)
    _write_group(label_group, {
        'multiscales': [_multiscales(LABEL_NAME, len(shapes), mpp, 'nearest')],
        'image-label': {'version': NGFF_VERSION, 'source': {'image': '../../'}}})
    _create_levels(label_group, shapes, 1, labels_dtype, tile, compressor)
  return tmp


def _write_group(folder: str, attrs: dict) -> None:
  os.makedirs(folder, exist_ok=True)
  _write_json(os.path.join(folder, '.zgroup'), {'zarr_format': 2})
  _write_json(os.path.join(folder, '.zattrs'), attrs)


def _create_levels(group: str, shapes, channels: int, dtype, tile: int,
                   compressor: dict) -> None:
  ts = _tensorstore()
  for level, (h, w) in enumerate(shapes):
    ts.open(_array_spec(os.path.join(group, str(level)), (channels, h, w), (1, tile, tile),
                        dtype, compressor)).result()


def _group(store: str, array: str) -> str:
  if array == 'image':
    return store
  if array == 'labels':
    return os.path.join(store, 'labels', LABEL_NAME)
  raise ValueError(f"array must be 'image' or 'labels', got {array!r}")


def _open_levels(group: str, workers: int | None) -> list:
  ts = _tensorstore()
  n = len(_read_json(os.path.join(group, '.zattrs'))['multiscales'][0]['datasets'])
  return [ts.open(_array_spec(os.path.join(group, str(level)), workers=workers)).result()
          for level in range(n)]


def _nearest2x(rows: np.ndarray) -> np.ndarray:
  """Label ids [2n, W, 1] -> [n, ceil(W/2), 1]: the top-left id of each 2x2 block."""
  return rows[::2, ::2]


class _ChunkRowWriter:
  """Gathers one level's rows into whole chunk rows (multiples of `chunk` rows from the
  top, or to the bottom) and writes each once; keeps at most two writes in flight."""

  def __init__(self, array, row0: int, chunk: int):
    self.array = array
    self.next_row = row0          # the level row the buffer starts at
    self.chunk = chunk
    self.parts: list[np.ndarray] = []
    self.buffered = 0
    self.in_flight: list = []

  def add(self, rows: np.ndarray) -> None:
    self.parts.append(rows)
    self.buffered += rows.shape[0]
    boundary = (self.next_row // self.chunk + 1) * self.chunk
    end = self.next_row + self.buffered
    if end >= boundary:
      self._write(end // self.chunk * self.chunk - self.next_row)

  def flush(self) -> None:
    """Writes what is buffered (the bottom of the level or of this writer's rows)."""
    self._write(self.buffered)
    for future in self.in_flight:
      future.result()
    self.in_flight = []

  def abandon(self) -> None:
    """Waits for the writes in flight (their errors ignored): after an error, so that
    nothing writes into the store while it is being removed."""
    for future in self.in_flight:
      with contextlib.suppress(Exception):
        future.result()
    self.in_flight = []

  def _write(self, n: int) -> None:
    if not n:
      return
    rows = np.concatenate(self.parts) if len(self.parts) > 1 else self.parts[0]
    block, rest = rows[:n], rows[n:]
    # [n, w, C] -> [C, n, w], a fresh array, so nothing the caller holds is shared.
    data = np.ascontiguousarray(block.transpose(2, 0, 1))
    # The WriteFutures object is kept: dropping a tensorstore future may cancel it.
    self.in_flight.append(self.array[:, self.next_row:self.next_row + n, :].write(data))
    self.next_row += n
    self.parts = [rest] if rest.shape[0] else []
    self.buffered = rest.shape[0]
    while len(self.in_flight) > 2:
      self.in_flight.pop(0).result()


def _as_rows(rows, array: str, channels: int, dtype) -> np.ndarray:
  if array == 'image':
    rows = writers.as_uint8(rows)
    if rows.shape[-1] != channels:
      raise ValueError(f'band has {rows.shape[-1]} channels, the store {channels}')
    return rows
  rows = np.asarray(rows)
  if rows.ndim != 2 or not np.issubdtype(rows.dtype, np.integer):
    raise ValueError(f'label bands must be integer [n, W], got {rows.dtype} {rows.shape}')
  info = np.iinfo(dtype)
  if rows.size and (rows.min() < 0 or rows.max() > info.max):
    raise ValueError(f'label ids must be in [0, {info.max}], got '
                     f'[{rows.min()}, {rows.max()}]')
  return rows.astype(dtype)[..., None]


def write_bands(store: str, bands: Iterable[tuple[int, Any]], *, array: str = 'image',
                levels: int | None = None, workers: int | None = None) -> tuple[int, int]:
  """Writes consecutive rows `(row_start, rows)` into a store made by `create_store`.

  Writes level 0 and, computed from these rows alone, levels 1..`levels`-1 (default:
  all). The first row must be a multiple of 2^(levels-1) and so must the row after the
  last unless it is the image's last row, so that every lower-level row comes from one
  writer; processes whose row ranges also start at multiples of `tile` * 2^(levels-1)
  share no chunk. Levels a caller leaves out can be built by `build_levels`.

  Args:
    store: the path `create_store` returned.
    bands: `(row_start, rows)` in order, without gaps; image rows `[n, W, C]` uint8 or
      [0, 1] float; for `array='labels'`, integer ids `[n, W]`.
    array: 'image' or 'labels'.
    levels: how many levels to write from these rows.
    workers: tensorstore's compression threads (default: its own, the CPU count).

  Returns:
    `(first_row, end_row)` written at level 0.
  """
  arrays = _open_levels(_group(store, array), workers)
  n_levels = len(arrays) if levels is None else int(levels)
  if not 1 <= n_levels <= len(arrays):
    raise ValueError(f'levels must be in [1, {len(arrays)}], got {levels}')
  arrays = arrays[:n_levels]
  align = 2 ** (n_levels - 1)
  reduce = writers.downsample2x if array == 'image' else _nearest2x
  out: list[_ChunkRowWriter] = []
  try:
    return _write_rows(bands, arrays, out, array, align, reduce)
  except BaseException:
    for writer in out:
      writer.abandon()
    raise


def _write_rows(bands, arrays, out: list, array: str, align: int, reduce):
  """`write_bands`' loop; appends its level writers to `out` (for the caller's cleanup)."""
  channels, height, width = arrays[0].shape
  shapes = [tuple(a.shape[1:]) for a in arrays]
  dtype = arrays[0].dtype.numpy_dtype
  chunk = arrays[0].chunk_layout.write_chunk.shape[1]
  pyramid, first, seen = None, None, None
  for row0, rows in bands:
    rows = _as_rows(rows, array, channels, dtype)
    if pyramid is None:
      if row0 % align or not 0 <= row0 < height:
        raise ValueError(f'first row {row0} must be in [0, {height}) and a multiple of '
                         f'{align} to write {len(arrays)} levels')
      first = seen = row0
      out.extend(_ChunkRowWriter(a, row0 // 2 ** level, chunk)
                 for level, a in enumerate(arrays))
      pyramid = writers.PyramidBuilder(shapes, lambda level, r: out[level].add(r), reduce)
    if row0 != seen or rows.shape[1] != width:
      raise ValueError(f'band at row {row0} of shape {rows.shape} does not continue '
                       f'row {seen} of a {(height, width)} image')
    rows = rows[:height - seen]
    seen += rows.shape[0]
    out[0].add(rows)
    pyramid.feed(0, rows)
  if pyramid is None:
    raise ValueError('no bands')
  if seen < height and seen % align:
    raise ValueError(f'rows end at {seen}: a multiple of {align} (or the last row, '
                     f'{height}) is needed to write {len(arrays)} levels')
  if seen == height:
    pyramid.finish([h - first // 2 ** level for level, (h, _) in enumerate(shapes)])
  for writer in out:
    writer.flush()
  return first, seen


def build_levels(store: str, from_level: int, *, array: str = 'image',
                 workers: int | None = None) -> None:
  """Builds levels `from_level`+1.. by reading `from_level` (complete) chunk row by chunk
  row: for multi-process runs whose writers wrote only the top levels."""
  group = _group(store, array)
  arrays = _open_levels(group, workers)
  if from_level + 1 >= len(arrays):
    return
  chunk = arrays[0].chunk_layout.write_chunk.shape[1]
  source = arrays[from_level]
  sub = arrays[from_level:]
  shapes = [tuple(a.shape[1:]) for a in sub]
  out = [_ChunkRowWriter(a, 0, chunk) for a in sub]
  reduce = writers.downsample2x if array == 'image' else _nearest2x
  pyramid = writers.PyramidBuilder(shapes, lambda level, r: out[level].add(r), reduce)
  for r0 in range(0, source.shape[1], chunk):
    rows = source[:, r0:r0 + chunk, :].read().result().transpose(1, 2, 0)
    pyramid.feed(0, rows)
  pyramid.finish()
  for writer in out[1:]:
    writer.flush()


def finalize(store: str, path) -> str:
  """Renames the finished temporary store to `path` (replacing an older store there).

  The old store is first moved aside under a hidden name, so `path` is, at every moment,
  absent or a complete store.
  """
  path = os.path.abspath(os.fspath(path))
  if os.path.abspath(store) != temp_store_path(path):
    raise ValueError(f'{store!r} is not the temporary store of {path!r}')
  old = None
  if os.path.lexists(path):
    folder, name = os.path.split(path)
    old = os.path.join(folder, f'.{name}.old')
    if os.path.lexists(old):
      shutil.rmtree(old)
    os.replace(path, old)
  os.replace(store, path)
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)
  return path


def write_ome_zarr(path, bands: Iterable[tuple[int, Any]], shape: Sequence[int], *,
                   labels=None, tile: int = writers.DEFAULT_TILE, levels: int | None = None,
                   mpp: float | None = None, compressor: dict | None = None,
                   workers: int | None = None) -> list[tuple[int, int]]:
  """One process: image bands (and label ids) into the OME-Zarr store `path`, atomically.

  Args:
    path: e.g. `.../sample0000.zarr`.
    bands: `(row_start, rows [n, W, C])` from row 0, in order (as `writers.write_tiff`).
    shape: `(H, W, C)`.
    labels: label ids `[H, W]` (an array, or any object sliceable by rows, e.g. a memmap)
      or None for no labels group; uint8 ids if all < 256, else uint16.
    tile, levels, mpp, compressor, workers: as `create_store` / `write_bands`.

  Returns:
    The level shapes `[(H, W), (ceil(H/2), ceil(W/2)), ...]`.
  """
  height, width = int(shape[0]), int(shape[1])
  labels_dtype = None
  if labels is not None:
    if tuple(labels.shape) != (height, width):
      raise ValueError(f'labels shape {tuple(labels.shape)} != image {(height, width)}')
    labels_dtype = np.uint8 if int(np.max(labels, initial=0)) < 256 else np.uint16
  store = create_store(path, shape, tile=tile, levels=levels, mpp=mpp,
                       labels_dtype=labels_dtype, compressor=compressor)
  try:
    _, end = write_bands(store, bands, workers=workers)
    if end != height:
      raise ValueError(f'bands ended at row {end}, expected {height}')
    if labels is not None:
      label_bands = ((r, labels[r:r + tile]) for r in range(0, height, tile))
      write_bands(store, label_bands, array='labels', workers=workers)
    finalize(store, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      shutil.rmtree(store)
    raise
  return writers.pyramid_shapes(height, width, tile, levels)
