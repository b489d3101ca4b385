"""The live preview (`output/live_preview.py`): written during the image stage and
replaced, its canvas close to the decoded image, no recompile of the sampler; the
linear latent -> RGB fit itself on a decoder that is linear."""

import os

import jax.numpy as jnp
import numpy as np
from PIL import Image

from tiled_ldm_jax import generate
from tiled_ldm_jax import pipeline as pipeline_lib
from tiled_ldm_jax.output import live_preview


def test_fit_recovers_a_linear_decoder():
  """A decoder that is a per-pixel linear map (upsampled f x) is fitted exactly, whatever
  latents the encoder gives."""
  m = np.array([[0.2, -0.1, 0.05], [0.0, 0.3, 0.1], [-0.2, 0.1, 0.0], [0.1, 0.1, 0.25],
                [0.5, 0.4, 0.45]], np.float32)       # 4 channels and the constant
  mix = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)

  def encode(params, x):      # block means mixed to 4 channels, and a nonlinear part
    x = x.reshape(x.shape[0], x.shape[1] // 8, 8, x.shape[2] // 8, 8, 3).mean(axis=(2, 4))
    z = jnp.einsum('nhwc,cd->nhwd', x, mix) + 0.1 * jnp.sin(5 * x[..., :1])
    return z, z

  def decode(params, z):
    rgb = jnp.einsum('nhwc,cd->nhwd', z / 2.0, params[:4]) + params[4]
    return jnp.repeat(jnp.repeat(rgb, 8, axis=1), 8, axis=2)
  got = live_preview.fit_rgb_map(decode, encode, jnp.asarray(m), 2.0, 8, clip=None)
  np.testing.assert_allclose(got, m, atol=1e-4)


def _blocks(image: np.ndarray, k: int) -> np.ndarray:
  h, w = image.shape[0] // k, image.shape[1] // k
  return image[:h * k, :w * k].reshape(h, k, w, k, -1).mean(axis=(1, 3))


def test_written_replaced_and_like_the_decoded_image(tmp_path, monkeypatch):
  writes = []
  real = live_preview.writers.write_image
  monkeypatch.setattr(live_preview.writers, 'write_image',
                      lambda path, img, **kw: (writes.append(path), real(path, img, **kw)))
  cfg = generate.GenerationConfig(
      options=pipeline_lib.Options(sampling_steps=2, progress_every=1),
      mask='demo', image_size='256', imgs_path=str(tmp_path), live_preview_minutes=1e-9)
  plan = generate.prepare(cfg)
  record, = generate.run(plan)
  live = tmp_path / 'sample0000_live.png'
  assert record['files']['live_preview'] == live.name
  # every chunk after the first iteration (the clock's minimum is passed) and the end
  live_writes = [p for p in writes if p.endswith('_live.png')]
  assert len(live_writes) >= 2 and set(live_writes) == {str(live)}, writes
  assert not [n for n in os.listdir(tmp_path) if n.endswith('.tmp.png')]
  preview = np.asarray(Image.open(live))
  f = plan.pipe.geometry.factor
  h = w = 256 // f
  assert preview.shape == (h, 2 * w + live_preview.GAP, 3)
  assert (preview[:, -w:] == 255).all()           # the end: every pixel took every step
  canvas = preview[:, :w].astype(np.float64)
  image = _blocks(np.asarray(Image.open(tmp_path / 'sample0000.png'), np.float64), f)
  corr = np.corrcoef(canvas.ravel(), image.ravel())[0, 1]
  err = np.abs(canvas - image).mean()
  # measured 0.974 and 10.9 with the synthetic demo VAE; 0.937 and 26.8 with the tissue
  # VAE (the linear fit on `random_images`' latents matches its colours less well)
  assert corr > 0.9 and err < 35, (corr, err)
  # the sampler compiled its loop once for all the chunks the preview watched
  smp = plan.pipe.stages.image_stage(plan.request, [plan.mask], np.arange(1), cfg.seed)[0]
  assert smp.compiles() == 1
