"""Images of any shape: `--image_size=HxW`, a `--mask` file's own size as the default,
and non-square sizes through the API (mask stage included)."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from tiled_ldm_jax import demo
from tiled_ldm_jax import generate
from tiled_ldm_jax import pipeline
from tiled_ldm_jax import request

from test_pipeline import config, models  # noqa: F401  (fixtures)
from tiled_ldm_jax.files import label_maps


def test_image_hw():
  assert request.image_hw(256) == (256, 256)
  assert request.image_hw('256') == (256, 256)
  assert request.image_hw('256x384') == (256, 384)
  assert request.image_hw('256X384') == (256, 384)
  assert request.image_hw((256, 384)) == (256, 384)
  assert request.mask_hw((256, 384), 8) == (64, 96)
  for bad in ('abc', '1x2x3', '0x8', -8, 'x8'):
    with pytest.raises(ValueError, match='image_size'):
      request.image_hw(bad)


def _outputs(folder):
  img = np.asarray(Image.open(os.path.join(folder, 'sample0000.png')))
  mask = label_maps.read_label_png(os.path.join(folder, 'sample0000_mask.png'))
  with open(os.path.join(folder, 'sample0000.json')) as f:
    return img, mask, json.load(f)


def test_hxw_with_the_mask_model(models, tmp_path):
  # The demo mask model: its maps hold classes (the reference one's clean up to all 0).
  generate.generate(config(models, tmp_path, image_size='256x384', sampling_steps=2,
                           mask_unet_ckpt=demo.model_path('mask_unet')))
  img, mask, record = _outputs(tmp_path)
  assert img.shape == (256, 384, 3) and mask.shape == (256, 384)
  assert record['image_size'] == [256, 384]
  assert record['config']['image_size'] == '256x384'
  assert set(np.unique(mask)) <= set(range(5)) and len(np.unique(mask)) > 1


def test_mask_file_size_is_the_default(models, tmp_path):
  labels = np.zeros((128, 192), np.int32)
  labels[:, 64:] = 1
  labels[64:, 128:] = 3
  path = tmp_path / 'labels.png'
  label_maps.write_label_png(path, labels)
  cfg = config(models, tmp_path / 'out', mask=str(path), image_size=None, sampling_steps=2)
  plan = generate.prepare(cfg)
  assert plan.cfg.size == (128, 192) and plan.mask.shape == (128, 192)
  generate.run(plan)
  img, mask, _ = _outputs(tmp_path / 'out')
  assert img.shape == (128, 192, 3)
  np.testing.assert_array_equal(mask, labels)        # the map itself, not resized
  # Given a size, the map is resized to it (nearest), as before.
  plan = generate.prepare(config(models, tmp_path / 'o2', mask=str(path), image_size='256x384'))
  np.testing.assert_array_equal(plan.mask, labels.repeat(2, 0).repeat(2, 1))


def test_bad_sizes_refused_before_work(models, tmp_path):
  for size, match in (('260x256', 'multiple of 8'), ('256x0', 'positive'),
                      ('big', 'N or HxW')):
    with pytest.raises(ValueError, match=match):
      generate.prepare(config(models, tmp_path / 'o', image_size=size))
  assert not os.path.exists(tmp_path / 'o')


def test_api_non_square_labels(models):
  pipe = pipeline.Pipeline.from_pretrained(models['image_unet'], models['vae'],
                                           models['mask_unet'])
  labels = pipe.sample_labels(label=1, image_size=(256, 384), sampling_steps=2,
                             patch_size=128)
  assert labels.shape == (1, 256, 384)
