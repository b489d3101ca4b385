"""Training data from whole-slide images and their annotations (`--config.data=MANIFEST`).

The manifest lists (slide, annotations) pairs, as CSV with a header row or as JSON (a
list of objects, or `{"slides": [...]}`), told apart by the file's contents:

  slide,annotations,mpp,layout_class
  slides/a.svs,qupath/a.geojson,,
  slides/b.tif,labels/b_mask.tif,0.25,1

`slide`: anything OpenSlide opens (SVS, NDPI, MRXS, generic or OME tiled TIFF pyramids,
this library's TIFF output). `annotations` (may be empty: all tissue unannotated): a
QuPath GeoJSON export (class names mapped by `--config.mask_classes`, default
'label N' -> N, the names our own GeoJSON carries), a label TIFF or an OME-Zarr labels
store, of the slide's level-0 size; the format is read from the file's contents. `mpp`
(optional): the slide's level-0 microns per pixel, for slides that do not record it.
`layout_class` (optional): the mask model's class for every tile of the slide (default:
the tile's most frequent non-zero label, as for folder data). Relative paths are
relative to the manifest's folder.

Tiles. A tile is `image_size` pixels at `--config.mpp` um/px (0: each slide's level 0
as is), read from the pyramid level with the largest downsample not above the one asked
(never upsampled) and resized (bilinear) to the tile; its label map is the annotations
sampled at the tile's pixel centres, so every class in a tile is kept. Mask-model
examples are label maps only, at `mpp * mask_downscale`.

Where tiles come from (`_Grid`): each slide is cut into grid cells of a quarter tile
(at least 1/2048 of the slide's longer side). A cell is *tissue* when the slide's
thumbnail (read from the coarsest pyramid level with at least one pixel per cell,
resized to one pixel per cell, transparent pixels as white) has a saturation
(max - min) / max of RGB above `--config.tissue_saturation`: stained tissue is
coloured, glass is white or grey. A cell's class is the annotation label at its centre
(0: unannotated). Candidate cells are tissue cells whose tile fits inside the slide
(`--config.unannotated=exclude`: annotated ones only). A draw picks a class with
probability proportional to (its candidate area) ** (1 - `class_balance`) -- 1: every
class equally often, 0: in proportion to area --, then a cell of that class uniformly
over all slides, a point uniformly in it, and centres the tile there (clamped into the
slide). Every draw is a pure function of (seed, stream, step, row).

Everything a run needs is checked once when the source is made (before any training,
before the workdir exists): a slide OpenSlide cannot open, a slide without the
resolution asked for, annotations outside the slide or with classes not in the class
map, a slide without tissue -- each one `SlideDataError` line.

OpenSlide is an optional dependency (`pip install -e .[slides]`), imported only here.
Each loader thread opens each slide once (OpenSlide handles hold caches and are cheap
to keep).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
import threading
from typing import Sequence

import numpy as np
from PIL import Image

from tiled_ldm_jax.files import geojson_labels
from tiled_ldm_jax.files import label_files
from tiled_ldm_jax.files import reading
from tiled_ldm_jax.output import geojson as geojson_out
from tiled_ldm_jax.training import data as data_lib

INSTALL_HINT = 'pip install -e .[slides]'
MANIFEST_MAX_BYTES = 16 << 20
UNANNOTATED = ('zero', 'exclude')
GRID_MAX_SIDE = 2048          # grid cells along a slide's longer side, at most
CELLS_PER_TILE = 4            # grid cells along a tile's side (when the slide allows)
THUMBNAIL_MAX_PIXELS = 1 << 26   # the level read whole for the tissue mask (RGBA: 256 MiB)
_LEVEL_TOLERANCE = 1e-3       # a level whose downsample is this close to the one asked
                              # is read as is (pyramids store 4.0001 for 4)


class SlideDataError(ValueError):
  """A slide, its annotations or the manifest cannot be used (one line)."""


def require_openslide():
  """The openslide module, or a one-line SlideDataError saying how to install it."""
  try:
    import openslide  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise SlideDataError('slide data is read with OpenSlide, which is not installed: '
                         f'{INSTALL_HINT}') from None
  return openslide


# ----------------------------------------------------------------------------- manifest


@dataclasses.dataclass(frozen=True)
class SlideEntry:
  slide: str                    # path
  annotations: str = ''         # path ('' : none)
  mpp: float | None = None      # level-0 um/px, when the slide does not record it
  layout_class: int | None = None


def is_manifest(path: str) -> bool:
  """A regular file (a folder is a tile folder; 'synthetic' is synthetic data)."""
  return os.path.isfile(path)


def read_manifest(path: str) -> list[SlideEntry]:
  """The manifest's entries (module doc), paths made absolute. SlideDataError naming
  the first problem."""
  name = reading.printable(path)
  raw = reading.read_bytes(path, 'slide manifest', MANIFEST_MAX_BYTES)
  head = raw.lstrip()[:1]
  if head in (b'[', b'{'):
    doc = reading.read_json(path, 'slide manifest', max_bytes=MANIFEST_MAX_BYTES)
    rows = doc.get('slides') if isinstance(doc, dict) else doc
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
      raise SlideDataError(f'{name}: a JSON manifest is a list of objects (or '
                           '{"slides": [...]}) with "slide" and "annotations"')
  else:
    try:
      text = raw.decode('utf-8-sig')
    except UnicodeDecodeError:
      raise SlideDataError(f'{name}: a slide manifest is UTF-8 CSV or JSON') from None
    rows = list(csv.DictReader(io.StringIO(text)))
    if not rows or 'slide' not in rows[0]:
      raise SlideDataError(f'{name}: a CSV manifest needs a header row naming the columns '
                           'slide,annotations[,mpp,layout_class] and one row per slide')
  base = os.path.dirname(os.path.abspath(path))
  out = []
  for i, row in enumerate(rows):
    where = f'{name}: entry {i + 1}'
    unknown = set(row) - {'slide', 'annotations', 'mpp', 'layout_class'}
    if unknown - {None}:
      raise SlideDataError(f'{where}: unknown field(s) {", ".join(sorted(map(str, unknown)))}'
                           ' (slide, annotations, mpp, layout_class)')
    slide = row.get('slide')
    if not isinstance(slide, str) or not slide.strip():
      raise SlideDataError(f'{where}: no slide path')
    ann = row.get('annotations') or ''
    if not isinstance(ann, str):
      raise SlideDataError(f'{where}: annotations must be a path')
    mpp = _optional_number(row.get('mpp'), float, f'{where}: mpp')
    layout = _optional_number(row.get('layout_class'), int, f'{where}: layout_class')
    if mpp is not None and not (math.isfinite(mpp) and mpp > 0):
      raise SlideDataError(f'{where}: mpp must be a positive number of um/px, got {mpp}')
    if layout is not None and layout < 0:
      raise SlideDataError(f'{where}: layout_class must be >= 0, got {layout}')
    join = lambda p: os.path.normpath(os.path.join(base, p.strip())) if p.strip() else ''
    out.append(SlideEntry(join(slide), join(ann), mpp, layout))
  if not out:
    raise SlideDataError(f'{name}: the manifest lists no slides')
  return out


def _optional_number(value, kind, where):
  if value is None or (isinstance(value, str) and not value.strip()):
    return None
  if isinstance(value, bool):
    raise SlideDataError(f'{where}: {value!r} is not a number')
  try:
    v = kind(value)
  except (TypeError, ValueError):
    raise SlideDataError(f'{where}: {str(value)[:40]!r} is not a number') from None
  if kind is int and isinstance(value, float) and value != v:
    raise SlideDataError(f'{where}: {value!r} is not an integer')
  return v


# ----------------------------------------------------------------------------- one slide


def slide_mpp(props: dict) -> float | None:
  """Level-0 um/px from OpenSlide's properties (openslide.mpp-x / -y), or None."""
  vals = []
  for k in ('openslide.mpp-x', 'openslide.mpp-y'):
    try:
      v = float(props.get(k, ''))
    except ValueError:
      return None
    if not (math.isfinite(v) and v > 0):
      return None
    vals.append(v)
  return sum(vals) / 2


def open_slide(path: str):
  """An OpenSlide handle; SlideDataError (one line) if OpenSlide cannot open the file."""
  openslide = require_openslide()
  name = reading.printable(path)
  try:
    reading.kind(path, 'slide', allow=('file', 'folder'))   # missing, FIFO, ...: one line
  except (OSError, ValueError) as e:
    raise SlideDataError(str(e)) from None
  try:
    return openslide.OpenSlide(path)
  except Exception as e:  # pylint: disable=broad-except  # OpenSlideError and friends
    msg = ' '.join(str(e).split())[:160]
    raise SlideDataError(f'{name}: OpenSlide cannot open this slide '
                         f'({type(e).__name__}{": " + msg if msg else ""})') from None


class _Annotations:
  """Label ids at level-0 points: GeoJSON polygons, or a label TIFF / OME-Zarr source."""

  def __init__(self, path: str, hw, classes: dict[str, int], num_labels: int):
    self.geo, self.src = None, None
    name = reading.printable(path)
    if not path:
      return
    if not os.path.exists(path):
      raise SlideDataError(f'{name}: annotations not found')
    try:
      if os.path.isfile(path) and geojson_labels.looks_like_json(path):
        self.geo = geojson_labels.read_geojson(path, classes, hw, num_classes=num_labels)
        # Each polygon's bounding box: a tile paints only the polygons that reach it
        # (a slide's annotations hold thousands; painting all per tile was 10x slower).
        self.boxes = np.array([(e[:, [0, 2]].min(), e[:, [1, 3]].min(), e[:, [0, 2]].max(),
                                e[:, [1, 3]].max()) for _, e in self.geo.polygons]
                              ).reshape(-1, 4)
        return
      src = label_files.open_label_source(path)
    except SlideDataError:
      raise
    except (ValueError, OSError) as e:
      raise SlideDataError(str(e).replace('--mask_classes', 'mask_classes')) from None
    if src is None:
      raise SlideDataError(f'{name}: annotations are a QuPath GeoJSON, a label TIFF or an '
                           'OME-Zarr labels store (read from the contents); this is none')
    if tuple(src.shape) != tuple(hw):
      raise SlideDataError(f'{name}: label map of {src.shape[0]} x {src.shape[1]} but the '
                           f'slide\'s level 0 is {hw[0]} x {hw[1]}')
    bad = [i for i in src.ids if i >= num_labels]
    if bad:
      raise SlideDataError(f'{name}: label ids {bad} are not classes of the model '
                           f'(num_labels {num_labels})')
    self.src = src

  def sample(self, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """int32 [len(ys), len(xs)]: labels at the points (xs[j], ys[i]), each ascending."""
    if self.geo is not None:
      b = self.boxes
      near = np.flatnonzero((b[:, 0] <= xs[-1]) & (b[:, 2] >= xs[0]) & (b[:, 1] <= ys[-1])
                            & (b[:, 3] >= ys[0]))
      out = np.zeros((len(ys), len(xs)), np.int32)
      for k in near:                     # in file order: later polygons paint over
        label, edges = self.geo.polygons[k]
        _paint_tile(out, label, edges, b[k], ys, xs)
      return out
    if self.src is None:
      return np.zeros((len(ys), len(xs)), np.int32)
    h, w = self.src.shape
    r = np.clip(np.floor(ys).astype(np.int64), 0, h - 1)
    c = np.clip(np.floor(xs).astype(np.int64), 0, w - 1)
    block = self.src.read_rows(int(r[0]), int(r[-1]) + 1)
    return np.asarray(block)[r - r[0]][:, c].astype(np.int32)


def _paint_tile(out: np.ndarray, label: int, edges: np.ndarray, box, ys: np.ndarray,
                xs: np.ndarray) -> None:
  """out[i, j] = label where (xs[j], ys[i]) is inside the polygon of `edges` [E, 4] (its
  bounding box `box` x0, y0, x1, y1) by the even-odd rule -- `files.geojson_labels`' rule
  (half-open in y, crossings strictly left of the point) -- for a tile: only the points
  in the box are tested, against only the edges spanning their rows and not wholly right
  of them, a small part of a large annotation's edges."""
  r0, r1 = np.searchsorted(ys, box[1], 'left'), np.searchsorted(ys, box[3], 'left')
  c0, c1 = np.searchsorted(xs, box[0], 'left'), np.searchsorted(xs, box[2], 'left')
  if r0 >= r1 or c0 >= c1:
    return
  ys, xs = ys[r0:r1], xs[c0:c1]
  x0, y0, x1, y1 = edges[:, 0], edges[:, 1], edges[:, 2], edges[:, 3]
  keep = ((np.maximum(y0, y1) > ys[0]) & (np.minimum(y0, y1) <= ys[-1])
          & (np.minimum(x0, x1) < xs[-1]))
  if not keep.any():
    return
  x0, y0, x1, y1 = x0[keep], y0[keep], x1[keep], y1[keep]
  y = ys[:, None]
  crosses = (y0 > y) != (y1 > y)                                   # [R, E]
  lo, hi = xs[0] - 1.0, xs[-1] + 1.0
  with np.errstate(divide='ignore', invalid='ignore'):
    xc = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
  # Crossings left of the points count for all of them, those right of them (and rows
  # an edge does not cross) for none: clamped to just outside, rows kept apart by an
  # offset of `span`, counted with one searchsorted over all rows.
  xc = np.where(crosses, np.clip(xc, lo, hi), hi) - lo             # [0, span)
  xc.sort(axis=1)
  r, e = xc.shape
  span = hi - lo + 1.0
  offset = np.arange(r)[:, None] * span
  count = np.searchsorted((xc + offset).ravel(), ((xs - lo)[None] + offset).ravel(),
                          side='left').reshape(r, -1) - np.arange(r)[:, None] * e
  block = out[r0:r1, c0:c1]
  block[(count & 1).astype(bool)] = label


def tissue_mask(thumb: np.ndarray, saturation: float) -> np.ndarray:
  """bool [h, w] of an RGBA (or RGB) uint8 thumbnail: opaque pixels whose saturation
  (max - min) / max of RGB is above `saturation` (module doc)."""
  rgb = thumb[..., :3].astype(np.float32)
  hi, lo = rgb.max(-1), rgb.min(-1)
  sat = (hi - lo) / np.maximum(hi, 1.0)
  opaque = thumb[..., 3] > 0 if thumb.shape[-1] == 4 else True
  return (sat > saturation) & opaque


@dataclasses.dataclass
class _Slide:
  entry: SlideEntry
  hw: tuple[int, int]            # level-0 (H, W)
  downsamples: tuple[float, ...]
  ds: float                      # level-0 pixels per tile pixel (image tiles)
  annotations: _Annotations
  cell: float                    # grid cell side in level-0 pixels
  cells: np.ndarray              # int64 [n] flat indices of the candidate cells
  cell_labels: np.ndarray        # int32 [n]
  grid_w: int


def _read_level(handle, level: int, size: tuple[int, int]) -> np.ndarray:
  """Level `level` whole, RGBA uint8 [h, w, 4] (size (w, h))."""
  return np.asarray(handle.read_region((0, 0), level, size))


def _pick_level(downsamples: Sequence[float], ds: float) -> int:
  """The level with the largest downsample not above `ds` (never upsample)."""
  ok = [i for i, d in enumerate(downsamples) if d <= ds * (1 + _LEVEL_TOLERANCE)]
  return max(ok, key=lambda i: downsamples[i]) if ok else 0


# ----------------------------------------------------------------------------- source


class SlideSource:
  """Batches of slide tiles; `step_example(step, i)` is a pure function of
  (seed, stream, step, i) (module doc). Checks every slide when made.

  Args:
    entries: the manifest's slides.
    size: tile side in pixels (mask-model data: in mask pixels).
    batch_size, seed, stream: as `data.SyntheticSource`.
    mpp: target um/px of image tiles (0: each slide's level 0).
    with_images: read the image (else labels only).
    downscale: label maps at `mpp * downscale` (the mask model's resolution); no image.
    classes: GeoJSON class name -> id (None: 'label N' -> N).
    num_labels: ids in [0, num_labels).
    unannotated: 'zero' (unannotated tissue is label 0) or 'exclude' (no tile is
      centred on it).
    class_balance: in [0, 1]; class weights are area ** (1 - class_balance).
    tissue_saturation: the tissue threshold (module doc).
    augment: random flips and 90-degree rotations.
  """

  def __init__(self, entries: Sequence[SlideEntry], size: int, batch_size: int, seed: int,
               *, mpp: float = 0.0, with_images: bool = True, downscale: int = 1,
               classes: dict[str, int] | None = None, num_labels: int = 5,
               unannotated: str = 'zero', class_balance: float = 1.0,
               tissue_saturation: float = 0.08, augment: bool = True, stream: int = 0):
    if unannotated not in UNANNOTATED:
      raise SlideDataError(f'unannotated must be one of {UNANNOTATED}, got {unannotated!r}')
    self.size, self.batch_size, self.seed, self.stream = size, batch_size, seed, stream
    self.downscale = max(int(downscale), 1)
    self.with_images = with_images and self.downscale == 1
    self.augment, self.num_labels = augment, num_labels
    self.mpp = float(mpp)
    classes = classes if classes else geojson_out.default_classes(num_labels)
    self.slides = [self._check(e, classes, unannotated, tissue_saturation) for e in entries]
    self._local = threading.local()
    # Pooled candidates: per class, (slide index, cell index into that slide's arrays).
    labels = np.concatenate([s.cell_labels for s in self.slides])
    which = np.concatenate([np.full(len(s.cells), i) for i, s in enumerate(self.slides)])
    pos = np.concatenate([np.arange(len(s.cells)) for s in self.slides])
    self.classes = sorted(int(c) for c in np.unique(labels))
    self.areas = np.array([(labels == c).sum() for c in self.classes], np.float64)
    w = self.areas ** (1.0 - float(class_balance))
    self.class_probs = w / w.sum()
    self._members = [(which[labels == c], pos[labels == c]) for c in self.classes]

  def max_layout_class(self) -> int:
    """The largest layout class a tile can have: the manifest's, or for slides without
    one the largest label id (a tile's most frequent non-zero label)."""
    return max(self.num_labels - 1 if s.entry.layout_class is None else s.entry.layout_class
               for s in self.slides)

  # -- checks (once, before training)

  def _check(self, entry: SlideEntry, classes, unannotated: str, saturation: float) -> _Slide:
    name = reading.printable(entry.slide)
    handle = open_slide(entry.slide)
    try:
      w0, h0 = handle.dimensions
      downsamples = tuple(float(d) for d in handle.level_downsamples)
      mpp0 = entry.mpp if entry.mpp is not None else slide_mpp(dict(handle.properties))
      if self.mpp > 0:
        if mpp0 is None:
          raise SlideDataError(f'{name}: the slide records no resolution (openslide.mpp-x/y)'
                               f'; give its level-0 um/px in the manifest\'s mpp column, or '
                               'train at its level 0 with mpp=0')
        if self.mpp < mpp0 * (1 - _LEVEL_TOLERANCE):
          raise SlideDataError(f'{name}: mpp {self.mpp:g} is finer than the slide\'s level 0 '
                               f'({mpp0:g} um/px); tiles are never upsampled')
        ds = self.mpp / mpp0
      else:
        ds = 1.0
      extent = self.size * ds * self.downscale      # a tile's side in level-0 pixels
      if extent > min(w0, h0):
        raise SlideDataError(f'{name}: {w0} x {h0} px at level 0 is smaller than one tile '
                             f'({self.size} px at {ds * self.downscale:g}x = {extent:.0f} px)')
      ann = _Annotations(entry.annotations, (h0, w0), classes, self.num_labels)
      cell = max(extent / CELLS_PER_TILE, max(w0, h0) / GRID_MAX_SIDE)
      gh, gw = max(1, int(h0 // cell)), max(1, int(w0 // cell))
      level = _pick_level(downsamples, cell)
      lw, lh = handle.level_dimensions[level]
      if lw * lh > THUMBNAIL_MAX_PIXELS:
        raise SlideDataError(f'{name}: no pyramid level small enough for the tissue '
                             f'thumbnail (the coarsest usable is {lw} x {lh} px); write the '
                             'slide as a tiled pyramid (e.g. pyramidal TIFF) first')
      thumb = _read_level(handle, level, (lw, lh))
      thumb = np.asarray(Image.fromarray(thumb, 'RGBA').resize(
          (gw, gh), Image.BOX, box=(0, 0, gw * cell / downsamples[level],
                                    gh * cell / downsamples[level])))
    finally:
      handle.close()
    tissue = tissue_mask(thumb, saturation)
    if not tissue.any():
      raise SlideDataError(f'{name}: no tissue found (no thumbnail pixel with saturation '
                           f'above tissue_saturation={saturation:g})')
    ys, xs = (np.arange(gh) + 0.5) * cell, (np.arange(gw) + 0.5) * cell
    # The label of the level-0 pixel under each cell's centre (as `_labels`: a centre
    # may fall on a pixel corner, where polygon edges lie).
    cell_labels = ann.sample(np.floor(ys) + 0.5, np.floor(xs) + 0.5)
    half = extent / 2
    fits = ((ys[:, None] >= half) & (ys[:, None] <= h0 - half)
            & (xs[None, :] >= half) & (xs[None, :] <= w0 - half))
    ok = tissue & fits
    if unannotated == 'exclude':
      ok &= cell_labels > 0
    if not ok.any():
      raise SlideDataError(f'{name}: no tissue ' + ('that is annotated ' if unannotated ==
                           'exclude' else '') + 'where a whole tile fits inside the slide')
    cells = np.flatnonzero(ok)
    return _Slide(entry, (h0, w0), downsamples, ds, ann, cell, cells,
                  cell_labels.ravel()[cells].astype(np.int32), gw)

  # -- drawing

  def _handle(self, i: int):
    cache = getattr(self._local, 'handles', None)
    if cache is None:
      cache = self._local.handles = {}
    if i not in cache:
      cache[i] = open_slide(self.slides[i].entry.slide)
    return cache[i]

  def draw(self, step: int, i: int) -> tuple[int, float, float, int, np.random.Generator]:
    """(slide index, level-0 x, y of the tile's top-left corner, class drawn, the rng
    for the rest of the example), from (seed, stream, step, i) alone."""
    rng = np.random.default_rng([self.seed, self.stream, 3, step, i])
    k = int(rng.choice(len(self.classes), p=self.class_probs))
    which, pos = self._members[k]
    j = int(rng.integers(len(which)))
    s = self.slides[int(which[j])]
    flat = int(s.cells[pos[j]])
    gy, gx = divmod(flat, s.grid_w)
    u, v = rng.random(2)
    extent = self.size * s.ds * self.downscale
    h0, w0 = s.hw
    # The top-left corner on a level-0 pixel: at the slide's own resolution a tile is its
    # pixels, not a resampling of them.
    x = min(max(math.floor((gx + u) * s.cell - extent / 2), 0), math.floor(w0 - extent))
    y = min(max(math.floor((gy + v) * s.cell - extent / 2), 0), math.floor(h0 - extent))
    return int(which[j]), float(x), float(y), self.classes[k], rng

  def _labels(self, s: _Slide, x: float, y: float) -> np.ndarray:
    # The level-0 pixel under each tile pixel's centre, sampled at that pixel's centre:
    # with an even downsample the tile centres fall on level-0 pixel corners, where
    # polygon edges lie.
    ds = s.ds * self.downscale
    c = np.floor((np.arange(self.size) + 0.5) * ds) + 0.5
    return s.annotations.sample(y + c, x + c)

  def _image(self, idx: int, x: float, y: float) -> np.ndarray:
    """float32 [size, size, 3] in [0, 1]: the tile read at the best level and resized."""
    s = self.slides[idx]
    level = _pick_level(s.downsamples, s.ds)
    lds = s.downsamples[level]
    x0, y0 = int(math.floor(x)), int(math.floor(y))
    # The tile in level pixels: from (x - x0) / lds, side size * ds / lds.
    fx, fy = (x - x0) / lds, (y - y0) / lds
    side = self.size * s.ds / lds
    n = int(math.ceil(max(fx, fy) + side)) + 1
    region = self._handle(idx).read_region((x0, y0), level, (n, n))
    rgba = np.asarray(region)
    # Transparent pixels (no scanned data) as white glass: OpenSlide's RGBA is
    # premultiplied, so adding (255 - alpha) composites over white.
    rgb = rgba[..., :3].astype(np.uint16) + (255 - rgba[..., 3:4])
    img = Image.fromarray(np.minimum(rgb, 255).astype(np.uint8))
    if abs(side - self.size) < 1e-6 and fx == 0 and fy == 0:
      out = np.asarray(img)[:self.size, :self.size]
    else:
      out = np.asarray(img.resize((self.size, self.size), Image.BILINEAR,
                                  box=(fx, fy, fx + side, fy + side)))
    return out.astype(np.float32) / 255.0

  def step_example(self, step: int, i: int) -> data_lib.Example:
    """Example `i` of batch `step` (a pure function of (seed, stream, step, i))."""
    idx, x, y, _, rng = self.draw(step, i)
    s = self.slides[idx]
    labels = self._labels(s, x, y)
    image = self._image(idx, x, y) if self.with_images else None
    if self.augment:
      image, labels = data_lib.augment(image, labels, rng)
    layout = s.entry.layout_class
    if layout is None:
      layout = data_lib.folder_layout_class('', labels)
    return data_lib.Example(image=image, labels=labels, layout_class=int(layout))

  def batch(self, step: int) -> dict[str, np.ndarray]:
    return data_lib._stack([self.step_example(step, i) for i in range(self.batch_size)],  # pylint: disable=protected-access
                           self.with_images)


def from_config(cfg, batch_size: int, *, with_images: bool, downscale: int,
                stream: int) -> SlideSource:
  """The SlideSource of a TrainConfig whose `data` is a manifest."""
  classes = geojson_labels.parse_classes(cfg.mask_classes) if cfg.mask_classes else None
  return SlideSource(read_manifest(cfg.data), cfg.image_size, batch_size, cfg.seed,
                     mpp=cfg.mpp, with_images=with_images, downscale=downscale,
                     classes=classes, num_labels=cfg.num_labels,
                     unannotated=cfg.unannotated, class_balance=cfg.class_balance,
                     tissue_saturation=cfg.tissue_saturation, augment=cfg.augment,
                     stream=stream)
