"""A label map as QuPath annotations: GeoJSON that `--mask=` (files/geojson_labels.py)
reads back to the same map, and that QuPath imports (File > Import objects, or drag the
file onto the image).

One Feature per label id > 0 present (0 is "unannotated", what the reader gives pixels
no feature holds), each a MultiPolygon: one polygon per 4-connected region of that id,
its outer ring and its holes (an island inside a hole is a polygon of its own). Rings
run along pixel edges, in level-0 pixel coordinates (x right, y down, origin at the
image's top-left corner, integers: pixel (i, j) is the square [j, j+1] x [i, i+1]), so
the reader's rule (a pixel takes the label of the polygon holding its centre, even-odd
per polygon) gives back every pixel exactly. Outer rings have a positive shoelace area
in these coordinates, holes a negative one (RFC 7946's counter-clockwise exteriors for
a y-up reader); collinear steps are merged, so a ring has only its corners.

QuPath's conventions (what its own GeoJSON export writes): a FeatureCollection of
Features with `properties.objectType` "annotation" and `properties.classification`
`{"name", "color": [r, g, b]}` (the names from `--mask_classes`, else "label N"; the
colours those of the label previews, `masks.colour_labels`).

Where two regions of an id touch only at a corner (a diagonal step), the trace keeps
them apart (the ring turns around the pixel it is on), so rings never cross; they may
touch at that corner, which QuPath accepts.
"""

from __future__ import annotations

import json
import uuid
from typing import Mapping

import numpy as np

from tiled_ldm_jax import masks as masks_lib
from tiled_ldm_jax.files import atomic

# Pixels traced at once (the whole map, or the lazy map's source): the ids, int32
# component labels and a few boolean planes, ~15 bytes a pixel (2 GiB at this limit).
MAX_TRACE_PIXELS = 1 << 27

# Edge directions: 0 +x, 1 +y, 2 -x, 3 -y (image coordinates, y down).
_DX = np.array([1, 0, -1, 0])
_DY = np.array([0, 1, 0, -1])


def _runs(a: np.ndarray):
  """(row, start, end) of every run of True along axis 1 of a 2-d bool array (end
  exclusive)."""
  p = np.pad(a, ((0, 0), (1, 1)))
  d = np.diff(p.astype(np.int8), axis=1)
  r0, c0 = np.nonzero(d == 1)
  r1, c1 = np.nonzero(d == -1)   # same rows, same order (row-major)
  del r1
  return r0, c0, c1


def _edges(m: np.ndarray):
  """Maximal straight boundary edges of mask m [H, W]: start x, y, end x, y, direction,
  oriented so the region is on the same side of every edge (outer rings positive)."""
  h, w = m.shape
  p = np.pad(m, 1)
  core = p[1:-1, 1:-1]
  top = core & ~p[:-2, 1:-1]
  bottom = core & ~p[2:, 1:-1]
  left = core & ~p[1:-1, :-2]
  right = core & ~p[1:-1, 2:]
  out = []
  r, a, b = _runs(top)                  # y = r, x from a to b: +x
  out.append((a, r, b, r, np.full_like(r, 0)))
  r, a, b = _runs(bottom)               # y = r + 1, x from b to a: -x
  out.append((b, r + 1, a, r + 1, np.full_like(r, 2)))
  c, a, b = _runs(right.T)              # x = c + 1, y from a to b: +y
  out.append((c + 1, a, c + 1, b, np.full_like(c, 1)))
  c, a, b = _runs(left.T)               # x = c, y from b to a: -y
  out.append((c, b, c, a, np.full_like(c, 3)))
  del h, w
  return [np.concatenate([o[k] for o in out]).astype(np.int64) for k in range(5)]


def _inside_pixel(x0, y0, d):
  """(row, col) of the region pixel beside the first unit step of an edge."""
  col = np.where(d == 0, x0, np.where(d == 1, x0 - 1, np.where(d == 2, x0 - 1, x0)))
  row = np.where(d == 0, y0, np.where(d == 1, y0, np.where(d == 2, y0 - 1, y0 - 1)))
  return row, col


def trace(m: np.ndarray) -> list[list[np.ndarray]]:
  """Polygons of a bool mask [H, W]: for each 4-connected region, [outer ring, holes...],
  each ring [n, 2] int64 (x, y) corners, not repeated at the end."""
  import scipy.ndimage  # pylint: disable=g-import-not-at-top  # jax's dependency
  m = np.asarray(m, bool)
  if not m.any():
    return []
  h, w = m.shape
  x0, y0, x1, y1, d = _edges(m)
  n = len(d)
  stride = w + 1
  key = (y0 * stride + x0) * 4 + d
  order = np.argsort(key)
  skey = key[order]

  def find(k):
    i = np.minimum(np.searchsorted(skey, k), n - 1)
    return np.where(skey[i] == k, order[i], -1)
  end = y1 * stride + x1
  # At a corner the boundary turns: +90 degrees (d + 1) if that edge exists, else -90. A
  # corner with both is a diagonal step; taking d + 1 there turns around the region's
  # own pixel, keeping diagonal neighbours apart.
  nxt = find(end * 4 + (d + 1) % 4)
  other = find(end * 4 + (d - 1) % 4)
  nxt = np.where(nxt >= 0, nxt, other)
  if (nxt < 0).any():
    raise AssertionError('open boundary')   # cannot happen: every corner has an exit
  comp, _ = scipy.ndimage.label(m)          # 4-connectivity (the default structure)
  pr, pc = _inside_pixel(x0, y0, d)
  edge_comp = comp[pr, pc]
  seen = np.zeros(n, bool)
  nxt_l = nxt.tolist()
  shells: dict[int, np.ndarray] = {}
  holes: dict[int, list[np.ndarray]] = {}
  for s in range(n):
    if seen[s]:
      continue
    ring = [s]
    e = nxt_l[s]
    while e != s:
      ring.append(e)
      e = nxt_l[e]
    idx = np.array(ring)
    seen[idx] = True
    pts = np.stack([x0[idx], y0[idx]], axis=1)
    area2 = int(np.sum(pts[:, 0] * np.roll(pts[:, 1], -1) - np.roll(pts[:, 0], -1) * pts[:, 1]))
    c = int(edge_comp[s])
    if area2 > 0:
      shells[c] = pts
    else:
      holes.setdefault(c, []).append(pts)
  return [[shells[c]] + holes.get(c, []) for c in sorted(shells)]


def _upscale_factor(labels) -> int | None:
  """k if `labels` is a lazy `LabelMap` holding an in-memory source that it upscales k
  times (nearest, both axes), else None. (Recognised by its attributes, not its class:
  the class has moved between modules.)"""
  if not all(hasattr(labels, a) for a in ('source', '_rows', '_cols')) or \
      hasattr(labels.source, 'read_rows'):
    return None
  (h, w), (sh, sw) = labels.shape, labels.source.shape
  if h % sh or w % sw or h // sh != w // sw:
    return None
  k = h // sh
  # pylint: disable=protected-access
  ok = (np.array_equal(labels._rows, np.arange(h) // k)
        and np.array_equal(labels._cols, np.arange(w) // k))
  return k if ok else None


def traceable(labels) -> bool:
  """Whether `to_geojson` takes this map (at most MAX_TRACE_PIXELS traced)."""
  k = _upscale_factor(labels)
  h, w = labels.source.shape if k else labels.shape
  return h * w <= MAX_TRACE_PIXELS


def _as_array_and_scale(labels) -> tuple[np.ndarray, int]:
  """(map to trace, integer factor to scale its coordinates by). A `label_maps.LabelMap`
  that is an integer nearest upscale of an in-memory source (the generated slides:
  label maps at mask-model or latent resolution) is traced at the source's size."""
  k = _upscale_factor(labels)
  if k:
    return np.asarray(labels.source), k
  h, w = labels.shape
  if h * w > MAX_TRACE_PIXELS:
    raise ValueError(f'a label map of {h} x {w} pixels is too large to trace into GeoJSON '
                     f'(at most {MAX_TRACE_PIXELS:,})')
  return np.asarray(labels), 1


def class_names(mask_classes: Mapping[str, int] | None, ids) -> dict[int, str]:
  """id -> QuPath class name: the first name `mask_classes` gives the id, else 'label N'."""
  names = {}
  for name, i in (mask_classes or {}).items():
    names.setdefault(int(i), name)
  return {int(i): names.get(int(i), f'label {int(i)}') for i in ids}


def default_classes(num_labels: int) -> dict[str, int]:
  """The class map of files written without --mask_classes: 'label N' -> N."""
  return {f'label {i}': i for i in range(1, num_labels)}


def to_geojson(labels, mask_classes: Mapping[str, int] | None = None) -> dict:
  """A FeatureCollection of `labels` (an [H, W] array or a lazy map; module doc)."""
  arr, k = _as_array_and_scale(labels)
  ids = [int(i) for i in np.unique(arr) if i > 0]
  names = class_names(mask_classes, ids)
  colours = masks_lib.colour_labels(np.array([ids], np.int64))[0] if ids else []
  features = []
  for i, colour in zip(ids, colours):
    polygons = trace(arr == i)
    coords = [[_closed(ring * k) for ring in poly] for poly in polygons]
    features.append({
        'type': 'Feature',
        # QuPath gives every object a UUID; a fixed one per (id, name) keeps files of the
        # same map identical.
        'id': str(uuid.uuid5(uuid.NAMESPACE_URL, f'tiled_ldm_jax/label/{i}/{names[i]}')),
        'geometry': {'type': 'MultiPolygon', 'coordinates': coords},
        'properties': {'objectType': 'annotation',
                       'classification': {'name': names[i],
                                          'color': [int(v) for v in colour]}},
    })
  return {'type': 'FeatureCollection', 'features': features}


def _closed(ring: np.ndarray) -> list[list[int]]:
  pts = ring.tolist()
  return pts + [pts[0]]


def write_geojson(path, labels, mask_classes: Mapping[str, int] | None = None, *,
                  atomic_write: bool = True) -> None:
  """`to_geojson(labels, mask_classes)` to `path`, atomically (unless the caller writes
  to a temporary name already)."""
  doc = to_geojson(labels, mask_classes)
  if not atomic_write:
    with open(path, 'w') as f:
      json.dump(doc, f, separators=(',', ':'))
    return
  with atomic.atomic_path(path) as tmp:
    write_geojson(tmp, labels, mask_classes, atomic_write=False)


def geojson_path(image_path) -> str:
  """Where the annotations of `image_path` go: `<stem>_mask.geojson` (beside `_mask.tif`)."""
  import os  # pylint: disable=g-import-not-at-top
  return os.path.splitext(os.fspath(image_path))[0] + '_mask.geojson'
