"""Label maps from QuPath-style GeoJSON: the rasterized map equals the polygons (an
independent per-pixel even-odd test), painted in file order with holes; the `_mask` a run
writes equals it; bad files and flags are one error line before any work."""

import dataclasses
import json
import os

import numpy as np
from PIL import Image
import pytest

from tiled_ldm_jax import generate
from tiled_ldm_jax.files import geojson_labels as gj

from test_pipeline import config, models  # noqa: F401  (fixtures)
from tiled_ldm_jax.files import label_maps

H, W = 768, 1024
CLASSES = {'Tumor': 1, 'Stroma': 2, 'Necrosis': 3}


def feature(cls, kind, coords):
  return {'type': 'Feature', 'geometry': {'type': kind, 'coordinates': coords},
          'properties': {'classification': {'name': cls, 'color': [200, 0, 0]},
                         'isLocked': False}}


def annotations():
  tumor = [[[100.5, 80.2], [700.3, 80.2], [700.3, 500.7], [100.5, 500.7], [100.5, 80.2]],
           [[300, 200], [400, 200], [400, 300], [300, 300], [300, 200]]]       # with a hole
  stroma = [[[650, 420.5], [1020, 700.25], [600.75, 760], [650, 420.5]]]       # a triangle
  necrosis = [[[[0, 0], [120, 0], [120, 90.5], [0, 90.5]]],                   # two parts,
              [[[500, 450], [560, 450], [560, 600], [500, 600], [500, 450]]]]  # over tumor
  return {'type': 'FeatureCollection', 'features': [
      feature('Tumor', 'Polygon', tumor), feature('Stroma', 'Polygon', stroma),
      feature('Necrosis', 'MultiPolygon', necrosis)]}


def brute_force(doc, h, w):
  """Per pixel centre, the classic even-odd crossing test (PNPOLY), feature by feature."""
  py, px = np.mgrid[0:h, 0:w] + 0.5
  out = np.zeros((h, w), np.int32)
  for feat in doc['features']:
    geom = feat['geometry']
    polys = [geom['coordinates']] if geom['type'] == 'Polygon' else geom['coordinates']
    union = np.zeros((h, w), bool)
    for poly in polys:
      inside = np.zeros((h, w), bool)
      for ring in poly:
        ring = np.asarray(ring, float)
        for (x0, y0), (x1, y1) in zip(ring, np.roll(ring, -1, axis=0)):
          if y0 == y1:
            continue
          cross = ((y0 > py) != (y1 > py)) & (px > x0 + (py - y0) * (x1 - x0) / (y1 - y0))
          inside ^= cross
      union |= inside
    out[union] = CLASSES[feat['properties']['classification']['name']]
  return out


def write(tmp_path, doc, name='ann.geojson'):
  path = tmp_path / name
  path.write_text(json.dumps(doc))
  return str(path)


def test_rasterized_map_equals_the_polygons(tmp_path):
  doc = annotations()
  m = gj.read_geojson(write(tmp_path, doc), CLASSES, (H, W))
  want = brute_force(doc, H, W)
  assert set(np.unique(want)) == {0, 1, 2, 3}
  np.testing.assert_array_equal(np.asarray(m), want)
  np.testing.assert_array_equal(m[100:357], want[100:357])
  np.testing.assert_array_equal(m.latent(8), want[::8, ::8])
  assert m.present() == [0, 1, 2, 3] and m.dtype == np.uint8
  assert (want[250, 350] == 0) and want[520, 530] == 3     # the hole; painted later


def scaled(doc, s):
  """The annotations with every coordinate times s (a smaller run of the same layout)."""
  def walk(c):
    return [walk(v) for v in c] if isinstance(c[0], list) else [v * s for v in c]
  out = json.loads(json.dumps(doc))
  for feat in out['features']:
    feat['geometry']['coordinates'] = walk(feat['geometry']['coordinates'])
  return out


def test_run_writes_the_rasterized_mask(models, tmp_path):
  doc = scaled(annotations(), 0.25)            # 192 x 256 (the 768 x 1024 example's layout)
  path = write(tmp_path, doc)
  h, w = H // 4, W // 4
  cfg = config(models, tmp_path / 'out', mask=path, mask_classes='Tumor=1,Stroma=2,Necrosis=3',
               image_size=f'{h}x{w}', sampling_steps=1, output_format='tiff')
  (record,) = generate.generate(cfg)
  tifffile = pytest.importorskip('tifffile')
  mask = tifffile.imread(tmp_path / 'out' / 'sample0000_mask.tif')
  np.testing.assert_array_equal(mask, brute_force(doc, h, w))
  assert record['labels_present'] == [0, 1, 2, 3] and record['image_size'] == [h, w]
  assert record['files']['overview'] == 'sample0000_overview.jpg'   # beside the TIFF
  with Image.open(tmp_path / 'out' / 'sample0000_overview.jpg') as im:
    assert im.format == 'JPEG' and im.size == (2 * w + 8, h)
  assert 'mask_stage' not in record['plan']['stages']
  # Beside the TIFF, its labels as QuPath GeoJSON (class names from --mask_classes): read
  # back by --mask, the same map (output/geojson.py).
  assert record['files']['annotations'] == 'sample0000_mask.geojson'
  back = gj.read_geojson(str(tmp_path / 'out' / 'sample0000_mask.geojson'), CLASSES, (h, w))
  np.testing.assert_array_equal(np.asarray(back), mask)
  assert sorted(back.counts) == sorted(CLASSES)


def test_parse_classes():
  assert gj.parse_classes('Tumor=1, Stroma = 2') == {'Tumor': 1, 'Stroma': 2}
  assert gj.parse_classes('Other: a=b=3') == {'Other: a=b': 3}
  for bad in ('Tumor', 'Tumor=x', '=1', 'Tumor=-1', 'A=1,A=2', ''):
    with pytest.raises(ValueError, match='mask_classes'):
      gj.parse_classes(bad)


@pytest.mark.parametrize('change,message', [
    (lambda d: d['features'].append(feature('Immune cells', 'Polygon',
                                            [[[1, 1], [5, 1], [5, 5]]])),
     'classes not in --mask_classes: "Immune cells"'),
    (lambda d: d['features'].append(feature('Tumor', 'LineString', [[1, 1], [5, 5]])),
     'unsupported geometry types: LineString'),
    (lambda d: d['features'].append(feature('Tumor', 'Polygon',
                                            [[[1, 1], [1500, 1], [5, 5]]])),
     'outside the 768x1024 image'),
    (lambda d: d['features'][0]['properties'].pop('classification'),
     'without properties.classification.name'),
    (lambda d: d['features'].append(feature('Tumor', 'Polygon', [[[1, 1], [2, 2]]])),
     'at least 3'),
    (lambda d: d.update(type='Topology'), 'not a GeoJSON FeatureCollection'),
])
def test_bad_annotations_are_one_error(tmp_path, change, message):
  doc = annotations()
  change(doc)
  with pytest.raises(ValueError, match=message):
    gj.read_geojson(write(tmp_path, doc), CLASSES, (H, W))


def test_bad_files_and_flags_before_any_work(models, tmp_path):
  good = write(tmp_path, annotations())
  nan = tmp_path / 'nan.geojson'
  nan.write_text('{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": '
                 '[[[NaN, 1], [5, 1], [5, 5]]]}, "properties": {}}')
  cut = tmp_path / 'cut.geojson'
  cut.write_text(json.dumps(annotations())[:200])
  out = tmp_path / 'out'
  cases = [
      (dict(mask=good, image_size=f'{H}x{W}'), 'give --mask_classes'),
      (dict(mask=good, mask_classes='Tumor=1,Stroma=2,Necrosis=3', image_size=None),
       'give --image_size'),
      (dict(mask=str(nan), mask_classes='Tumor=1', image_size='256'), 'not valid JSON'),
      (dict(mask=str(cut), mask_classes='Tumor=1', image_size='256'), 'not valid JSON'),
      (dict(mask=good, mask_classes='Tumor=1,Stroma=2,Necrosis=9', image_size=f'{H}x{W}'),
       "outside the model's classes"),
      (dict(mask=good, mask_classes='Tumor=1,Stroma=2', image_size=f'{H}x{W}'),
       'classes not in --mask_classes: "Necrosis"'),
  ]
  for kw, message in cases:
    with pytest.raises(ValueError, match=message):
      generate.prepare(config(models, out, **kw))
  png = tmp_path / 'labels.png'
  label_maps.write_label_png(png, np.ones((64, 64), np.int32))
  with pytest.raises(ValueError, match='only for a GeoJSON'):
    generate.prepare(config(models, out, mask=str(png), mask_classes='Tumor=1'))
  assert not os.path.exists(out)


def test_dry_run_label_report(tmp_path):
  """What --dry_run says about annotations: each class's polygons, holes and share of
  the image (exact here: the map is sampled at every pixel up to 1024 px)."""
  doc = annotations()
  m = gj.read_geojson(write(tmp_path, doc), CLASSES, (H, W))
  report, small = generate.label_report(m)
  want = brute_force(doc, H, W)
  np.testing.assert_array_equal(small, want)
  assert report['sampled_every_px'] == 1
  share = np.bincount(want.ravel()) / want.size
  assert report['share'] == {i: round(float(s), 4) for i, s in enumerate(share)}
  assert {n: (c['id'], c['polygons'], c['holes']) for n, c in report['classes'].items()} == {
      'Tumor': (1, 1, 1), 'Stroma': (2, 1, 0), 'Necrosis': (3, 2, 0)}
  text = generate.label_summary(report)
  assert 'id 1 Tumor: 29.9% of the image, 1 polygon(s), 1 hole(s)' in text, text
  assert 'id 0 unannotated' in text
  # A larger map is sampled on a grid of at most 1024 px (never rasterized whole).
  big = gj.read_geojson(write(tmp_path, scaled(doc, 4)), CLASSES, (4 * H, 4 * W))
  report, small = generate.label_report(big)
  assert report['sampled_every_px'] == 4 and small.shape == (H, W)
  assert abs(report['share'][1] - share[1]) < 0.01


def test_preview_flag_checks(tmp_path):
  cfg = generate.GenerationConfig(mask='demo', preview=str(tmp_path / 'p.png'))
  with pytest.raises(ValueError, match='--preview is for --dry_run'):
    generate.prepare(cfg)
  with pytest.raises(ValueError, match='must be a .png'):
    generate.prepare(dataclasses.replace(cfg, dry_run=True, preview=str(tmp_path / 'p.jpg')))
  assert not os.listdir(tmp_path)
