"""Label maps from annotations: a QuPath-style GeoJSON rasterized at the output's pixels.

QuPath exports annotations as a GeoJSON FeatureCollection (or a bare list of Features):
Polygon and MultiPolygon geometries in full-resolution pixel coordinates (x right, y
down, origin at the top left corner of the image) with the class in
`properties.classification.name`. `read_geojson(path, classes, (H, W))` checks the whole
file first -- JSON, geometry types, rings, finite coordinates inside the image, every
class mapped by `classes` (`parse_classes('Tumor=1,Stroma=2')`) -- and returns a
`GeoJSONLabels`, which rasterizes on demand, band by band: pixel (i, j) takes the label of
the last feature (in file order) whose area holds its centre (j + 0.5, i + 0.5) by the
even-odd rule per polygon (so holes are holes; the polygons of a MultiPolygon are
united); pixels no feature holds are 0. Its latent-resolution map (the pixels [::f, ::f])
is rasterized directly, so nothing is ever held at pixel resolution.

Written here, not taken from a rasterization library: the scanline rule is ~40 lines of
numpy, and the declared dependencies have none (rasterio/GDAL or scikit-image would be
large additions for this one function).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from tiled_ldm_jax import masks as masks_lib

MAX_BYTES = 1 << 30              # a larger annotation file is refused unread
_ROW_CHUNK_ELEMENTS = 1 << 22    # rows x edges per vectorized block (memory bound)


def parse_classes(text: str) -> dict[str, int]:
  """'Tumor=1,Stroma=2' -> {'Tumor': 1, 'Stroma': 2}; ValueError naming a bad item."""
  out: dict[str, int] = {}
  for item in (text or '').split(','):
    name, sep, value = item.strip().rpartition('=')
    name = name.strip()
    try:
      label = int(value)
    except ValueError:
      label = -1
    if not sep or not name or label < 0:
      raise ValueError(f'mask_classes: {item.strip()!r} is not NAME=ID with ID >= 0 '
                       "(e.g. 'Tumor=1,Stroma=2')")
    if name in out:
      raise ValueError(f'mask_classes: class {name!r} is given twice')
    out[name] = label
  if not out:
    raise ValueError("mask_classes: empty (e.g. 'Tumor=1,Stroma=2')")
  return out


def looks_like_json(path) -> bool:
  """Whether the file's first non-blank byte opens a JSON object or array."""
  with open(path, 'rb') as f:
    head = f.read(4096).lstrip()
  if head.startswith(b'\xef\xbb\xbf'):                    # a UTF-8 byte order mark
    head = head[3:].lstrip()
  return head[:1] in (b'{', b'[')


def _features(doc: Any, name: str) -> list:
  if isinstance(doc, list):
    return doc
  if isinstance(doc, dict) and doc.get('type') == 'FeatureCollection':
    feats = doc.get('features')
    if not isinstance(feats, list):
      raise ValueError(f'{name}: FeatureCollection without a features list')
    return feats
  if isinstance(doc, dict) and doc.get('type') == 'Feature':
    return [doc]
  raise ValueError(f'{name}: not a GeoJSON FeatureCollection, Feature or list of Features')


def _class_name(feat: dict) -> str | None:
  props = feat.get('properties')
  cls = props.get('classification') if isinstance(props, dict) else None
  value = cls.get('name') if isinstance(cls, dict) else None
  return value if isinstance(value, str) else None


def _rings(polygon: Any, where: str) -> list[np.ndarray]:
  if not isinstance(polygon, list) or not polygon:
    raise ValueError(f'{where}: a polygon must be a non-empty list of rings')
  rings = []
  for ring in polygon:
    try:
      a = np.asarray(ring, np.float64)
    except (TypeError, ValueError):
      a = np.zeros((0,))
    if a.ndim != 2 or a.shape[1] < 2 or a.shape[0] < 3:
      raise ValueError(f'{where}: a ring must be a list of at least 3 [x, y] positions')
    rings.append(a[:, :2])
  return rings


def _edges(polygon: list[np.ndarray]) -> np.ndarray:
  """[E, 4] (x0, y0, x1, y1) of every ring, closed, without horizontal edges."""
  out = []
  for ring in polygon:
    nxt = np.roll(ring, -1, axis=0)
    e = np.concatenate([ring, nxt], axis=1)
    out.append(e[e[:, 1] != e[:, 3]])
  return np.concatenate(out)


class GeoJSONLabels(masks_lib.RowMap):
  """Annotations as a label map [H, W] rasterized on demand (module doc); it slices by
  rows like `masks.LabelMap`, so the writers and the image stage take either."""

  def __init__(self, polygons: list[tuple[int, np.ndarray]], hw, dtype):
    self.polygons = polygons          # (label, edges [E, 4]) in painting order
    self.shape = tuple(int(v) for v in hw)
    self.dtype = np.dtype(dtype)
    self._present = None
    self.counts = {}                  # class name -> {'id', 'polygons', 'holes'} (read_geojson)

  def sample(self, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Labels at the points (xs[j], ys[i]) (pixel coordinates): [len(ys), len(xs)]."""
    out = np.zeros((len(ys), len(xs)), self.dtype)
    for label, edges in self.polygons:
      inside = _inside(edges, ys, xs)
      if inside is not None:
        rows, cols, hit = inside
        out[rows, cols] = np.where(hit, label, out[rows, cols])
    return out

  def rows(self, r0: int, r1: int) -> np.ndarray:
    return self.sample(np.arange(r0, r1) + 0.5, np.arange(self.shape[1]) + 0.5)

  def latent(self, factor: int) -> np.ndarray:
    """The pixels [::f, ::f], rasterized at those pixels only: [H / f, W / f]."""
    self._check_factor(factor)
    h, w = self.shape
    return self.sample(np.arange(0, h, factor) + 0.5, np.arange(0, w, factor) + 0.5)

  def bands(self, rows: int = 1024):
    for r0 in range(0, self.shape[0], rows):
      yield r0, self.rows(r0, min(r0 + rows, self.shape[0]))

  def present(self) -> list[int]:
    """Sorted ids that occur in the map (one banded pass, cached)."""
    if self._present is None:
      seen = set()
      for _, band in self.bands():
        seen.update(int(v) for v in np.unique(band))
      self._present = sorted(seen)
    return self._present

  def max(self, axis=None, out=None, initial=None, **unused):
    del axis, out, unused
    labels = [lab for lab, _ in self.polygons] + [0] + ([initial] if initial is not None else [])
    return max(labels)

  def min(self, axis=None, out=None, initial=None, **unused):
    del axis, out, unused
    return 0 if initial is None else min(0, initial)


def _inside(edges: np.ndarray, ys: np.ndarray, xs: np.ndarray):
  """(row index [r, 1], column index [1, c], inside [r, c]) of the points within the
  polygon's bounding box (even-odd rule at the points), or None if none is."""
  y_lo, y_hi = edges[:, [1, 3]].min(), edges[:, [1, 3]].max()
  x_lo, x_hi = edges[:, [0, 2]].min(), edges[:, [0, 2]].max()
  ri = np.flatnonzero((ys >= y_lo) & (ys < y_hi))
  ci = np.flatnonzero((xs >= x_lo) & (xs < x_hi))
  if not ri.size or not ci.size:
    return None
  x0, y0, x1, y1 = (edges[:, k] for k in range(4))
  qx = xs[ci]
  hits = []
  step = max(1, _ROW_CHUNK_ELEMENTS // max(len(edges), 1))
  for s in range(0, len(ri), step):
    y = ys[ri[s:s + step]][:, None]                              # [r, 1]
    crosses = (y0 > y) != (y1 > y)                               # [r, E]: half-open rule
    with np.errstate(divide='ignore', invalid='ignore'):
      xc = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
    span = x_hi - x_lo + 2.0
    xc = np.where(crosses, np.clip(xc, x_lo - 1, x_hi + 1), x_hi + 1) - x_lo + 1   # [0, span)
    xc.sort(axis=1)
    r = xc.shape[0]
    offset = np.arange(r)[:, None] * span
    flat = (xc + offset).ravel()                                 # sorted: rows ascend
    q = (qx - x_lo + 1)[None, :] + offset                        # [r, c]
    count = np.searchsorted(flat, q.ravel(), side='left').reshape(r, -1)
    count -= np.arange(r)[:, None] * xc.shape[1]                 # crossings left of x
    hits.append((count & 1).astype(bool))
  return ri[:, None], ci[None, :], np.concatenate(hits)


def read_geojson(path, classes: dict[str, int], hw, num_classes: int | None = None
                 ) -> GeoJSONLabels:
  """Checks and loads annotations (module doc); every problem is one ValueError naming
  the file and what is wrong: unmapped classes, unsupported geometry types, coordinates
  outside the H x W image or not finite, ids the model does not know."""
  name = os.fspath(path)
  size = os.path.getsize(path)
  if size > MAX_BYTES:
    raise ValueError(f'{name}: {size / 2 ** 20:.0f} MiB of GeoJSON is more than the '
                     f'{MAX_BYTES >> 20} MiB read')
  try:
    with open(path, 'rb') as f:
      doc = json.loads(f.read().decode('utf-8-sig'),
                       parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
  except (ValueError, UnicodeDecodeError, RecursionError) as e:
    raise ValueError(f'{name}: not valid JSON ({str(e)[:120]})') from None
  h, w = (int(v) for v in hw)
  polygons, unmapped, unclassified, bad_types, outside = [], set(), 0, set(), 0
  counts = {}
  for i, feat in enumerate(_features(doc, name)):
    if not isinstance(feat, dict) or feat.get('type') != 'Feature':
      raise ValueError(f'{name}: item {i} of the features is not a GeoJSON Feature')
    geom = feat.get('geometry')
    kind = geom.get('type') if isinstance(geom, dict) else None
    if kind not in ('Polygon', 'MultiPolygon'):
      bad_types.add(str(kind))
      continue
    cls = _class_name(feat)
    if cls is None:
      unclassified += 1
      continue
    if cls not in classes:
      unmapped.add(cls)
      continue
    coords = geom.get('coordinates')
    parts = [coords] if kind == 'Polygon' else coords
    if not isinstance(parts, list) or not parts:
      raise ValueError(f'{name}: feature {i} ({kind}) has no coordinates')
    for polygon in parts:
      rings = _rings(polygon, f'{name}: feature {i}')
      pts = np.concatenate(rings)
      if not np.isfinite(pts).all():
        raise ValueError(f'{name}: feature {i} has coordinates that are not finite numbers')
      if pts[:, 0].min() < 0 or pts[:, 1].min() < 0 or pts[:, 0].max() > w \
          or pts[:, 1].max() > h:
        outside += 1
        continue
      edges = _edges(rings)
      if len(edges):
        polygons.append((classes[cls], edges))
        seen = counts.setdefault(cls, {'id': classes[cls], 'polygons': 0, 'holes': 0})
        seen['polygons'] += 1
        seen['holes'] += len(rings) - 1      # rings after the first are holes
  problems = []
  if unmapped:
    problems.append(f'classes not in --mask_classes: {", ".join(sorted(unmapped))} '
                    f'(mapped: {", ".join(sorted(classes))})')
  if unclassified:
    problems.append(f'{unclassified} feature(s) without properties.classification.name')
  if bad_types:
    problems.append(f'unsupported geometry types: {", ".join(sorted(bad_types))} '
                    '(Polygon and MultiPolygon are read)')
  if outside:
    problems.append(f'{outside} polygon(s) with coordinates outside the {h}x{w} image '
                    '(pixel coordinates, origin top left)')
  if problems:
    raise ValueError(f'{name}: ' + '; '.join(problems))
  top = max([lab for lab, _ in polygons] + [0])
  if num_classes is not None and top >= num_classes:
    bad = sorted({lab for lab, _ in polygons if lab >= num_classes})
    raise ValueError(f'--mask_classes: ids {bad} are outside the model\'s classes '
                     f'[0, {num_classes})')
  out = GeoJSONLabels(polygons, (h, w), masks_lib.compact_dtype(top))
  out.counts = {name: counts[name] for name in sorted(counts, key=lambda n: counts[n]['id'])}
  return out
