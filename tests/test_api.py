"""The in-memory API: the README example runs; API, staged calls and CLI give the same
pixels for the same request."""

import os
import re

import numpy as np
import pytest
from PIL import Image

import tiled_ldm_jax

from conftest import count_compiles

ROOT = os.path.join(os.path.dirname(__file__), '..')
REQUEST = dict(label=1, image_size=256, seed=3, sampling_steps=2)


@pytest.fixture(scope='module')
def pipe(demo_pipeline):
  return demo_pipeline


def test_readme_example_runs():
  with open(os.path.join(ROOT, 'README.md')) as f:
    text = f.read()
  blocks = re.findall(r'<!-- api-example -->\s*```python\n(.*?)```', text, re.S)
  assert len(blocks) == 1, 'README must hold one marked API example'
  # Run with REQUEST's seed and steps (the README's 10 steps cost only time): the
  # example's programs are then those of the tests below, compiled once.
  code, n = re.subn(r'seed=0, sampling_steps=10', 'seed=3, sampling_steps=2', blocks[0])
  assert n == 3, 'the example no longer reads as this test expects'
  scope = {}
  exec(compile(code, 'README.md', 'exec'), scope)  # pylint: disable=exec-used
  result = scope['result']
  assert result.images.dtype == np.uint8 and result.images.ndim == 4
  assert result.images.shape[:3] == result.labels.shape


def test_api_staged_and_cli_are_identical(pipe, tmp_path, script_server):
  result = pipe(**REQUEST)
  assert result.images.shape == (1, 256, 256, 3) and result.labels.shape == (1, 256, 256)
  assert result.stats['image_stage']['denoiser_evaluations'] > 0

  labels = pipe.sample_labels(label=1, image_size=256, seed=3, sampling_steps=2)
  latents = pipe.sample_latents(labels, seed=3, sampling_steps=2)
  f = pipe.geometry.factor
  assert latents.shape == (1, 256 // f, 256 // f, pipe.unet.config.channels)
  images = pipe.decode(latents)
  np.testing.assert_array_equal(labels, result.labels)
  np.testing.assert_array_equal(images, result.images)

  # Streaming decode: the bands assemble to the same image.
  rows = np.concatenate([band for _, band in pipe.iter_decode(np.asarray(latents)[0])])
  np.testing.assert_array_equal(rows, result.images[0])

  cli = script_server.run(os.path.join(ROOT, 'scripts', 'sample_large_image.py'),
                          '--label=1', '--image_size=256', '--seed=3', '--sampling_steps=2',
                          f'--imgs_path={tmp_path}', timeout=900)
  assert cli.returncode == 0, cli.stderr[-3000:]
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / 'sample0000.png')),
                                result.images[0])
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / 'sample0000_mask.png')),
                                result.labels[0])


def test_given_labels_and_batches(pipe):
  labels = np.ones((2, 128, 128), np.int32)
  labels[:, :, 64:] = 3
  two = pipe(labels=labels, seed=1, sampling_steps=2)
  one = pipe(labels=labels[1:], indices=[1], seed=1, sampling_steps=2)
  # Image n depends on its index, not on the batch it was sampled in (float rounding of
  # batched U-Net calls may move a pixel by one level).
  assert np.abs(two.images[1].astype(int) - one.images[0]).max() <= 1
  assert (two.images[0] != two.images[1]).any()


@pytest.mark.parametrize('kwargs,match', [
    (dict(cond_scale=float('nan')), 'cond_scale must be a finite number'),
    (dict(eta=-1.0), 'eta must be >= 0'),
    (dict(image_size=260), 'multiple of 8'),
    (dict(label=9), 'label 9'),
    (dict(labels=np.full((1, 128, 128), 7)), r'out of range \[0, 5\)'),
    (dict(labels=np.ones((128, 128), np.int32)), r'\[N, H, W\]'),
    (dict(patch_size=100), 'multiple of 8'),
])
def test_bad_requests_fail_before_compute(pipe, kwargs, match):
  with pytest.raises(ValueError, match=match):
    pipe(**{'sampling_steps': 2, 'image_size': 128, **kwargs})


def test_from_pretrained_errors(tmp_path):
  with pytest.raises(ValueError, match='cannot load'):
    tiled_ldm_jax.Pipeline.from_pretrained(unet=str(tmp_path), vae=str(tmp_path))
  with pytest.raises(ValueError, match='give unet and vae'):
    tiled_ldm_jax.Pipeline.from_pretrained(unet=str(tmp_path))


def test_grid_schedule_and_bfloat16(pipe):
  labels = np.ones((1, 256, 256), np.int32)
  labels[:, 128:] = 2
  grid = pipe(labels=labels, seed=0, sampling_steps=2, schedule='grid', grid_margin=16)
  assert grid.images.shape == (1, 256, 256, 3)
  assert grid.stats['image_stage']['patch_iterations'] > 0
  f32 = pipe(labels=labels, seed=0, sampling_steps=2)
  bf16 = pipe(labels=labels, seed=0, sampling_steps=2, dtype='bfloat16')
  mse = np.mean((f32.images.astype(np.float64) - bf16.images) ** 2)
  psnr = 10 * np.log10(255 ** 2 / max(mse, 1e-12))
  # close to float32, yet a different computation (a dtype ignored gives identical images)
  assert mse > 0 and psnr > 20, psnr
  with pytest.raises(ValueError, match='grid_margin'):
    pipe(labels=labels, sampling_steps=2, schedule='grid', grid_margin=64)


def test_generate_zarr_and_tiff_outputs(tmp_path):
  from tiled_ldm_jax import generate
  for fmt in ('zarr', 'tiff'):
    cfg = generate.GenerationConfig.from_flat(mask='demo', image_size=256, sampling_steps=2,
                                    imgs_path=str(tmp_path / fmt), output_format=fmt,
                                    mpp=0.5, schedule='grid')
    [record] = generate.generate(cfg)
    assert os.path.exists(tmp_path / fmt / record['files']['image'])
    assert os.path.exists(tmp_path / fmt / record['files']['mask'])
  with pytest.raises(ValueError, match='mpp'):
    generate.prepare(generate.GenerationConfig.from_flat(mask='demo', mpp=-1.0,
                                               imgs_path=str(tmp_path / 'x')))


def test_second_pipeline_compiles_nothing(pipe):
  """Compiled programs are cached by model config and settings, not by object: a second
  Pipeline of the same models (as a second user call, or another test, makes) traces and
  compiles nothing for a request the first one ran."""
  request = dict(REQUEST, seed=4)
  first = pipe(**request)
  with count_compiles() as counts:
    again = tiled_ldm_jax.Pipeline.from_pretrained()
    second = again(**request)
  assert counts == {'traces': 0, 'compiles': 0}, counts
  np.testing.assert_array_equal(first.images, second.images)
  # The counter sees a new program: the original's band program, which no call here ran
  # (the default 'shared' decodes 512 px tiles whatever the size, so a small latent
  # alone reuses its programs).
  with count_compiles() as counts:
    again.decode(np.zeros((1, 8, 8, again.unet.config.channels), np.float32),
                 blend_mode='original')
  assert counts['compiles'] > 0
