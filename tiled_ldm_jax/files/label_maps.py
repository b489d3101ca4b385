"""Label maps as containers and files: lazy maps read by rows (`RowMap`, `LabelMap`), their
compact dtypes, and label PNGs (read, written atomically with a colour palette).

Every reader of label maps is under `files/` (`label_files.py`: TIFF / OME-Zarr sources,
`geojson_labels.py`: QuPath annotations, this file: PNG and the lazy map); the mask maths
(clean-up, resizing, latent maps) is `masks.py`, which imports this, never the reverse.
"""

from __future__ import annotations

import functools
import os
from typing import Sequence

import numpy as np
from PIL import Image

from tiled_ldm_jax.files import atomic
from tiled_ldm_jax.files import image_files

_HOW_TO_CONVERT = ('map each colour to its class id (0, 1, 2, ...) and save the ids as a '
                   'single-channel PNG: mode L (ids < 256), I;16 or palette P, e.g. '
                   'PIL.Image.fromarray(ids.astype(numpy.uint8)).save("mask.png")')
_READ_MODES = ('1', 'L', 'P', 'I', 'I;16', 'I;16L', 'I;16B', 'I;16N')


def _size_hw(size: int | Sequence[int]) -> tuple[int, int]:
  """`n` or `(h, w)` -> `(h, w)` of positive ints."""
  if isinstance(size, (int, np.integer)):
    h = w = int(size)
  else:
    if len(size) != 2:
      raise ValueError(f'size must be an int or (h, w), got {size!r}')
    h, w = (int(s) for s in size)
  if h <= 0 or w <= 0:
    raise ValueError(f'size must be positive, got {(h, w)}')
  return h, w


def _as_2d(m: np.ndarray, what: str) -> np.ndarray:
  """`[H, W]`, or `[1, H, W]` / `[1, 1, H, W]` (singleton leading dims) -> `[H, W]`."""
  m = np.asarray(m)
  if m.ndim < 2 or any(d != 1 for d in m.shape[:-2]):
    raise ValueError(f'{what} must be [H, W] (or with leading size-1 dims), got shape {m.shape}')
  return m.reshape(m.shape[-2:])


def _check_integer(labels: np.ndarray) -> None:
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f'labels must have an integer dtype, got {labels.dtype}')



def compact_dtype(max_id: int):
  """The smallest unsigned dtype that holds ids up to `max_id` (uint8, uint16, uint32)."""
  return next(d for d in (np.uint8, np.uint16, np.uint32) if max_id <= np.iinfo(d).max)


def compact(labels: np.ndarray) -> np.ndarray:
  """Non-negative integer ids in their smallest unsigned dtype (no copy if already)."""
  labels = np.asarray(labels)
  _check_integer(labels)
  if labels.size and labels.min() < 0:
    raise ValueError(f'label ids must be >= 0, got {labels.min()}')
  return labels.astype(compact_dtype(int(labels.max(initial=0))), copy=False)


@functools.lru_cache(maxsize=64)
def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
  """[n_out] source index of each output row (or column) of PIL's NEAREST resize, taken
  from PIL itself (the resize is separable): `resize_labels(src, (H, W))` equals
  `src[rows][:, cols]` (tests/test_masks.py)."""
  a = np.arange(n_in, dtype=np.int32)[None]
  out = np.asarray(Image.fromarray(a).resize((n_out, 1), Image.NEAREST), np.int32)[0]
  out.flags.writeable = False
  return out


class RowMap:
  """A label map [H, W] computed by rows (`rows(r0, r1)`), never held whole: it slices
  by row ranges like an array (`m[r0:r1]`, `m[r0:r1, cols]`), so the writers take it,
  and `np.asarray(m)` builds the whole map (PNG masks, the in-memory API). Subclasses set
  `shape`, `dtype` and give `rows` and `latent(factor)` (the map's [::f, ::f])."""
  ndim = 2
  shape: tuple[int, int]

  @property
  def size(self) -> int:
    return self.shape[0] * self.shape[1]

  def rows(self, r0: int, r1: int) -> np.ndarray:
    raise NotImplementedError

  def __getitem__(self, key):
    key = key if isinstance(key, tuple) else (key,)
    rows, cols = (key + (slice(None),))[:2]
    if not isinstance(rows, slice) or rows.step not in (None, 1):
      raise TypeError(f'{type(self).__name__} slices by row ranges, m[r0:r1] or m[r0:r1, cols]')
    r0, r1, _ = rows.indices(self.shape[0])
    return self.rows(r0, max(r0, r1))[:, cols]

  def __array__(self, dtype=None, copy=None):
    del copy
    whole = self.rows(0, self.shape[0])
    return whole if dtype is None else whole.astype(dtype)

  def _check_factor(self, factor: int) -> None:
    h, w = self.shape
    if factor <= 0 or h % factor or w % factor:
      raise ValueError(f'label map {h}x{w} is not divisible by the latent factor {factor}')


class LabelMap(RowMap):
  """A label map [H, W] held as a source map and its nearest resize, never whole.

  `source` is an array, kept in its compact dtype (`compact`), or a row reader (a tiled
  TIFF or an OME-Zarr labels array on disk: `.shape`, `.dtype`, `.ids` the sorted ids it
  holds, `.read_rows(r0, r1)`). Rows, bands and the latent-resolution map are computed
  from it on demand and equal `resize_labels(source, (H, W))` sliced. It slices by rows
  like an array (`m[r0:r1]`), so the OME-Zarr writer takes it; `np.asarray(m)` builds the
  whole map (for PNG masks and the in-memory API).
  """
  READ_ROWS = 512    # source rows per read of a lazy source (latent map, present ids)

  def __init__(self, source, hw):
    if not hasattr(source, 'read_rows'):
      source = compact(_as_2d(source, 'label map'))
    self.source = source
    self.shape = _size_hw(hw)
    self.dtype = source.dtype
    self._rows = _nearest_index(source.shape[0], self.shape[0])
    self._cols = _nearest_index(source.shape[1], self.shape[1])

  def _source_rows(self, index: np.ndarray) -> np.ndarray:
    """Source rows at `index` (sorted, any count), [len(index), w_source]."""
    if not hasattr(self.source, 'read_rows'):
      return self.source[index]
    out = []
    i = 0
    while i < len(index):   # one read per READ_ROWS source rows
      lo = index[i]
      j = int(np.searchsorted(index, lo + self.READ_ROWS, side='left'))
      block = self.source.read_rows(int(lo), int(index[j - 1]) + 1)
      out.append(block[index[i:j] - lo])
      i = j
    return np.concatenate(out) if out else np.zeros((0, self.source.shape[1]), self.dtype)

  def rows(self, r0: int, r1: int) -> np.ndarray:
    """Rows [r0, r1) of the map, [r, W]."""
    return self._source_rows(self._rows[r0:r1])[:, self._cols]

  def latent(self, factor: int) -> np.ndarray:
    """`np.asarray(self)[::f, ::f]` without the whole map: [H / f, W / f]."""
    self._check_factor(factor)
    return self._source_rows(self._rows[::factor])[:, self._cols[::factor]]

  def present(self) -> list[int]:
    """Sorted ids that occur in the map (those of the source the resize keeps; for a
    lazy source, those the source holds)."""
    if hasattr(self.source, 'read_rows'):
      return list(self.source.ids)
    used = self.source[np.unique(self._rows)][:, np.unique(self._cols)]
    return [int(v) for v in np.unique(used)]

  def _ids(self) -> list[int]:
    if hasattr(self.source, 'read_rows'):
      return list(self.source.ids)
    return [int(self.source.min()), int(self.source.max())] if self.source.size else []

  def max(self, axis=None, out=None, initial=None, **unused):
    del axis, out, unused
    return max(self._ids() + ([] if initial is None else [initial]))

  def min(self, axis=None, out=None, initial=None, **unused):
    del axis, out, unused
    return min(self._ids() + ([] if initial is None else [initial]))


def read_label_png(path: str | os.PathLike) -> np.ndarray:
  """Reads a PNG of label ids.

  Accepts gray (L, 1, I, I;16) and palette (P: the palette indices are the ids) images,
  and RGB only where the three channels agree at every pixel.

  Args:
    path: the PNG file.

  Returns:
    int32 `[H, W]`.
  """
  path = os.fspath(path)
  # copies=5: Pillow's pixels plus the int32 ids made of them (checked from the header)
  with image_files.open_image(path, image_files.LABEL_FORMATS, what='label PNG',
                              copies=5) as img:
    mode = img.mode
    if mode == 'RGB':
      rgb = np.asarray(img)
      if not ((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 0] == rgb[..., 2]).all()):
        raise ValueError(f'{path}: RGB image whose channels differ is not a label map; '
                         + _HOW_TO_CONVERT)
      return rgb[..., 0].astype(np.int32)
    if mode not in _READ_MODES:
      raise ValueError(f'{path}: image mode {mode!r} is not a label map (expected one of '
                       f'{", ".join(_READ_MODES)} or gray RGB); ' + _HOW_TO_CONVERT)
    return np.asarray(img).astype(np.int32)


def write_label_png(path: str | os.PathLike, labels: np.ndarray) -> None:
  """Writes label ids as a PNG: a palette PNG (mode 'P') if `max < 256`, else 16-bit
  gray ('I;16').

  In a palette PNG the pixel values are the ids (`np.asarray(Image.open(path))` and
  `read_label_png` give them back) and the palette is `colour_labels`' colours, so any
  viewer shows the classes in colour instead of near-black gray levels 0..4.

  The file is written under a temporary name in the same folder and then renamed
  (`atomic.atomic_path`), so `path` is never a half-written PNG.

  Args:
    path: destination.
    labels: integer `[H, W]`, values in `[0, 65536)`.
  """
  labels = np.asarray(labels)
  if labels.ndim != 2:
    raise ValueError(f'labels must be [H, W], got shape {labels.shape}')
  _check_integer(labels)
  if labels.size and (labels.min() < 0 or labels.max() >= 1 << 16):
    raise ValueError(f'label values must be in [0, 65536) for a PNG, '
                     f'got [{labels.min()}, {labels.max()}]')
  wide = labels.size and labels.max() >= 256
  img = Image.fromarray(np.ascontiguousarray(labels, dtype=np.uint16 if wide else np.uint8))
  if not wide:
    img.putpalette(label_palette())   # mode L -> P: the pixel values (the ids) are kept
  with atomic.atomic_path(path) as tmp:
    img.save(tmp, format='PNG')


# Distinct colours for label ids 0..7 (0, the unknown/background label, is white);
# larger ids cycle.
LABEL_COLOURS = np.array([[255, 255, 255], [214, 39, 40], [44, 160, 44], [31, 119, 180],
                           [255, 187, 0], [148, 103, 189], [140, 86, 75], [23, 190, 207]],
                          np.uint8)


def label_palette() -> bytes:
  """The 256-entry RGB palette of label PNGs: `colour_labels`' colour of each id."""
  return LABEL_COLOURS[np.arange(256) % len(LABEL_COLOURS)].tobytes()
