"""The plan of a request (`estimate.py`, `--dry_run`): its counts against real runs, a dry
run that writes nothing, a refused size reported rather than raised."""

import json
import os

import numpy as np
import pytest

from tiled_ldm_jax import estimate
from tiled_ldm_jax import generate

from test_pipeline import config, models  # noqa: F401  (fixtures)
from tiled_ldm_jax.files import label_maps


def test_labels_per_window():
  lab = np.zeros((1, 8, 12), np.int32)
  lab[0, :, 4:] = 1          # windows of 4: [0] [1] [1]  twice
  lab[0, 4:, 8:] = 2         # last row: [0] [1] [2]
  assert estimate.labels_per_window(lab, 4, 3) == pytest.approx(4 / 6)


@pytest.mark.parametrize('inpaint', [False, True])
def test_plan_counts_match_the_run(models, tmp_path, inpaint):
  """Grid iterations exact; windows (expected over offsets) and samples (labels counted on
  the given map) close to what the run counted; also with a keep mask whose border
  windows run resampling passes."""
  labels = np.zeros((256, 384), np.int32)
  labels[:, 128:] = 1
  labels[128:, 256:] = 3
  path = tmp_path / 'labels.png'
  label_maps.write_label_png(path, labels)
  extra = {}
  if inpaint:
    from PIL import Image  # pylint: disable=g-import-not-at-top
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (256, 384, 3), np.uint8)).save(
        tmp_path / 'init.png')
    keep = np.zeros((256, 384), np.uint8)
    keep[:, :200] = 1
    Image.fromarray(keep).save(tmp_path / 'keep.png')
    extra = dict(init_image=str(tmp_path / 'init.png'), keep_mask=str(tmp_path / 'keep.png'),
                 resample=2)
  cfg = config(models, tmp_path / 'out', mask=str(path), image_size=None, sampling_steps=5,
               grid_margin_levels=2, **extra)
  plan = generate.prepare(cfg)
  work = plan.work['stages']['image_stage']
  assert 'mask_stage' not in plan.work['stages']
  assert work['latent_shape'] == [1, 32, 48, 4]
  (record,) = generate.run(plan)
  assert record['plan'] == plan.work
  ran = record['image_stage']
  assert work['patch_iterations'] == ran['patch_iterations']
  assert abs(work['unet_samples'] - ran['denoiser_evaluations']) <= 0.25 * ran['denoiser_evaluations']
  assert (work['resampled_windows'] > 0) == inpaint


def test_mask_stage_plan_is_exact(models, tmp_path):
  cfg = config(models, tmp_path, image_size='256x384', sampling_steps=3)
  plan = generate.prepare(cfg)
  (record,) = generate.run(plan)
  work = plan.work['stages']['mask_stage']
  assert work['latent_shape'] == [1, 8, 12, 4]
  assert work['patch_iterations'] == record['mask_stage']['patch_iterations']
  assert work['unet_samples'] == record['mask_stage']['denoiser_evaluations']


def test_dry_run_writes_nothing_and_times(models, tmp_path):
  out = tmp_path / 'never'
  plan = generate.prepare(config(models, out, dry_run=True))
  p = generate.dry_run(plan)
  assert not os.path.exists(out)
  json.dumps(p)                                   # one JSON line
  assert p['seconds'] > 0 and p['refused'] == []
  for s in p['stages'].values():
    assert s['unet_seconds'] > 0 and s['decoder_seconds'] > 0 and s['unet_tflop'] > 0
  text = estimate.summary(p)
  assert 'image_stage' in text and 'mask_stage' in text and 'GiB' in text


def test_dry_run_reports_a_refused_size(models, tmp_path):
  """A size the run would refuse for memory: the dry run says so and still plans it."""
  cfg = config(models, tmp_path / 'x', image_size=200_000, patch_size=512,
               mask_patch_size=512, dry_run=True, output_format='tiff')
  plan = generate.prepare(cfg)
  assert any('GiB of host memory' in why for why in plan.refused)
  assert plan.work['stages']['image_stage']['latent_shape'] == [1, 25000, 25000, 4]
  with pytest.raises(ValueError, match='GiB of host memory'):
    generate.prepare(config(models, tmp_path / 'x', image_size=200_000, patch_size=512,
                            mask_patch_size=512, output_format='tiff'))
  assert not os.path.exists(tmp_path / 'x')
