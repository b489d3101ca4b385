"""Slide training data (training/slides.py): a manifest of (slide, annotations), tiles at a
target um/px read through OpenSlide from our own pyramidal TIFF, label maps from the
GeoJSON written beside it (output/geojson.py), tissue only, class-balanced draws that are
pure functions of (seed, step, row), and one error line for each kind of bad input."""

import json
import os

import numpy as np
import pytest

from tiled_ldm_jax import training
from tiled_ldm_jax.files import geojson_labels
from tiled_ldm_jax.output import geojson as geojson_out
from tiled_ldm_jax.output import writers
from tiled_ldm_jax.training import data
from tiled_ldm_jax.training import slides

pytest.importorskip('openslide')

N = 512            # slide side (level 0), 0.5 um/px
RADIUS = 0.42      # tissue: a disc of this fraction of the side, glass around it


def _slide_arrays(seed=5):
  ex = data.synth_example(seed, N, data.SynthSpec(region_size=60))
  img, lab = ex.image.copy(), ex.labels.copy()
  yy, xx = np.mgrid[0:N, 0:N]
  glass = (yy + 0.5 - N / 2) ** 2 + (xx + 0.5 - N / 2) ** 2 > (RADIUS * N) ** 2
  img[glass] = 0.96
  lab[glass] = 0
  return (img * 255).astype(np.uint8), lab.astype(np.int32), ~glass


@pytest.fixture(scope='module')
def slide(tmp_path_factory):
  """An uncompressed 3-level pyramidal TIFF with mpp 0.5, its GeoJSON and manifests."""
  root = tmp_path_factory.mktemp('slides')
  img, lab, tissue = _slide_arrays()
  writers.write_tiff(root / 's.tif', [(0, img)], img.shape, mpp=0.5, compression='none',
                     tile=128)
  geojson_out.write_geojson(root / 's_mask.geojson', lab)
  (root / 'm.csv').write_text('slide,annotations\ns.tif,s_mask.geojson\n')
  (root / 'm.json').write_text(json.dumps([{'slide': 's.tif', 'annotations': 's_mask.geojson'}]))
  return {'root': root, 'image': img, 'labels': lab, 'tissue': tissue,
          'manifest': str(root / 'm.csv')}


def _source(slide, **kw):
  args = dict(size=32, batch_size=4, seed=1, mpp=0.5, augment=False)
  args.update(kw)
  return slides.SlideSource(slides.read_manifest(slide['manifest']), **args)


def test_manifest_forms(slide):
  csv_entries = slides.read_manifest(slide['manifest'])
  json_entries = slides.read_manifest(str(slide['root'] / 'm.json'))
  assert csv_entries == json_entries
  assert csv_entries[0].slide == str(slide['root'] / 's.tif') and csv_entries[0].mpp is None
  bad = slide['root'] / 'bad.csv'
  bad.write_text('slide,annotations,colour\ns.tif,,red\n')
  with pytest.raises(slides.SlideDataError, match='unknown field.*colour'):
    slides.read_manifest(str(bad))


def test_tiles_are_the_slide_and_its_annotations(slide):
  """At the slide's own mpp a tile is the level-0 pixels and the label map exactly; at
  twice the mpp it is read from level 1 (the 2x2 mean) with labels at pixel centres."""
  src = _source(slide)
  for step in range(3):
    for row in range(4):
      _, x, y, _, _ = src.draw(step, row)
      ex = src.step_example(step, row)
      xi, yi = int(x), int(y)
      assert (xi, yi) == (x, y)                    # tiles start on a level-0 pixel
      np.testing.assert_array_equal(ex.labels, slide['labels'][yi:yi + 32, xi:xi + 32])
      np.testing.assert_array_equal(np.round(ex.image * 255),
                                    slide['image'][yi:yi + 32, xi:xi + 32])
  src = _source(slide, mpp=1.0)
  even = [r for r in range(40) if src.draw(0, r)[1] % 2 == 0 and src.draw(0, r)[2] % 2 == 0]
  for row in (0, even[0]):
    ex = src.step_example(0, row)
    _, x, y, _, _ = src.draw(0, row)
    cy = np.floor(y + (np.arange(32) + 0.5) * 2).astype(int)
    cx = np.floor(x + (np.arange(32) + 0.5) * 2).astype(int)
    np.testing.assert_array_equal(ex.labels, slide['labels'][cy][:, cx])
  # Level 1 is the writer's rounded 2x2 mean; a tile at even (x, y) is its pixels.
  four = slide['image'].astype(np.int32).reshape(N // 2, 2, N // 2, 2, 3).sum((1, 3))
  level1 = (four + 2) // 4
  np.testing.assert_array_equal(np.round(ex.image * 255),
                                level1[int(y) // 2:int(y) // 2 + 32, int(x) // 2:int(x) // 2 + 32])


def test_draws_are_pure_functions_of_seed_step_row(slide):
  a, b = _source(slide, augment=True), _source(slide, augment=True)
  first = a.batch(3)
  for row in (2, 0, 3, 1):                         # any order, another source object
    ex = b.step_example(3, row)
    np.testing.assert_array_equal(ex.image, first['image'][row])
    np.testing.assert_array_equal(ex.labels, first['labels'][row])
  assert not np.array_equal(a.batch(4)['labels'], first['labels'])
  assert not np.array_equal(_source(slide, seed=2).batch(3)['labels'], first['labels'])


def test_tissue_mask_and_candidates(slide):
  """The thumbnail's saturated pixels are the disc; tiles are centred on tissue only."""
  img, tissue = slide['image'], slide['tissue']
  thumb = img.reshape(N // 8, 8, N // 8, 8, 3).mean((1, 3)).astype(np.uint8)
  got = slides.tissue_mask(thumb, 0.08)
  want = tissue.reshape(N // 8, 8, N // 8, 8).mean((1, 3)) > 0.5
  assert (got & want).sum() / (got | want).sum() > 0.9
  src = _source(slide)
  s = src.slides[0]
  gy, gx = np.divmod(s.cells, s.grid_w)
  cy, cx = ((gy + 0.5) * s.cell).astype(int), ((gx + 0.5) * s.cell).astype(int)
  assert tissue[cy, cx].mean() > 0.95
  # Glass everywhere: one line.
  white = slide['root'] / 'white.tif'
  writers.write_tiff(white, [(0, np.full((256, 256, 3), 245, np.uint8))], (256, 256, 3),
                     mpp=0.5)
  with pytest.raises(slides.SlideDataError, match='no tissue found'):
    slides.SlideSource([slides.SlideEntry(str(white))], 32, 2, 0)


def test_class_balance(slide):
  """class_balance 1: each class drawn as often; 0: as the annotated tissue areas."""
  for balance in (1.0, 0.0):
    src = _source(slide, class_balance=balance)
    drawn = np.array([src.draw(0, r)[3] for r in range(2000)])
    share = np.array([(drawn == c).mean() for c in src.classes])
    want = src.areas / src.areas.sum() if balance == 0 else np.full(len(src.classes),
                                                                       1 / len(src.classes))
    assert np.abs(share - want).max() < 0.035, (share, want)
  exclude = _source(slide, unannotated='exclude')
  assert 0 not in exclude.classes


def _bad(slide, name, text):
  path = slide['root'] / name
  path.write_text(text)
  return str(path)


def test_bad_input_is_one_line(slide, monkeypatch):
  root = slide['root']
  notslide = _bad(slide, 'notes.txt', 'not a slide\n')
  with pytest.raises(slides.SlideDataError, match='OpenSlide cannot open'):
    slides.SlideSource([slides.SlideEntry(notslide)], 32, 2, 0)
  nompp = root / 'nompp.tif'
  writers.write_tiff(nompp, [(0, slide['image'])], slide['image'].shape)
  with pytest.raises(slides.SlideDataError, match='records no resolution'):
    slides.SlideSource([slides.SlideEntry(str(nompp))], 32, 2, 0, mpp=1.0)
  slides.SlideSource([slides.SlideEntry(str(nompp), mpp=0.5)], 32, 2, 0, mpp=1.0)  # override
  with pytest.raises(slides.SlideDataError, match='finer than the slide'):
    _source(slide, mpp=0.25)
  doc = geojson_out.to_geojson(slide['labels'])
  shifted = json.loads(json.dumps(doc))
  shifted['features'][0]['geometry']['coordinates'][0][0][0] = [N + 10, 3]
  outside = _bad(slide, 'outside.geojson', json.dumps(shifted))
  with pytest.raises(slides.SlideDataError, match='outside the 512x512 image'):
    slides.SlideSource([slides.SlideEntry(str(root / 's.tif'), outside)], 32, 2, 0)
  with pytest.raises(slides.SlideDataError, match='classes not in mask_classes: "label 3"'):
    slides.SlideSource([slides.SlideEntry(str(root / 's.tif'), str(root / 's_mask.geojson'))],
                       32, 2, 0, classes={'label 1': 1, 'label 2': 2, 'label 4': 4})
  with pytest.raises(slides.SlideDataError, match='smaller than one tile'):
    _source(slide, size=600)
  monkeypatch.setattr(slides, 'THUMBNAIL_MAX_PIXELS', 100)      # a slide without a pyramid
  with pytest.raises(slides.SlideDataError, match='no pyramid level small enough'):
    _source(slide)


def test_three_networks_read_slides(slide, tmp_path):
  """A manifest is `data` for the VAE task (images, and mask images at the mask model's
  resolution: the same source the mask U-Net task reads); a train run's bad slide is an
  error before the workdir exists."""
  from test_train import TINY_VAE, _write_model_config  # pylint: disable=g-import-not-at-top
  vae_model = _write_model_config(tmp_path / 'vae.py', 'vae', TINY_VAE)
  cfg = training.from_config(dict(task='vae', model=vae_model, steps=1, batch_size=4,
                                  image_size=16, data=slide['manifest'], mpp=1.0,
                                  mask_image_fraction=0.5, mask_downscale=2))
  batch = training.make_task(cfg, TINY_VAE).batches(0)
  assert batch['image'].shape == (4, 16, 16, 3)
  src = slides.from_config(cfg, 2, with_images=False, downscale=4, stream=1)
  ex = src.step_example(0, 0)
  assert ex.image is None and ex.labels.shape == (16, 16) and src.slides[0].ds == 2.0
  assert ex.layout_class == data.folder_layout_class('', ex.labels)
  # The mask U-Net (encoding with the demo VAE): label maps and layout classes from the
  # same slides (the image U-Net trains on one in test_slide_training.py).
  from tiled_ldm_jax import demo  # pylint: disable=g-import-not-at-top
  from tiled_ldm_jax.models import configs  # pylint: disable=g-import-not-at-top
  for kind, num_classes, keys in (('mask', 2, {'labels', 'layout_class'}),):
    model_cfg = configs.UNetConfig(kind=kind, dim=8, num_classes=num_classes, dim_mults=(1,),
                                   resnet_block_groups=4, block_per_layer=1)
    path = _write_model_config(tmp_path / f'{kind}.py', f'{kind}_unet', model_cfg)
    cfg = training.from_config(dict(
        task=f'{kind}_unet', model=path, steps=1, batch_size=2, image_size=16,
        data=slide['manifest'], mpp=1.0, mask_downscale=2, vae=demo.model_path('vae')))
    with pytest.raises(configs.ConfigError, match='layout classes up to 4'):
      training.make_task(cfg, model_cfg)      # tiles' dominant labels 1-4, 2 classes
    model_cfg = configs.UNetConfig(kind=kind, dim=8, num_classes=5, dim_mults=(1,),
                                   resnet_block_groups=4, block_per_layer=1)
    batch = training.make_task(cfg, model_cfg).batches(0)
    assert set(batch) == keys and batch['labels'].shape == (2, 16, 16)
  _bad(slide, 'notes.txt', 'not a slide\n')
  bad = _bad(slide, 'bad.csv', 'slide,annotations\nnotes.txt,\n')
  work = tmp_path / 'work'
  with pytest.raises(slides.SlideDataError, match='OpenSlide cannot open'):
    training.train(training.from_config(dict(
        task='vae', model=vae_model, steps=1, batch_size=2, image_size=16, data=bad)),
        TINY_VAE, str(work))
  assert not work.exists()


def test_geojson_names_and_class_map():
  lab = np.zeros((8, 8), np.int32)
  lab[1:4, 1:4], lab[5:7, 5:7] = 1, 2
  doc = geojson_out.to_geojson(lab, {'Tumor': 1})
  names = [f['properties']['classification']['name'] for f in doc['features']]
  assert names == ['Tumor', 'label 2']
  assert geojson_labels.parse_classes('Tumor=1') == {'Tumor': 1}


def test_label_tiff_annotations_read_like_the_geojson(slide):
  """The same labels as a label TIFF (the sampler's `_mask.tif`) give the same tiles."""
  writers.write_labels(slide['root'] / 's_mask.tif', slide['labels'])
  entry = slides.SlideEntry(str(slide['root'] / 's.tif'), str(slide['root'] / 's_mask.tif'))
  tiff = slides.SlideSource([entry], 32, 4, 1, mpp=1.0)
  geo = _source(slide, mpp=1.0, augment=True)
  for step in range(2):
    np.testing.assert_array_equal(tiff.batch(step)['labels'], geo.batch(step)['labels'])


def test_missing_openslide_is_one_line(monkeypatch):
  import sys  # pylint: disable=g-import-not-at-top
  monkeypatch.setitem(sys.modules, 'openslide', None)     # import fails
  with pytest.raises(slides.SlideDataError, match=r'pip install -e \.\[slides\]'):
    slides.open_slide('x.svs')


def test_loader_threads_open_each_slide_once(slide, monkeypatch):
  """Through the grain loader (2 threads): each thread opens the slide once, not per tile;
  the batches equal the source's own."""
  from tiled_ldm_jax.training import loader as loader_lib  # pylint: disable=g-import-not-at-top
  src = _source(slide)
  opened = []
  real = slides.open_slide
  monkeypatch.setattr(slides, 'open_slide', lambda p: opened.append(p) or real(p))
  example = lambda s, r: data.record(src.step_example(s, r), True)
  it = loader_lib.Loader(example, 4, 6, process_index=0, process_count=1,
                         num_threads=2).iterator()
  for step in range(6):
    np.testing.assert_array_equal(next(it)['labels'], src.batch(step)['labels'])
  assert 1 <= len(opened) <= 3     # the loader's threads and this one, once each
