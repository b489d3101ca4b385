"""The round trip: a slide the demo models generate (pyramidal TIFF + the QuPath GeoJSON
written beside it) is training data -- a tiny image U-Net trains on it for a few steps
through a slide manifest -- and the trained model samples a slide for those annotations.

Small on purpose (128 px slide, 32 px tiles, 3 steps, 1 sampling step): it checks that the
pieces connect, not that the model learns (docs/training.md has a longer run)."""

import json
import os

import numpy as np
import pytest

from tiled_ldm_jax import demo
from tiled_ldm_jax import generate
from tiled_ldm_jax import training
from tiled_ldm_jax.files import geojson_labels
from tiled_ldm_jax.models import configs

pytest.importorskip('openslide')
pytest.importorskip('grain')

SIDE = 128
UNET = configs.UNetConfig(kind='image', dim=8, num_classes=5, dim_mults=(1,),
                          resnet_block_groups=4, block_per_layer=1)
CLASSES = 'label 1=1,label 2=2,label 3=3,label 4=4'   # the names written without --mask_classes


def test_generated_slide_trains_and_samples(tmp_path):
  gen = tmp_path / 'generated'
  [record] = generate.generate(generate.GenerationConfig.from_flat(
      imgs_path=str(gen), image_size=SIDE, mask='demo', sampling_steps=1, progress_every=0,
      output_format='tiff', mpp=1.0))
  slide, ann = gen / record['files']['image'], gen / record['files']['annotations']
  mask = np.asarray(geojson_labels.read_geojson(
      str(ann), geojson_labels.parse_classes(CLASSES), (SIDE, SIDE)))
  import tifffile  # pylint: disable=g-import-not-at-top
  np.testing.assert_array_equal(mask, tifffile.imread(gen / record['files']['mask']))
  manifest = tmp_path / 'slides.csv'
  manifest.write_text(f'slide,annotations\n{slide},{ann}\n')

  model = tmp_path / 'unet.py'
  d = {'model': 'image_unet', **configs.config_to_dict(UNET)}
  d.pop('kind', None)
  model.write_text(f'def get_config():\n  return {d!r}\n')
  cfg = training.from_config(dict(
      task='image_unet', model=str(model), steps=3, batch_size=2, image_size=32, lr=3e-3,
      log_every=1, save_every=3, data=str(manifest), mpp=1.0, vae=demo.model_path('vae'),
      seed=1))
  summary = training.train(cfg, UNET, str(tmp_path / 'run'))
  with open(tmp_path / 'run' / 'metrics.jsonl') as f:
    losses = [json.loads(line)['loss'] for line in f]
  assert len(losses) == 3 and np.all(np.isfinite(losses))
  assert summary['export'] and os.path.isdir(summary['export'])

  [sampled] = generate.generate(generate.GenerationConfig.from_flat(
      imgs_path=str(tmp_path / 'sampled'), unet_ckpt=summary['export'],
      vae_ckpt=demo.model_path('vae'), mask=str(ann), mask_classes=CLASSES,
      image_size=SIDE, sampling_steps=1, patch_size=64, progress_every=0))
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(tmp_path / 'sampled' / sampled['files']['image']) as im:
    assert im.size == (SIDE, SIDE)
  np.testing.assert_array_equal(
      np.asarray(Image.open(tmp_path / 'sampled' / sampled['files']['mask'])), mask)
