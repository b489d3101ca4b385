"""Starting from an existing image: the tiled encode against a whole-image encode, the
strength on the API, bad inputs."""

import numpy as np
import pytest

from tiled_ldm_jax import encode

from test_pipeline import models  # noqa: F401  (fixture)


def _image(h, w, seed=0):
  rng = np.random.RandomState(seed)
  y, x = np.mgrid[0:h, 0:w] / 32.0
  base = 0.5 + 0.25 * np.stack([np.sin(x + y), np.cos(x - 2 * y), np.sin(3 * x)], -1)
  return np.clip(base + 0.05 * rng.randn(h, w, 3), 0, 1).astype(np.float32)


def test_tiled_encode_close_to_the_whole_encode(demo_pipeline):
  pipe = demo_pipeline
  img = _image(256, 384)
  whole = pipe.encode(img[None], patch_size=384, halo_px=0)[0]     # one window: whole
  tiled = pipe.encode(img[None], patch_size=128)[0]
  assert whole.shape == tiled.shape == (32, 48, 4)
  err = np.abs(tiled - whole).max() / np.abs(whole).max()
  assert err < 0.05, err
  # A tiling with no halo is worse: the halo is what makes it close.
  bare = pipe.encode(img[None], patch_size=128, halo_px=0)[0]
  assert np.abs(bare - whole).max() > np.abs(tiled - whole).max()


def test_encode_windows_cover_every_latent_pixel_once():
  """With a pixel-local 'encoder' the tiling is exact: each latent from its own window."""
  def local(params, x):
    z = x[:, ::8, ::8, :] * 2.0 + params
    return z, z
  img = _image(200, 136)
  out = encode.encode_image(local, 1.0, img, factor=8, scale=2.0, tile_px=64, halo_px=16,
                            tile_batch=3)
  np.testing.assert_allclose(out, (img[::8, ::8] * 2.0 + 1.0) / 2.0, atol=1e-6)


def test_strength_on_the_api(demo_pipeline):
  pipe = demo_pipeline
  labels = np.ones((1, 128, 128), np.int32)
  labels[:, :, 64:] = 2
  img = pipe(labels=labels, seed=5, sampling_steps=10).images[0]   # an image it can make
  common = dict(labels=labels, seed=0, sampling_steps=10)
  low = pipe(init_image=img, strength=0.2, **common)
  full = pipe(init_image=img, strength=1.0, **common)
  fresh = pipe(**common)
  np.testing.assert_array_equal(full.images, fresh.images)     # s = 1: from noise
  psnr = lambda a: 10 * np.log10(255.0 ** 2 / np.mean((a.astype(float) - img) ** 2))
  assert psnr(low.images[0]) > psnr(full.images[0]) + 2     # measured 19.3 vs 16.0 dB
  assert low.stats['image_stage']['patch_iterations'] < full.stats['image_stage']['patch_iterations']


@pytest.mark.parametrize('kw,match', [
    (dict(strength=0.0), 'strength'), (dict(strength=2.0), 'strength'),
    (dict(init_image=np.zeros((64, 128, 3), np.uint8), strength=0.5), 'init_image is 64x128'),
    (dict(init_image=np.zeros((128, 128), np.uint8), strength=0.5), 'RGB'),
    (dict(init_image=np.full((128, 128, 3), 2.0), strength=0.5), r'in \[0, 1\]'),
])
def test_bad_init_is_one_line_error(demo_pipeline, kw, match):
  with pytest.raises(ValueError, match=match):
    demo_pipeline(labels=np.ones((1, 128, 128), np.int32), sampling_steps=2, **kw)


def test_command_init_image(models, tmp_path):  # noqa: F811
  """--init_image/--strength: the run starts from the image (fewer iterations, closer to
  it than from noise); a wrong size, a bad strength, a strength without an image, an
  unreadable file: one error line before any work, nothing written."""
  from test_pipeline import config   # pylint: disable=g-import-not-at-top
  from tiled_ldm_jax import generate
  from PIL import Image
  img = (_image(128, 128) * 255).astype(np.uint8)
  path = tmp_path / 'init.png'
  Image.fromarray(img).save(path)
  small_run = dict(image_size=128, sampling_steps=4)
  (rec,) = generate.generate(config(models, tmp_path / 'a', init_image=str(path),
                                    strength=0.5, **small_run))
  (ref,) = generate.generate(config(models, tmp_path / 'b', **small_run))
  assert rec['image_stage']['patch_iterations'] < ref['image_stage']['patch_iterations']
  for r in (rec, ref):    # the plan counts the steps that run (grid: exact)
    assert r['plan']['stages']['image_stage']['patch_iterations'] == \
        r['image_stage']['patch_iterations']
  assert rec['config']['strength'] == 0.5 and rec['config']['init_image'] == str(path)
  bad = tmp_path / 'bad.png'
  bad.write_bytes(b'\x89PNG\r\n\x1a\nnot really')
  small = tmp_path / 'small.png'
  Image.fromarray(img[:64]).save(small)
  keep = np.zeros((128, 128), np.uint8)
  keep[:, :64] = 1
  keep_path = tmp_path / 'keep.png'
  Image.fromarray(keep).save(keep_path)
  (kept,) = generate.generate(config(models, tmp_path / 'k', init_image=str(path),
                                     keep_mask=str(keep_path), **small_run))
  assert kept['config']['keep_mask'] == str(keep_path)
  out = tmp_path / 'never'
  for kw, match in ((dict(keep_mask=str(keep_path)), '--keep_mask needs --init_image'),
                    (dict(init_image=str(path), keep_mask=str(small)), '--keep_mask'),
                    (dict(init_image=str(small), strength=0.5), 'is 64x128'),
                    (dict(init_image=str(path), strength=0.0), r'--strength must be in \(0, 1\]'),
                    (dict(strength=0.5), '--strength needs --init_image'),
                    (dict(init_image=str(bad), strength=0.5), '--init_image')):
    with pytest.raises(ValueError, match=match):
      generate.prepare(config(models, out, image_size=128, **kw))
  assert not out.exists()
  # Without --image_size (and --mask) the image's own size is the output's.
  plan = generate.prepare(config(models, out, image_size=None, init_image=str(path),
                                 strength=0.5))
  assert plan.cfg.size == (128, 128)
  assert not out.exists()


def test_keep_mask_on_the_api(demo_pipeline):
  """Left half kept: it stays close to the init (as close as encode -> decode), the right
  half is generated for its labels; a keep mask without an init is refused."""
  pipe = demo_pipeline
  labels = np.ones((1, 128, 128), np.int32)
  img = pipe(labels=labels, seed=5, sampling_steps=10).images[0]
  labels2 = labels.copy()
  labels2[:, :, 64:] = 3
  keep = np.zeros((128, 128), bool)
  keep[:, :64] = True
  out = pipe(labels=labels2, seed=1, sampling_steps=10, init_image=img, keep=keep).images[0]
  rec = pipe.decode(pipe.encode(img[None]))[0]
  err = lambda a, b: np.abs(a.astype(float) - b.astype(float))[:, :56].mean()
  assert err(out, img) < err(rec, img) + 6            # the kept half (away from the seam)
  assert np.abs(out.astype(float) - img)[:, 72:].mean() > 2 * err(out, img)   # regenerated
  with pytest.raises(ValueError, match='keep needs init'):
    pipe(labels=labels, sampling_steps=2, keep=keep)
