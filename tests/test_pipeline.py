"""End to end: the sample_large_image command on the converted reference models."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from tiled_ldm_jax import demo
from tiled_ldm_jax import masks
from tiled_ldm_jax import generate
from tiled_ldm_jax.files import label_maps

SCRIPT = os.path.join(os.path.dirname(__file__), '..', 'scripts', 'sample_large_image.py')


@pytest.fixture(scope='module')
def models(converted):
  """The converted reference models (conftest: converted once per run)."""
  return converted


def config(models, imgs_path, **kw):
  args = dict(unet_ckpt=models['image_unet'], vae_ckpt=models['vae'],
              mask_unet_ckpt=models['mask_unet'], imgs_path=str(imgs_path), image_size=256,
              sampling_steps=4, patch_size=128, progress_every=0)
  args.update(kw)
  return generate.GenerationConfig.from_flat(**args)


@pytest.fixture(scope='module')
def given_mask(tmp_path_factory):
  labels = np.zeros((100, 60), np.int32)   # any size: resized (nearest) to the image
  labels[:, 20:] = 1
  labels[50:, 40:] = 4
  labels[:10] = 0
  path = tmp_path_factory.mktemp('mask') / 'mask.png'
  label_maps.write_label_png(path, labels)
  return str(path)


def _check_outputs(folder, number, size, record_keys=('seed', 'checkpoint_sha256')):
  base = os.path.join(folder, f'sample{number:04d}')
  img = np.asarray(Image.open(base + '.png'))
  assert img.shape == (size, size, 3) and img.dtype == np.uint8
  mask = label_maps.read_label_png(base + '_mask.png')
  assert mask.shape == (size, size)
  with open(base + '.json') as f:
    record = json.load(f)
  for key in record_keys + ('image_stage', 'seconds', 'files', 'config'):
    assert key in record, key
  assert record['image_stage']['denoiser_evaluations'] > 0
  assert record['image_stage']['patch_iterations'] > 0
  assert record['sample'] == number
  return img, mask, record


def test_with_mask_model(models, tmp_path):
  # The demo mask model (trained: its maps hold classes; the reference one's 4-step maps
  # clean up to all 0, which would let a mask stage that wrote zeros pass).
  records = generate.generate(config(models, tmp_path, mask_unet_ckpt=demo.model_path('mask_unet')))
  img, mask, record = _check_outputs(tmp_path, 0, 256)
  assert set(np.unique(mask)) <= set(range(5))
  assert len(np.unique(mask)) > 1, np.unique(mask)   # an all-0 (or constant) map fails
  assert record['mask_stage']['denoiser_evaluations'] > 0
  assert set(record['checkpoint_sha256']) == {'unet', 'vae', 'mask_unet'}
  assert 'mask_stage' in record['seconds'] and 'decode_and_write' in record['seconds']
  assert len(records) == 1


def test_with_given_mask_numbering_and_repeatability(models, given_mask, tmp_path):
  cfg = config(models, tmp_path, mask=given_mask, n_images=2, batch_size=2)
  generate.generate(cfg)
  generate.generate(cfg)   # same flags again: numbering continues, nothing overwritten
  names = sorted(os.listdir(tmp_path))
  assert names == [f'sample{i:04d}{ext}' for i in range(4)
                   for ext in ('.json', '.png', '_mask.png')]
  _, mask, record = _check_outputs(tmp_path, 2, 256)
  assert record['mask_stage'] is None and 'mask_unet' not in record['checkpoint_sha256']
  expected = masks.resize_labels(label_maps.read_label_png(given_mask), (256, 256))
  np.testing.assert_array_equal(mask, expected)
  assert set(np.unique(mask)) == {0, 1, 4}
  # Same flags and seed: identical bytes (image n of each run).
  for n in range(2):
    a = open(tmp_path / f'sample{n:04d}.png', 'rb').read()
    b = open(tmp_path / f'sample{n + 2:04d}.png', 'rb').read()
    assert a == b
  # Different images within a run.
  assert (np.asarray(Image.open(tmp_path / 'sample0000.png')) !=
          np.asarray(Image.open(tmp_path / 'sample0001.png'))).any()


def test_image_does_not_depend_on_batch_size(models, given_mask, tmp_path):
  # config()'s 4 steps: the programs of the other tests here (N = 2 and N = 1), reused.
  generate.generate(config(models, tmp_path / 'b2', mask=given_mask, n_images=2, batch_size=2))
  generate.generate(config(models, tmp_path / 'b1', mask=given_mask, n_images=2, batch_size=1))
  for n in (0, 1):
    a = np.asarray(Image.open(tmp_path / 'b2' / f'sample{n:04d}.png'), np.int16)
    b = np.asarray(Image.open(tmp_path / 'b1' / f'sample{n:04d}.png'), np.int16)
    # The same key and patches; float32 rounding of batched vs single U-Net calls can
    # move a pixel across a uint8 step.
    assert np.abs(a - b).max() <= 1, np.abs(a - b).max()


def test_cli_end_to_end(models, given_mask, tmp_path, script_server):
  out = script_server.run(SCRIPT, f'--unet_ckpt={models["image_unet"]}', f'--vae_ckpt={models["vae"]}',
                 f'--mask={given_mask}', '--image_size=256', '--sampling_steps=4',
                 '--patch_size=128', f'--imgs_path={tmp_path}', '--output_format=jpg')
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'wrote 1 image(s)' in out.stdout
  img = Image.open(tmp_path / 'sample0000.jpg')
  assert img.size == (256, 256) and img.format == 'JPEG'
  with open(tmp_path / 'sample0000.json') as f:
    assert json.load(f)['flags']['output_format'] == 'jpg'


@pytest.mark.parametrize('flag,value,match', [
    ('unet_ckpt', '/nonexistent/unet', 'checkpoint folder not found'),
    ('image_size', '260', 'multiple of 8'),
    ('image_size', '64', 'larger than the image'),
    ('n_images', '3', 'multiple of batch_size'),
])
def test_cli_bad_input_one_line(models, given_mask, tmp_path, flag, value, match,
                                script_server):
  args = {'unet_ckpt': models['image_unet'], 'vae_ckpt': models['vae'], 'mask': given_mask,
          'imgs_path': str(tmp_path / 'out'), 'patch_size': '128', 'batch_size': '2',
          'n_images': '2'}
  args[flag] = value
  out = script_server.run(SCRIPT, *[f'--{k}={v}' for k, v in args.items()])
  assert out.returncode != 0
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and match in last, out.stderr[-2000:]
  assert not os.path.exists(tmp_path / 'out') or not os.listdir(tmp_path / 'out')


def test_bad_inputs(models, given_mask, tmp_path):
  bad_mask = tmp_path / 'bad.png'
  label_maps.write_label_png(bad_mask, np.full((8, 8), 7, np.int32))
  with pytest.raises(ValueError, match=r'out of range \[0, 5\): 7'):
    generate.prepare(config(models, tmp_path, mask=str(bad_mask)))
  with pytest.raises(ValueError, match='cannot load'):
    generate.prepare(config(models, tmp_path, unet_ckpt=models['vae']))   # wrong kind
  blocker = tmp_path / 'a_file'
  blocker.write_text('x')
  with pytest.raises(ValueError, match='not writable'):
    generate.prepare(config(models, str(blocker / 'sub'), mask=given_mask))
  with pytest.raises(ValueError, match='mask_unet_ckpt'):
    generate.prepare(config(models, tmp_path, mask_unet_ckpt=None))
  with pytest.raises(ValueError, match='label 7'):
    generate.prepare(config(models, tmp_path, label=7))
  with pytest.raises(ValueError, match='--mask'):
    generate.prepare(config(models, tmp_path, mask=str(tmp_path / 'missing.png')))
  with pytest.raises(ValueError, match='blend_mode'):
    generate.prepare(config(models, tmp_path, mask=given_mask, blend_mode='average'))


def test_interrupted_write_leaves_no_complete_looking_file(models, given_mask, tmp_path,
                                                           monkeypatch):
  from tiled_ldm_jax.output import writers

  def boom(*a, **k):
    raise KeyboardInterrupt
  monkeypatch.setattr(writers, 'write_image', boom)
  with pytest.raises(KeyboardInterrupt):
    generate.generate(config(models, tmp_path, mask=given_mask))
  assert not [n for n in os.listdir(tmp_path) if n.startswith('sample')]
