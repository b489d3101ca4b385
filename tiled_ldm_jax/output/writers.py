"""Writing decoded images and their label masks to disk.

- PNG / JPEG (Pillow) for images that fit in memory: `write_image`.
- Tiled, pyramidal BigTIFF (tifffile) for large images: `write_tiff` consumes
  `(row_start, rows)` bands, e.g. from `decode.iter_decode_bands`, and never holds the
  image. Level 0 goes to tifffile tile by
  tile (a buffer of one tile row, `tile` pixel rows, plus the band being consumed). Each
  level l >= 1 is the 2x2 box mean (rounded, `(a+b+c+d+2)//4`) of level l-1, an odd last
  row/column being paired with itself, so level shapes are `ceil(side / 2)`; levels are
  computed from the rows as they stream and spooled to anonymous temporary files (1/3 of
  level 0's bytes in all, on disk, not in memory), then written after level 0 as
  successive reduced-resolution IFDs, the pyramid OpenSlide reads (generic tiled TIFF);
  `TiffFile(path).series[0].levels` lists them all. Tiles are JPEG (YCbCr 4:2:0,
  Pillow; the default: 3-5x smaller than zlib and faster, see docs/generate.md; tifffile
  decodes it with imagecodecs, `files.tiff_rows` with Pillow alone), zlib (the standard
  library's; any TIFF reader) or raw, compressed on a thread pool; `mpp` becomes the TIFF
  resolution (OpenSlide's `openslide.mpp-x/y`).
- OME-Zarr stores (NGFF 0.4, image levels + labels): `tiled_ldm_jax.output.ome_zarr`.
- Label masks beside the image (`mask_path`): PNG of label ids (`label_maps.write_label_png`)
  or, for `.tif`/`.tiff`, a tiled TIFF of label ids (uint8, or uint16 when an id is
  >= 256).

Every file is written under a temporary name in the destination folder and renamed
(`os.replace`) only once complete, so the final name never holds a partial file;
on any error the temporary file is removed.

Images are uint8 `[H, W, C]` (C = 1, 3 or 4) or float in [0, 1], converted with
`decode.to_uint8` (truncation, as the original's PNG saving).
"""

from __future__ import annotations

import collections
import concurrent.futures
import io
import os
import tempfile
import zlib
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from tiled_ldm_jax import decode as decode_lib
from tiled_ldm_jax.files.atomic import atomic_path  # re-exported: writers use the one helper
from tiled_ldm_jax.files import label_maps

PIL_FORMATS = {'.png': 'PNG', '.jpg': 'JPEG', '.jpeg': 'JPEG'}
TIFF_SUFFIXES = ('.tif', '.tiff')
DEFAULT_TILE = 256
DEFAULT_BUFFER_BYTES = 8 << 20    # tifffile's encode buffer (its default is 512 MiB)


def _tifffile():
  try:
    import tifffile  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError('writing TIFF needs tifffile (a dependency): pip install tifffile'
                      ) from e
  return tifffile


def _suffix(path) -> str:
  return os.path.splitext(os.fspath(path))[1].lower()


def as_uint8(img) -> np.ndarray:
  """uint8 `[H, W, C]` as is; float via `decode.to_uint8`; `[1, H, W, C]` squeezed."""
  img = np.asarray(img)
  if img.ndim == 4 and img.shape[0] == 1:
    img = img[0]
  if img.ndim == 2:
    img = img[..., None]
  if img.ndim != 3 or img.shape[-1] not in (1, 3, 4):
    raise ValueError(f'image must be [H, W, C] with C in (1, 3, 4), got {np.shape(img)}')
  if img.dtype == np.uint8:
    return img
  if not np.issubdtype(img.dtype, np.floating):
    raise ValueError(f'image must be uint8 or float in [0, 1], got {img.dtype}')
  return decode_lib.to_uint8(img)


def write_image(path, img, *, quality: int = 95) -> None:
  """PNG or JPEG (by suffix) with Pillow, atomically. `img`: uint8 or [0, 1] float."""
  fmt = PIL_FORMATS.get(_suffix(path))
  if fmt is None:
    raise ValueError(f'write_image writes {sorted(PIL_FORMATS)}, got {path!r} '
                     f'(use write_tiff for {TIFF_SUFFIXES})')
  img = as_uint8(img)
  if fmt == 'JPEG' and img.shape[-1] == 4:
    raise ValueError('JPEG has no alpha channel')
  pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
  kwargs = {'quality': quality} if fmt == 'JPEG' else {}
  with atomic_path(path) as tmp:
    pil.save(tmp, format=fmt, **kwargs)


# ----------------------------------------------------------------------------- TIFF

TIFF_COMPRESSIONS = ('jpeg', 'zlib', 'none')
DEFAULT_JPEG_QUALITY = 90
ZLIB_LEVEL = 6


def pyramid_shapes(height: int, width: int, tile: int = DEFAULT_TILE,
                   levels: int | None = None) -> list[tuple[int, int]]:
  """Level shapes: halved (ceil) until the level fits one tile, or `levels` of them."""
  shapes = [(height, width)]
  while (len(shapes) < levels) if levels is not None else max(shapes[-1]) > tile:
    h, w = shapes[-1]
    if h == 1 and w == 1:
      break
    shapes.append((-(-h // 2), -(-w // 2)))
  return shapes


def downsample2x(rows: np.ndarray) -> np.ndarray:
  """uint8 [2n, W, C] -> [n, ceil(W/2), C], rounded 2x2 mean (odd last column doubled)."""
  if rows.shape[1] % 2:
    rows = np.concatenate([rows, rows[:, -1:]], axis=1)
  n, w, c = rows.shape
  # Row pairs, and pixel pairs seen as 2C samples: two contiguous adds (a multi-axis
  # sum over a strided 5-d view is ~20x slower and was the writers' bottleneck).
  pairs = rows.reshape(n // 2, 2, w // 2, 2 * c)
  s = pairs[:, 0].astype(np.uint16)
  s += pairs[:, 1]
  s = s[..., :c] + s[..., c:]
  s += 2
  s >>= 2
  return s.astype(np.uint8)


class PyramidBuilder:
  """Levels 1.. from level-0 rows as they stream, handed to `sink(level, rows)` in order.

  `reduce` maps an even number of rows of one level to half as many of the next (default
  `downsample2x`; label ids use nearest). A level with an odd height pairs its last row
  with itself in `finish`, so level heights are `ceil(h / 2)`. Holds at most one row per
  level between calls.
  """

  def __init__(self, shapes: Sequence[tuple[int, int]], sink, reduce=downsample2x):
    self.shapes = list(shapes)
    self.sink = sink
    self.reduce = reduce
    self.pending: list[np.ndarray | None] = [None] * len(shapes)   # an odd leftover row
    self.emitted = [0] * len(shapes)

  def feed(self, level: int, rows: np.ndarray) -> None:
    """Rows of `level` (in order) -> rows of `level + 1` (to the sink), recursively."""
    if level + 1 >= len(self.shapes) or not rows.shape[0]:
      return
    if self.pending[level] is not None:
      rows = np.concatenate([self.pending[level], rows])
      self.pending[level] = None
    even = rows.shape[0] // 2 * 2
    if even < rows.shape[0]:
      self.pending[level] = rows[even:].copy()
    if even:
      self._emit(level + 1, self.reduce(rows[:even]))

  def _emit(self, level: int, rows: np.ndarray) -> None:
    self.sink(level, rows)
    self.emitted[level] += rows.shape[0]
    self.feed(level, rows)

  def finish(self, expected: Sequence[int] | None = None) -> None:
    """Flushes odd last rows; checks each level got `expected` rows (default: its height)."""
    for level in range(len(self.shapes) - 1):
      if self.pending[level] is not None:
        row, self.pending[level] = self.pending[level], None
        self._emit(level + 1, self.reduce(np.concatenate([row, row])))
    expected = expected or [h for h, _ in self.shapes]
    for level in range(1, len(self.shapes)):
      if self.emitted[level] != expected[level]:
        raise RuntimeError(f'pyramid level {level}: {self.emitted[level]} rows, '
                           f'expected {expected[level]}')


class _RowSpool:
  """Rows of levels 1.. in anonymous temporary files (on disk, not in memory)."""

  def __init__(self, shapes: Sequence[tuple[int, int]], channels: int, folder: str):
    self.shapes = list(shapes)
    self.channels = channels
    self.files = [None] + [tempfile.TemporaryFile(dir=folder) for _ in shapes[1:]]

  def write(self, level: int, rows: np.ndarray) -> None:
    self.files[level].write(np.ascontiguousarray(rows).tobytes())

  def read_rows(self, level: int, chunk: int) -> Iterator[np.ndarray]:
    h, w = self.shapes[level]
    f = self.files[level]
    f.flush()
    f.seek(0)
    row_bytes = w * self.channels
    for r0 in range(0, h, chunk):
      n = min(chunk, h - r0)
      buf = f.read(n * row_bytes)
      if len(buf) != n * row_bytes:
        raise RuntimeError(f'pyramid level {level}: short read')
      yield np.frombuffer(buf, np.uint8).reshape(n, w, self.channels)

  def close(self) -> None:
    for f in self.files[1:]:
      f.close()


def _tiles(chunks: Iterable[np.ndarray], width: int, channels: int,
           tile: int) -> Iterator[np.ndarray]:
  """Row chunks [n, W, C] (any n) -> tiles [<=tile, <=tile, C], row-major, copied."""
  buf = np.empty((tile, width, channels), np.uint8)
  fill = 0

  def emit(rows):
    for x in range(0, width, tile):
      yield rows[:, x:x + tile].copy()     # a copy: `buf` is refilled while tiles encode

  for rows in chunks:
    i = 0
    while i < rows.shape[0]:
      take = min(tile - fill, rows.shape[0] - i)
      buf[fill:fill + take] = rows[i:i + take]
      fill, i = fill + take, i + take
      if fill == tile:
        yield from emit(buf)
        fill = 0
  if fill:
    yield from emit(buf[:fill])


def _pad_tile(t: np.ndarray, tile: int) -> np.ndarray:
  """Edge tiles to the full tile (TIFF stores whole tiles); edge values keep JPEG's
  blocks at the border smooth (zeros would ring into the visible pixels)."""
  ph, pw = tile - t.shape[0], tile - t.shape[1]
  if not ph and not pw:
    return t
  return np.pad(t, ((0, ph), (0, pw), (0, 0)), mode='edge')


def _tile_encoder(compression: str, channels: int, tile: int, jpeg_quality: int):
  """A function: tile [<=tile, <=tile, C] uint8 -> the tile's bytes as stored."""
  def raw(t):
    return _pad_tile(t, tile).tobytes()

  def deflate(t):
    # TIFF horizontal predictor (Predictor 2): each sample minus its left neighbour's,
    # modulo 256. A third smaller and ~3x faster to deflate on image content.
    t = _pad_tile(t, tile)
    d = t.copy()
    d[:, 1:] -= t[:, :-1]
    return zlib.compress(d.tobytes(), ZLIB_LEVEL)

  # RGB: 4:2:0 chroma subsampling, as written in the YCbCrSubSampling tag (2, 2).
  # Grayscale: libjpeg's 1x1 sampling (libtiff rejects a single component at 2x2).
  jpeg_args = {'quality': jpeg_quality, **({'subsampling': 2} if channels == 3 else {})}

  def jpeg(t):
    t = _pad_tile(t, tile)
    buf = io.BytesIO()
    Image.fromarray(t[..., 0] if channels == 1 else t).save(buf, format='JPEG', **jpeg_args)
    return buf.getvalue()

  return {'none': raw, 'zlib': deflate, 'jpeg': jpeg}[compression]


def _parallel_map(fn, items: Iterable[Any], workers: int) -> Iterator[Any]:
  """`map(fn, items)` in order, on `workers` threads, at most 2 * workers items in flight.

  Pillow's JPEG encoder and zlib release the GIL, so tiles compress in parallel while the
  consumer (tifffile writing bytes) stays sequential; the bound keeps memory at a few
  tiles however fast the producer is.
  """
  if workers <= 1:
    yield from map(fn, items)
    return
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    pending = collections.deque()
    try:
      for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= 2 * workers:
          yield pending.popleft().result()
      while pending:
        yield pending.popleft().result()
    finally:
      for f in pending:
        f.cancel()


def default_workers() -> int:
  """Compression threads: the CPUs this process may use."""
  try:
    return max(1, len(os.sched_getaffinity(0)))
  except AttributeError:
    return max(1, os.cpu_count() or 1)


def _allow_preencoded(tifffile, compression: str) -> None:
  """Lets tifffile write tiles we encoded ourselves without its JPEG codec.

  tifffile resolves an encoder for the Compression tag even when given encoded bytes
  (which it writes verbatim), and its JPEG encoder needs imagecodecs; we encode with
  Pillow, so an encoder that refuses to run stands in when imagecodecs is absent.
  """
  if compression != 'jpeg':
    return
  registry = tifffile.TIFF.COMPRESSORS
  if 7 in registry:                   # imagecodecs is installed: nothing to do
    return
  def refuse(*args, **kwargs):
    raise RuntimeError('tiled_ldm_jax passes JPEG tiles to tifffile already encoded')
  try:
    registry._codecs[7] = refuse   # pylint: disable=protected-access
  except AttributeError as e:
    raise ImportError('this tifffile version cannot write pre-encoded JPEG tiles; '
                      'pip install imagecodecs, or use compression="zlib"') from e


def _resolution(mpp: float | None, level: int) -> dict[str, Any]:
  """TIFF resolution for `mpp` microns per pixel at level 0 (None: no resolution tags).

  Pixels per centimetre, unit CENTIMETER: what OpenSlide turns into openslide.mpp-x/y
  (10^4 / resolution). Level l's pixels are 2^l times wider.
  """
  if mpp is None:
    return {}
  per_cm = 1e4 / (float(mpp) * 2 ** level)
  return {'resolution': (per_cm, per_cm), 'resolutionunit': 'CENTIMETER'}


def _check_tiff_args(path, channels: int, tile: int, compression: str,
                     jpeg_quality: int, mpp) -> None:
  if _suffix(path) not in TIFF_SUFFIXES:
    raise ValueError(f'write_tiff writes {TIFF_SUFFIXES}, got {path!r}')
  if channels not in (1, 3, 4):
    raise ValueError(f'channels must be 1, 3 or 4, got {channels}')
  if tile % 16 or tile <= 0:
    raise ValueError(f'TIFF tiles must be a positive multiple of 16, got {tile}')
  if compression not in TIFF_COMPRESSIONS:
    raise ValueError(f'compression must be one of {TIFF_COMPRESSIONS}, got {compression!r}')
  if compression == 'jpeg' and channels == 4:
    raise ValueError('JPEG has no alpha channel: use compression="zlib" for RGBA')
  if not 1 <= jpeg_quality <= 100:
    raise ValueError(f'jpeg_quality must be in [1, 100], got {jpeg_quality}')
  if mpp is not None and not mpp > 0:
    raise ValueError(f'mpp must be positive microns per pixel, got {mpp}')


def write_tiff(path, bands: Iterable[tuple[int, Any]], shape: Sequence[int], *,
               tile: int = DEFAULT_TILE, levels: int | None = None,
               compression: str | None = 'jpeg', jpeg_quality: int = DEFAULT_JPEG_QUALITY,
               mpp: float | None = None, workers: int | None = None
               ) -> list[tuple[int, int]]:
  """Streams bands into a tiled, pyramidal BigTIFF that OpenSlide reads, atomically.

  Levels are successive top-level IFDs (level 0, then each halved level marked as a
  reduced-resolution image, NewSubfileType 1), the layout of OpenSlide's generic tiled
  TIFF; tifffile reads them as one series with `levels`.

  Args:
    path: destination (.tif / .tiff).
    bands: `(row_start, rows [n, W, C])` in order, covering rows 0..H; uint8 or [0, 1]
      float (converted with `decode.to_uint8`).
    shape: `(H, W, C)` (C in 1, 3, 4; JPEG: 1 or 3).
    tile: TIFF tile side (a multiple of 16).
    levels: number of levels including level 0; default: halve until one tile.
    compression: 'jpeg' (Pillow, YCbCr 4:2:0, `jpeg_quality`), 'zlib' (with the
      horizontal predictor) or 'none' (None is 'none'); tiles are compressed on
      `workers` threads.
    jpeg_quality: 1..100, for 'jpeg'.
    mpp: microns per pixel of level 0, written as the TIFF resolution (pixels per cm) of
      each level; None writes no resolution.
    workers: compression threads (default: the CPUs available).

  Returns:
    The level shapes `[(H, W), (ceil(H/2), ceil(W/2)), ...]`.
  """
  tifffile = _tifffile()
  compression = compression or 'none'
  height, width, channels = (int(v) for v in shape)
  _check_tiff_args(path, channels, tile, compression, jpeg_quality, mpp)
  _allow_preencoded(tifffile, compression)
  shapes = pyramid_shapes(height, width, tile, levels)
  encode = _tile_encoder(compression, channels, tile, jpeg_quality)
  workers = workers or default_workers()
  folder = os.path.dirname(os.path.abspath(os.fspath(path)))
  os.makedirs(folder, exist_ok=True)
  spool = _RowSpool(shapes, channels, folder)
  pyramid = PyramidBuilder(shapes, spool.write)
  seen = [0]

  def level0_rows():
    for row0, rows in bands:
      rows = as_uint8(rows)
      if row0 != seen[0] or rows.shape[1:] != (width, channels):
        raise ValueError(f'band at row {row0} of shape {rows.shape} does not continue '
                         f'row {seen[0]} of a {(height, width, channels)} image')
      rows = rows[:height - seen[0]]
      seen[0] += rows.shape[0]
      pyramid.feed(0, rows)
      yield rows
      if seen[0] >= height:
        return
    raise ValueError(f'bands ended at row {seen[0]}, expected {height}')

  def write_level(tif, rows, level):
    h, w = shapes[level]
    tiles = _parallel_map(encode, _tiles(rows, w, channels, tile), workers)
    tif.write(tiles, shape=(h, w, channels) if channels > 1 else (h, w), dtype=np.uint8,
              tile=(tile, tile), photometric='minisblack' if channels == 1 else 'rgb',
              compression=None if compression == 'none' else compression,
              # tifffile writes YCbCr photometric, this subsampling and
              # ReferenceBlackWhite for RGB JPEG, matching Pillow's 4:2:0 tiles.
              subsampling=(2, 2) if compression == 'jpeg' and channels == 3 else None,
              predictor=2 if compression == 'zlib' else None,
              extrasamples=('unassalpha',) if channels == 4 else None,
              subfiletype=1 if level else 0, metadata=None, **_resolution(mpp, level))

  try:
    with atomic_path(path) as tmp:
      with tifffile.TiffWriter(tmp, bigtiff=True) as tif:
        write_level(tif, level0_rows(), 0)
        if seen[0] != height:
          raise ValueError(f'bands ended at row {seen[0]}, expected {height}')
        pyramid.finish()
        for level in range(1, len(shapes)):
          write_level(tif, spool.read_rows(level, tile), level)
  finally:
    spool.close()
  return shapes


# ----------------------------------------------------------------------------- masks


def mask_path(image_path) -> str:
  """Where the label mask of `image_path` goes: `<stem>_mask.png`, or `.tif` for TIFF."""
  stem, ext = os.path.splitext(os.fspath(image_path))
  return stem + ('_mask' + ext if ext.lower() in TIFF_SUFFIXES else '_mask.png')


def write_labels(path, labels, *, tile: int = DEFAULT_TILE) -> None:
  """Label ids `[H, W]` (an array or a `label_maps.LabelMap`) as a PNG
  (`label_maps.write_label_png`, whole) or a tiled TIFF written tile row by tile row (a
  `LabelMap` is never held whole), atomically."""
  if _suffix(path) not in TIFF_SUFFIXES:
    if _suffix(path) != '.png':
      raise ValueError(f'label masks are written as .png or .tif/.tiff, got {path!r}')
    label_maps.write_label_png(path, np.asarray(labels))
    return
  tifffile = _tifffile()
  if not hasattr(labels, 'rows'):     # lazy maps (label_maps.LabelMap, ...) stay lazy
    labels = np.asarray(labels)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
      raise ValueError(f'labels must be integer [H, W], got {labels.dtype} {labels.shape}')
  lo, hi = (int(labels.min(initial=0)), int(labels.max(initial=0))) if labels.size else (0, 0)
  if lo < 0 or hi >= 1 << 16:
    raise ValueError(f'label ids must be in [0, 65536), got [{lo}, {hi}]')
  dtype = np.uint16 if hi >= 256 else np.uint8
  h, w = labels.shape

  def tiles():   # row-major whole tiles (edge tiles padded), one tile row in memory
    for r in range(0, h, tile):
      band = np.asarray(labels[r:r + tile]).astype(dtype)
      for c in range(0, w, tile):
        yield _pad_tile(band[:, c:c + tile, None], tile)[..., 0]
  with atomic_path(path) as tmp:
    tifffile.imwrite(tmp, tiles(), shape=(h, w), dtype=dtype, bigtiff=True,
                     tile=(tile, tile), photometric='minisblack', compression='zlib',
                     metadata=None)
