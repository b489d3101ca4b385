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

from tiled_ldm_jax.files import reading
from tiled_ldm_jax.files import label_maps

MAX_BYTES = 1 << 30              # a larger annotation file is refused unread
_ROW_CHUNK_ELEMENTS = 1 << 20    # rows x (edges + columns) per vectorized block
BAND_PIXELS = 1 << 24            # pixels per band of `bands()` (the ids pass)
MAX_DEPTH = 64                   # GeoJSON nests ~7 deep; QuPath's measurements a few more
# Parsed bytes per file byte (reading.read_json's estimate): ~11x for QuPath's
# '[12345.5, 6789.25], ' positions, ~22x for small integer ones; nested empty arrays
# ('[],' : ~45x) are refused whatever the host's memory.
MAX_PARSED_RATIO = 32


def parse_classes(text: str) -> dict[str, int]:
  """Class name -> label id, from 'Tumor=1,Stroma=2' or a JSON object
  '{"Tumor": 1, "Tumor, grade 2": 2}' (the form that can name any class: names with ','
  or '=' in them, or spaces at their ends). ValueError naming a bad item."""
  text = text or ''
  if text.lstrip().startswith('{'):
    return _parse_json_classes(text)
  out: dict[str, int] = {}
  for item in text.split(','):
    name, sep, value = item.strip().rpartition('=')
    name = name.strip()
    try:
      label = int(value)
    except ValueError:
      label = -1
    if not sep or not name or label < 0:
      raise ValueError(f'mask_classes: {item.strip()!r} is not NAME=ID with ID >= 0 '
                       "(e.g. 'Tumor=1,Stroma=2'; for names holding ',' or '=' give a "
                       'JSON object: \'{"Tumor, grade 2": 1}\')')
    if name in out:
      raise ValueError(f'mask_classes: class {name!r} is given twice')
    out[name] = label
  if not out:
    raise ValueError("mask_classes: empty (e.g. 'Tumor=1,Stroma=2')")
  return out


def _parse_json_classes(text: str) -> dict[str, int]:
  if len(text) > 1 << 20:
    raise ValueError('mask_classes: more than 1 MiB of JSON')
  try:
    pairs = json.loads(text, object_pairs_hook=lambda kv: kv)
  except (ValueError, RecursionError) as e:
    raise ValueError(f'mask_classes: not a valid JSON object ({str(e)[:80]})') from None
  if not isinstance(pairs, list) or not pairs:
    raise ValueError('mask_classes: the JSON object is empty')
  out: dict[str, int] = {}
  for name, label in pairs:
    if type(label) is not int or label < 0:   # pylint: disable=unidiomatic-typecheck  # not bool
      raise ValueError(f'mask_classes: class {name!r} maps to {json.dumps(label)[:40]}, '
                       'not an integer id >= 0')
    if name in out:
      raise ValueError(f'mask_classes: class {name!r} is given twice')
    out[name] = label
  return out


def looks_like_json(path) -> bool:
  """Whether the file's first non-blank byte opens a JSON object or array (or it starts
  with a UTF-16/32 byte order mark: JSON in another encoding, which `read_geojson` then
  names)."""
  with reading.open_regular(path, '--mask file') as f:
    head = f.read(4096)
  if head.startswith((b'\xff\xfe', b'\xfe\xff', b'\x00\x00\xfe\xff')):
    return True
  head = head.lstrip()
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


def _number(v) -> bool:
  return type(v) in (int, float)   # pylint: disable=unidiomatic-typecheck  # not bool


def _rings(polygon: Any, where: str) -> list[np.ndarray]:
  """A polygon's rings as [n, 2] float64 (the closing position dropped): numbers only,
  at least 3 distinct corners; an unclosed ring is closed (GeoJSON asks for closed)."""
  if not isinstance(polygon, list) or not polygon:
    raise ValueError(f'{where}: a polygon must be a non-empty list of rings')
  rings = []
  for k, ring in enumerate(polygon):
    if not isinstance(ring, list) or not all(
        isinstance(p, list) and len(p) >= 2 and _number(p[0]) and _number(p[1])
        for p in ring):
      raise ValueError(f'{where}: ring {k} must be a list of [x, y] positions of numbers '
                       '(not strings, booleans or null)')
    a = np.array([(p[0], p[1]) for p in ring], np.float64).reshape(-1, 2)
    if len(a) > 1 and (a[0] == a[-1]).all():
      a = a[:-1]
    if len(a) < 3:
      raise ValueError(f'{where}: ring {k} has {len(a)} distinct corners; a ring needs '
                       'at least 3')
    rings.append(a)
  return rings


def _inside_points(edges: np.ndarray, pts: np.ndarray) -> np.ndarray:
  """Whether each point [P, 2] is inside the polygon of `edges` [E, 4] (even-odd rule)
  or within 1e-9 px of an edge, in blocks of points (memory O(block x E))."""
  out = np.empty(len(pts), bool)
  x0, y0, x1, y1 = (edges[:, k][None] for k in range(4))
  dx, dy = x1 - x0, y1 - y0
  step = max(1, _ROW_CHUNK_ELEMENTS // max(len(edges), 1))
  for s in range(0, len(pts), step):
    px, py = pts[s:s + step, :1], pts[s:s + step, 1:]
    crosses = (y0 > py) != (y1 > py)
    with np.errstate(divide='ignore', invalid='ignore'):
      xc = x0 + (py - y0) * dx / dy
      t = np.clip(((px - x0) * dx + (py - y0) * dy) / (dx * dx + dy * dy), 0, 1)
    odd = (crosses & (px < xc)).sum(axis=1) % 2 == 1
    t = np.nan_to_num(t)
    near = (np.hypot(x0 + t * dx - px, y0 + t * dy - py) <= 1e-9).any(axis=1)
    out[s:s + step] = odd | near
  return out


def _ring_edges(ring: np.ndarray) -> np.ndarray:
  """[n, 4] (x0, y0, x1, y1) of a ring, closed."""
  return np.concatenate([ring, np.roll(ring, -1, axis=0)], axis=1)


def _edges(polygon: list[np.ndarray]) -> np.ndarray:
  """[E, 4] (x0, y0, x1, y1) of every ring, closed, without horizontal edges."""
  out = [_ring_edges(ring) for ring in polygon]
  out = [e[e[:, 1] != e[:, 3]] for e in out]
  return np.concatenate(out)


def _check_holes(rings: list[np.ndarray], where: str) -> None:
  """Every hole's corners inside its shell (or on its edge): a hole outside would be
  painted as the class by the even-odd rule."""
  if len(rings) < 2:
    return
  shell = _ring_edges(rings[0])
  for k, hole in enumerate(rings[1:], 1):
    if not _inside_points(shell, hole).all():
      raise ValueError(f'{where}: hole (ring {k}) is not inside its shell (ring 0)')


class GeoJSONLabels(label_maps.RowMap):
  """Annotations as a label map [H, W] rasterized on demand (module doc); it slices by
  rows like `label_maps.LabelMap`, so the writers and the image stage take either."""

  def __init__(self, polygons: list[tuple[int, np.ndarray]], hw, dtype):
    self.polygons = polygons          # (label, edges [E, 4]) in painting order
    self.shape = tuple(int(v) for v in hw)
    self.dtype = np.dtype(dtype)
    self._present = None
    self.counts = {}                  # class name -> {'id', 'polygons', 'holes'} (read_geojson)

  def sample(self, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Labels at the points (xs[j], ys[i]) (pixel coordinates, each ascending):
    [len(ys), len(xs)]. Memory: the output and blocks of O(_ROW_CHUNK_ELEMENTS)."""
    out = np.zeros((len(ys), len(xs)), self.dtype)
    for label, edges in self.polygons:
      _paint(out, label, edges, ys, xs)
    return out

  def rows(self, r0: int, r1: int) -> np.ndarray:
    return self.sample(np.arange(r0, r1) + 0.5, np.arange(self.shape[1]) + 0.5)

  def latent(self, factor: int) -> np.ndarray:
    """The pixels [::f, ::f], rasterized at those pixels only: [H / f, W / f]."""
    self._check_factor(factor)
    h, w = self.shape
    return self.sample(np.arange(0, h, factor) + 0.5, np.arange(0, w, factor) + 0.5)

  def bands(self, rows: int | None = None):
    rows = rows or max(1, BAND_PIXELS // self.shape[1])
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


def _paint(out: np.ndarray, label: int, edges: np.ndarray, ys: np.ndarray,
           xs: np.ndarray) -> None:
  """Sets out[i, j] = label where (xs[j], ys[i]) is inside the polygon (even-odd rule);
  ys, xs ascending. Only the points within the polygon's bounding box are tested, in
  blocks of rows of at most _ROW_CHUNK_ELEMENTS (rows x (edges + columns)) elements, each
  written into `out` at once: memory grows with the output, not the bounding box."""
  y_lo, y_hi = edges[:, [1, 3]].min(), edges[:, [1, 3]].max()
  x_lo, x_hi = edges[:, [0, 2]].min(), edges[:, [0, 2]].max()
  r0, r1 = np.searchsorted(ys, y_lo, 'left'), np.searchsorted(ys, y_hi, 'left')
  c0, c1 = np.searchsorted(xs, x_lo, 'left'), np.searchsorted(xs, x_hi, 'left')
  if r0 >= r1 or c0 >= c1:
    return
  x0, y0, x1, y1 = (edges[:, k] for k in range(4))
  span = x_hi - x_lo + 2.0
  q = xs[c0:c1] - x_lo + 1                                       # [c] in [1, span)
  n_cols = c1 - c0
  step = max(1, _ROW_CHUNK_ELEMENTS // (len(edges) + n_cols))
  for s in range(r0, r1, step):
    y = ys[s:min(s + step, r1)][:, None]                         # [r, 1]
    crosses = (y0 > y) != (y1 > y)                               # [r, E]: half-open rule
    with np.errstate(divide='ignore', invalid='ignore'):
      xc = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
    xc = np.where(crosses, np.clip(xc, x_lo - 1, x_hi + 1), x_hi + 1) - x_lo + 1   # [0, span)
    xc.sort(axis=1)
    r = xc.shape[0]
    offset = np.arange(r)[:, None] * span
    flat = (xc + offset).ravel()                                 # sorted: rows ascend
    count = np.searchsorted(flat, (q[None, :] + offset).ravel(), side='left').reshape(r, -1)
    count -= np.arange(r)[:, None] * xc.shape[1]                 # crossings left of x
    block = out[s:s + r, c0:c1]
    block[(count & 1).astype(bool)] = label


def _names(names) -> str:
  """Class names, each quoted (a name may hold ', ')."""
  return ', '.join(json.dumps(n, ensure_ascii=False)[:80] for n in sorted(names))


def read_geojson(path, classes: dict[str, int], hw, num_classes: int | None = None
                 ) -> GeoJSONLabels:
  """Checks and loads annotations (module doc); every problem is one ValueError naming
  the file and what is wrong: unmapped classes, unsupported geometry types, coordinates
  outside the H x W image or not finite, ids the model does not know."""
  name = reading.printable(path)
  doc = reading.read_json(path, 'GeoJSON', max_bytes=MAX_BYTES, max_depth=MAX_DEPTH,
                          allow_nan=False, max_ratio=MAX_PARSED_RATIO)
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
    for j, polygon in enumerate(parts):
      where = f'{name}: feature {i}' + (f' polygon {j}' if kind == 'MultiPolygon' else '')
      rings = _rings(polygon, where)
      pts = np.concatenate(rings)
      if not np.isfinite(pts).all():
        raise ValueError(f'{name}: feature {i} has coordinates that are not finite numbers')
      if pts[:, 0].min() < 0 or pts[:, 1].min() < 0 or pts[:, 0].max() > w \
          or pts[:, 1].max() > h:
        outside += 1
        continue
      _check_holes(rings, where)
      edges = _edges(rings)
      if len(edges):
        polygons.append((classes[cls], edges))
        seen = counts.setdefault(cls, {'id': classes[cls], 'polygons': 0, 'holes': 0})
        seen['polygons'] += 1
        seen['holes'] += len(rings) - 1      # rings after the first are holes
  problems = []
  if unmapped:
    odd = any(',' in c or '=' in c or c != c.strip() for c in unmapped)
    problems.append(f'classes not in --mask_classes: {_names(unmapped)} (mapped: '
                    f'{_names(classes)})' + ('; names with \',\', \'=\' or spaces at their ends '
                    'are given as a JSON object, --mask_classes=\'{"name": id}\'' if odd else ''))
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
  out = GeoJSONLabels(polygons, (h, w), label_maps.compact_dtype(top))
  out.counts = {name: counts[name] for name in sorted(counts, key=lambda n: counts[n]['id'])}
  return out
