"""Label masks: quantizing decoded mask images, `CleanMask`, and label-map helpers.

The mask pipeline (SPEC section 5): the mask model's decoded image (float, ~[0, 1]) is
quantized to `num_labels` levels with `quantize_mask_image`, then `clean_mask` turns it
into integer label ids at the requested size, exactly as DiffInfinite's `CleanMask`:

1. 8-bit gray by truncation, `uint8(m * 255)`;
2. every pixel with a differing 4-neighbour (edges replicated) is set to 0 -- both
   sides of every boundary (`find_boundaries`, connectivity 1, mode 'thick');
3. a 6x6 minimum filter over the valid extent (each side shrinks by 5);
4. `round((num_labels - 1) * v / 255)` to label ids;
5. nearest-neighbour resize with PIL.

Label maps elsewhere are integer arrays `[H, W]` of class ids, or a `LabelMap`: a
small source map (the mask model's cleaned map, a label file) in its compact dtype plus
the nearest resize to the image size, computed by rows on demand, so a whole-slide map
is never held at pixel resolution. Only numpy and Pillow are used here.
"""

from __future__ import annotations

import functools
import os
from typing import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image

from tiled_ldm_jax.files import atomic
from tiled_ldm_jax.files import image_files

MIN_FILTER_SIZE = 6
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


def quantize_mask_image(img: np.ndarray, num_labels: int) -> np.ndarray:
  """Quantizes a decoded mask image to `num_labels` gray levels.

  Per channel `round(k * img)` with `k = num_labels - 1`, then the channel mean,
  rounded again (round half to even, like torch.round), then `/ k`.

  Args:
    img: float image, `[N, H, W, C]` or `[H, W, C]`, values ~[0, 1] (values outside
      are clipped, as the tiled decode clips).
    num_labels: number of labels, >= 2.

  Returns:
    float32 `[N, H, W]` or `[H, W]` with values in `{0, 1/k, ..., 1}`.
  """
  if num_labels < 2:
    raise ValueError(f'num_labels must be >= 2, got {num_labels}')
  img = np.asarray(img, dtype=np.float32)
  if img.ndim not in (3, 4):
    raise ValueError(f'mask image must be HWC or NHWC, got shape {img.shape}')
  k = np.float32(num_labels - 1)
  levels = np.round(k * np.clip(img, 0.0, 1.0))
  return (np.round(levels.mean(axis=-1)) / k).astype(np.float32)


def find_boundaries(g: np.ndarray) -> np.ndarray:
  """Pixels with a differing 4-neighbour, edges replicated ('thick': both sides).

  Args:
    g: `[H, W]` array.

  Returns:
    bool `[H, W]`.
  """
  p = np.pad(g, 1, mode='edge')
  c = p[1:-1, 1:-1]
  return ((p[:-2, 1:-1] != c) | (p[2:, 1:-1] != c) |
          (p[1:-1, :-2] != c) | (p[1:-1, 2:] != c))


def min_filter_valid(g: np.ndarray, size: int = MIN_FILTER_SIZE) -> np.ndarray:
  """`size x size` minimum over the valid extent: `out[i, j] = min g[i:i+size, j:j+size]`.

  Args:
    g: `[H, W]` array, `H, W >= size`.

  Returns:
    `[H - size + 1, W - size + 1]`, same dtype.
  """
  if g.shape[0] < size or g.shape[1] < size:
    raise ValueError(f'min filter of size {size} needs an image at least that big, got {g.shape}')
  rows = sliding_window_view(g, size, axis=1).min(axis=-1)   # separable: rows, then columns
  return sliding_window_view(rows, size, axis=0).min(axis=-1)


def clean_mask(m: np.ndarray, num_labels: int, out_size: int | Sequence[int]) -> np.ndarray:
  """DiffInfinite's `CleanMask`: quantized mask image -> label ids at `out_size`.

  Args:
    m: quantized mask `[H, W]` (or `[1, H, W]`), values `k / (num_labels - 1)` in [0, 1];
      `H, W >= 6`.
    num_labels: number of labels, >= 2.
    out_size: `n` or `(h, w)` of the returned map.

  Returns:
    int32 `[h, w]` label ids in `[0, num_labels)`.
  """
  if num_labels < 2:
    raise ValueError(f'num_labels must be >= 2, got {num_labels}')
  m = _as_2d(m, 'mask')
  if not np.issubdtype(m.dtype, np.floating):
    raise ValueError(f'mask must be float with values in [0, 1], got dtype {m.dtype}')
  if m.size and (m.min() < 0 or m.max() > 1):
    raise ValueError(f'mask values must be in [0, 1], got [{m.min()}, {m.max()}]')
  return resize_labels(clean_gray(mask_gray(m), num_labels), _size_hw(out_size))


def mask_gray(m: np.ndarray) -> np.ndarray:
  """Step 1 of `clean_mask`: a quantized mask (any shape) as 8-bit gray by truncation.
  Per pixel, so it may run band by band."""
  return (np.asarray(m) * 255).astype(np.uint8)


CLEAN_BAND_ROWS = 256   # output rows per band of `clean_gray` (bounded temporaries)


def _boundaries_rows(gray: np.ndarray, r0: int, r1: int) -> np.ndarray:
  """`find_boundaries(gray)[r0:r1]` from rows r0 - 1 .. r1 only (edges replicated at the
  image's own top and bottom, as the whole-image version)."""
  lo, hi = max(r0 - 1, 0), min(r1 + 1, gray.shape[0])
  band = gray[lo:hi]
  band = np.pad(band, ((1 if r0 == 0 else 0, 1 if r1 == gray.shape[0] else 0), (0, 0)),
                mode='edge')
  return find_boundaries(band)[1:-1]


def clean_gray(gray: np.ndarray, num_labels: int,
               band_rows: int = CLEAN_BAND_ROWS) -> np.ndarray:
  """Steps 2-4 of `clean_mask` on the 8-bit gray mask [H, W] (H, W >= 6): label ids
  [H - 5, W - 5], uint8 (num_labels <= 256) else uint16, before the resize.

  Both filters are local (the boundary test reads one row each side, the minimum filter
  the next 5), so output rows are computed in bands of `band_rows` from their input rows
  plus that halo: temporaries of a band, ids equal to the whole-image formula.
  """
  h, w = gray.shape
  if h < MIN_FILTER_SIZE or w < MIN_FILTER_SIZE:
    raise ValueError(f'min filter of size {MIN_FILTER_SIZE} needs an image at least that '
                     f'big, got {gray.shape}')
  lut = np.round((num_labels - 1) * np.arange(256, dtype=np.float64) / 255).astype(
      compact_dtype(num_labels - 1))                      # the same ids as the formula
  out = np.empty((h - MIN_FILTER_SIZE + 1, w - MIN_FILTER_SIZE + 1), lut.dtype)
  for a in range(0, out.shape[0], band_rows):
    b = min(a + band_rows, out.shape[0])
    r1 = b + MIN_FILTER_SIZE - 1                          # input rows a .. r1 - 1
    g = np.where(_boundaries_rows(gray, a, r1), np.uint8(0), gray[a:r1])
    out[a:b] = lut[min_filter_valid(g)]
  return out


def resize_labels(labels: np.ndarray, size: int | Sequence[int]) -> np.ndarray:
  """Nearest-neighbour resize of a label map with PIL (32-bit mode 'I', so any int32 id survives).

  Args:
    labels: integer `[H, W]`, values within int32.
    size: `n` or `(h, w)`.

  Returns:
    int32 `[h, w]`.
  """
  labels = np.asarray(labels)
  if labels.ndim != 2:
    raise ValueError(f'labels must be [H, W], got shape {labels.shape}')
  _check_integer(labels)
  info = np.iinfo(np.int32)
  if labels.size and (labels.min() < info.min or labels.max() > info.max):
    raise ValueError('label values do not fit in int32')
  h, w = _size_hw(size)
  img = Image.fromarray(np.ascontiguousarray(labels, dtype=np.int32))
  return np.asarray(img.resize((w, h), Image.NEAREST), dtype=np.int32)


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


def latent_label_maps(labels, factor: int) -> np.ndarray:
  """[N, H/f, W/f] int32 latent-resolution maps of pixel maps [N, H, W]: an array, or a
  sequence of lazy maps (`LabelMap`, `files.geojson_labels.GeoJSONLabels`: anything with
  `latent(f)`), each read at latent resolution only."""
  if isinstance(labels, np.ndarray) or not all(hasattr(m, 'latent') for m in labels):
    return latent_labels(np.asarray(labels), factor).astype(np.int32)
  once = {}    # a batch repeats one given map: rasterize / read it once
  for m in labels:
    if id(m) not in once:
      once[id(m)] = m.latent(factor).astype(np.int32)
  return np.stack([once[id(m)] for m in labels])


def labels_shape(labels) -> tuple[int, ...]:
  """[N, H, W] of an array or a sequence of `LabelMap`s."""
  if isinstance(labels, np.ndarray):
    return labels.shape
  return (len(labels),) + tuple(labels[0].shape) if len(labels) else (0,)


def latent_labels(labels: np.ndarray, factor: int = 8) -> np.ndarray:
  """A pixel-resolution label map at latent resolution by nearest sampling, `labels[::f, ::f]`.

  Args:
    labels: `[..., H, W]`, `H` and `W` divisible by `factor`.
    factor: the VAE's downsampling factor.

  Returns:
    `[..., H / factor, W / factor]`, same dtype.
  """
  labels = np.asarray(labels)
  if labels.ndim < 2:
    raise ValueError(f'labels must be [..., H, W], got shape {labels.shape}')
  h, w = labels.shape[-2:]
  if factor <= 0 or h % factor or w % factor:
    raise ValueError(f'label map {h}x{w} is not divisible by the latent factor {factor}')
  return labels[..., ::factor, ::factor]


def _check_integer(labels: np.ndarray) -> None:
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f'labels must have an integer dtype, got {labels.dtype}')


def validate_labels(labels: np.ndarray, num_classes: int) -> np.ndarray:
  """Checks that every label id is an integer in `[0, num_classes)`.

  Args:
    labels: integer array of any shape.
    num_classes: number of classes the model knows.

  Returns:
    `labels` unchanged (as an ndarray).

  Raises:
    ValueError: non-integer dtype, or out-of-range values (they are listed).
  """
  labels = np.asarray(labels)
  _check_integer(labels)
  if labels.size == 0 or (labels.min() >= 0 and labels.max() < num_classes):
    return labels    # no temporaries of the labels' size (whole-slide maps are GiBs)
  bad = np.unique(labels[(labels < 0) | (labels >= num_classes)])
  if bad.size:
    shown = ', '.join(str(v) for v in bad[:20]) + (', ...' if bad.size > 20 else '')
    raise ValueError(f'label values out of range [0, {num_classes}): {shown}')
  return labels


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
_LABEL_COLOURS = np.array([[255, 255, 255], [214, 39, 40], [44, 160, 44], [31, 119, 180],
                           [255, 187, 0], [148, 103, 189], [140, 86, 75], [23, 190, 207]],
                          np.uint8)


def label_palette() -> bytes:
  """The 256-entry RGB palette of label PNGs: `colour_labels`' colour of each id."""
  return _LABEL_COLOURS[np.arange(256) % len(_LABEL_COLOURS)].tobytes()


def colour_labels(labels: np.ndarray) -> np.ndarray:
  """Label ids [H, W] -> uint8 RGB [H, W, 3] for viewing (ids cycle through 8 colours)."""
  labels = _as_2d(np.asarray(labels), 'labels')
  _check_integer(labels)
  return _LABEL_COLOURS[np.mod(labels, len(_LABEL_COLOURS))]


def preview(image: np.ndarray, labels: np.ndarray, width: int, gap: int = 8) -> np.ndarray:
  """Side by side, downscaled to `width` px in all: the image and its coloured labels."""
  from PIL import Image
  image = np.asarray(image)
  if image.shape[:2] != np.shape(labels):
    raise ValueError(f'image {image.shape[:2]} and labels {np.shape(labels)} differ in size')
  half = (width - gap) // 2
  h = max(1, round(image.shape[0] * half / image.shape[1]))
  img = np.asarray(Image.fromarray(image).resize((half, h), Image.LANCZOS))
  lab = np.asarray(Image.fromarray(colour_labels(labels)).resize((half, h), Image.NEAREST))
  return np.concatenate([img, np.full((h, gap, 3), 255, np.uint8), lab], axis=1)
