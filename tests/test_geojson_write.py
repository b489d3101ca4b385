"""Label maps written as QuPath GeoJSON (output/geojson.py): read back by `--mask=`'s
reader (files/geojson_labels.py) to the same map, holes and islands in holes included,
with the fields QuPath's own export writes."""

import json

import numpy as np
from PIL import Image

try:   # the lazy label map's home (it moved from masks.py to files/label_maps.py)
  from tiled_ldm_jax.files import label_maps
except ImportError:
  from tiled_ldm_jax import masks as label_maps
from tiled_ldm_jax.files import geojson_labels
from tiled_ldm_jax.output import geojson as geojson_out


def _round_trip(tmp_path, labels, classes=None):
  path = tmp_path / 'labels.geojson'
  geojson_out.write_geojson(path, labels, classes)
  classes = classes or geojson_out.default_classes(int(np.max(labels)) + 1)
  back = geojson_labels.read_geojson(str(path), classes, np.shape(labels))
  return np.asarray(back), json.loads(path.read_text())


def test_round_trip_random_maps(tmp_path):
  """Noise (every diagonal step and one-pixel region there is) and blocky maps."""
  rng = np.random.default_rng(0)
  for trial in range(6):
    h, w = (int(v) for v in rng.integers(1, 20, 2))
    if trial % 2:
      lab = rng.integers(0, 4, (h, w))
    else:
      small = rng.integers(0, 4, (4, 5)).astype(np.uint8)
      lab = np.asarray(Image.fromarray(small).resize((w, h), Image.NEAREST))
    back, _ = _round_trip(tmp_path, lab)
    np.testing.assert_array_equal(back, lab)


def test_holes_islands_and_qupath_fields(tmp_path):
  lab = np.zeros((40, 50), np.int32)
  lab[5:35, 5:45] = 1          # a shell ...
  lab[10:30, 10:40] = 0        # ... with a hole ...
  lab[15:25, 15:25] = 1        # ... holding an island of the same class
  lab[15:25, 30:35] = 2        # and another class in the hole
  back, doc = _round_trip(tmp_path, lab, {'Tumor': 1, 'Stroma': 2})
  np.testing.assert_array_equal(back, lab)
  assert doc['type'] == 'FeatureCollection' and len(doc['features']) == 2
  tumor = doc['features'][0]
  assert tumor['type'] == 'Feature' and tumor['geometry']['type'] == 'MultiPolygon'
  assert tumor['properties']['objectType'] == 'annotation'
  assert tumor['properties']['classification'] == {'name': 'Tumor', 'color': [214, 39, 40]}
  polys = tumor['geometry']['coordinates']
  assert sorted(len(p) for p in polys) == [1, 2]          # shell + hole; the island alone
  shell, hole = next(p for p in polys if len(p) == 2)
  area = lambda r: sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(r, r[1:]))
  assert shell[0] == shell[-1] and area(shell) > 0 > area(hole)   # closed, oriented
  assert shell[:-1] == [[5, 5], [45, 5], [45, 35], [5, 35]]       # corners only, level 0


def test_lazy_upscaled_map_is_traced_at_its_source(tmp_path):
  """A generated slide's labels (a nearest upscale of a small map) are traced small and
  scaled: the same polygons as the whole map's."""
  rng = np.random.default_rng(1)
  small = rng.integers(0, 3, (6, 8)).astype(np.uint8)
  lazy = label_maps.LabelMap(small, (48, 64))
  assert geojson_out.to_geojson(lazy) == geojson_out.to_geojson(np.asarray(lazy))
  back, _ = _round_trip(tmp_path, lazy)
  np.testing.assert_array_equal(back, np.asarray(lazy))
  # What generate checks before writing: the source counts, not the upscaled size.
  huge = label_maps.LabelMap(small, (6 << 12, 8 << 12))
  assert geojson_out.traceable(huge) and geojson_out.traceable(lazy)
  assert not geojson_out.traceable(label_maps.LabelMap(small, (1 << 14, 1 << 14)))   # not k x
