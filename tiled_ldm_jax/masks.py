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

Label maps elsewhere are integer arrays `[H, W]` of class ids, or a lazy map
(`files/label_maps.py`: `LabelMap`, a small source map plus its nearest resize computed by
rows on demand, so a whole-slide map is never held at pixel resolution); reading and
writing them is `files/`'s business. Only numpy and Pillow are used here.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image

from tiled_ldm_jax.files import label_maps
# The label-map containers and files live in `files/label_maps.py`; these names are
# used by the mask maths below.
from tiled_ldm_jax.files.label_maps import _as_2d, _check_integer, _size_hw  # pylint: disable=unused-import

MIN_FILTER_SIZE = 6


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
      label_maps.compact_dtype(num_labels - 1))                      # the same ids as the formula
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


def colour_labels(labels: np.ndarray) -> np.ndarray:
  """Label ids [H, W] -> uint8 RGB [H, W, 3] for viewing (ids cycle through 8 colours)."""
  labels = _as_2d(np.asarray(labels), 'labels')
  _check_integer(labels)
  return label_maps.LABEL_COLOURS[np.mod(labels, len(label_maps.LABEL_COLOURS))]


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
