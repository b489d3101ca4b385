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
  # An image it can make, for the mirrored layout: the tissue demo model makes nearly the
  # same texture for a label whatever the seed, so only a different layout tells a
  # result that kept the init from one sampled afresh.
  img = pipe(labels=labels[:, :, ::-1], seed=5, sampling_steps=10).images[0]
  common = dict(labels=labels, seed=0, sampling_steps=10)
  low = pipe(init_image=img, strength=0.2, **common)
  full = pipe(init_image=img, strength=1.0, **common)
  fresh = pipe(**common)
  np.testing.assert_array_equal(full.images, fresh.images)     # s = 1: from noise
  psnr = lambda a: 10 * np.log10(255.0 ** 2 / np.mean((a.astype(float) - img) ** 2))
  assert psnr(low.images[0]) > psnr(full.images[0]) + 2
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
  import tifffile  # pylint: disable=g-import-not-at-top
  keep_tiff = tmp_path / 'keep.tif'          # the same mask as a tiled TIFF, read lazily
  tifffile.imwrite(keep_tiff, keep, tile=(32, 32))
  generate.generate(config(models, tmp_path / 'k2', init_image=str(path),
                           keep_mask=str(keep_tiff), **small_run))
  assert ((tmp_path / 'k' / 'sample0000.png').read_bytes()
          == (tmp_path / 'k2' / 'sample0000.png').read_bytes())
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


def _structure(a, b, cols) -> float:
  """Correlation of two images' columns `cols` with each channel's mean and spread
  removed: the same structure, whatever the tone (1: identical up to tone)."""
  def z(x):
    x = np.asarray(x, float)[:, cols]
    return (x - x.mean((0, 1))) / (x.std((0, 1)) + 1e-6)
  return float(np.mean(z(a) * z(b)))


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
  # The kept half (away from the seam) has the init's structure as closely as the VAE's
  # round trip. Its tone is compared apart: the decoder's GroupNorms see the whole
  # image, so a white right half pales the left one (the tissue demo VAE: mean error 29
  # against 5 for the round trip, with the kept latents exactly the init's).
  kept = slice(0, 56)
  assert _structure(out, img, kept) > _structure(rec, img, kept) - 0.05
  assert _structure(out, img, kept) > 0.8
  assert _structure(out, img, slice(72, 128)) < 0.5                # regenerated
  with pytest.raises(ValueError, match='keep needs init'):
    pipe(labels=labels, sampling_steps=2, keep=keep)


# --------------------------------------------------------- init images read by rows

class _Spy:
  """A row source that records the largest band asked for."""

  def __init__(self, source):
    self.source, self.shape, self.name, self.most = source, source.shape, 'spy', 0

  def read_rows(self, r0, r1):
    self.most = max(self.most, r1 - r0)
    return self.source.read_rows(r0, r1)


def _local(params, x):
  z = x[:, ::8, ::8, :] * 2.0 + params
  return z, z


def _rgb_files(tmp_path, img):
  """The same uint8 image as a tiled TIFF, a striped RGBA TIFF, an OME-Zarr store (this
  library's writer) and a PNG."""
  import tifffile  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from tiled_ldm_jax.output import ome_zarr  # pylint: disable=g-import-not-at-top
  paths = {'tiled': tmp_path / 'tiled.bin', 'striped': tmp_path / 'striped',
           'one_strip': tmp_path / 'plain.tif', 'zlib_strips': tmp_path / 'z.tif',
           'zarr': tmp_path / 'store.zarr', 'png': tmp_path / 'img.data'}
  tifffile.imwrite(paths['tiled'], img, tile=(32, 48), compression='zlib')
  tifffile.imwrite(paths['one_strip'], img)         # one uncompressed strip: byte ranges
  tifffile.imwrite(paths['zlib_strips'], img, rowsperstrip=24, compression='zlib')
  rgba = np.concatenate([img, np.full(img.shape[:2] + (1,), 255, np.uint8)], -1)
  tifffile.imwrite(paths['striped'], rgba, rowsperstrip=7, photometric='rgb',
                   extrasamples=[2])
  ome_zarr.write_ome_zarr(paths['zarr'], [(0, img)], img.shape, tile=64)
  Image.fromarray(img).save(paths['png'], format='PNG')
  return paths


def test_row_sources_read_every_format_by_bands(tmp_path):
  """TIFF (tiled or striped, RGBA), OME-Zarr and PNG give the same pixels, by content
  (no name says the format), and the tiled encode from a file asks for one band of
  window rows at a time and equals the encode of the array."""
  from tiled_ldm_jax.files import large_images  # pylint: disable=g-import-not-at-top
  img = (_image(200, 136) * 255).astype(np.uint8)
  want = encode.encode_image(_local, 1.0, img.astype(np.float32) / 255, factor=8,
                             scale=2.0, tile_px=64, halo_px=16, tile_batch=3)
  for kind, path in _rgb_files(tmp_path, img).items():
    source = large_images.open_rgb_source(path)
    assert source.shape == (200, 136, 3), kind
    np.testing.assert_array_equal(source.read_rows(0, 200), img, err_msg=kind)
    np.testing.assert_array_equal(source.read_rows(37, 81), img[37:81], err_msg=kind)
    spy = _Spy(source)
    got = encode.encode_image(_local, 1.0, spy, factor=8, scale=2.0, tile_px=64,
                              halo_px=16, tile_batch=3)
    np.testing.assert_allclose(got, want, atol=1e-6, err_msg=kind)
    assert spy.most == 64 + 2 * 16, (kind, spy.most)   # one band of windows, not the image


def test_tall_compressed_segments_are_refused(tmp_path, monkeypatch):
  """A row of compressed segments is decoded whole: one over the limit is refused at
  open (the band reading would hold it); uncompressed strips are read by byte ranges."""
  import tifffile  # pylint: disable=g-import-not-at-top
  from tiled_ldm_jax.files import large_images  # pylint: disable=g-import-not-at-top
  from tiled_ldm_jax.files import tiff_rows  # pylint: disable=g-import-not-at-top
  img = (_image(64, 64) * 255).astype(np.uint8)
  tall, plain = tmp_path / 'tall.tif', tmp_path / 'plain.tif'
  tifffile.imwrite(tall, img, compression='zlib', rowsperstrip=64)
  tifffile.imwrite(plain, img)
  monkeypatch.setattr(tiff_rows, 'MAX_SEGMENT_ROW_BYTES', 64 * 64 * 3 - 1)
  with pytest.raises(ValueError, match='save it with tiles'):
    large_images.open_rgb_source(tall)
  np.testing.assert_array_equal(large_images.open_rgb_source(plain).read_rows(5, 9), img[5:9])


def test_bad_init_files_are_one_line_errors(tmp_path):
  import tifffile  # pylint: disable=g-import-not-at-top
  from tiled_ldm_jax.files import large_images  # pylint: disable=g-import-not-at-top
  img = (_image(64, 64) * 255).astype(np.uint8)
  cases = {}
  p = tmp_path / 'u16.tif'
  tifffile.imwrite(p, img.astype(np.uint16))
  cases[p] = '8-bit'
  p = tmp_path / 'planar.tif'
  tifffile.imwrite(p, np.moveaxis(img, -1, 0), planarconfig='separate', photometric='rgb')
  cases[p] = 'separate planes'
  p = tmp_path / 'two.tif'
  tifffile.imwrite(p, np.zeros((64, 64, 2), np.uint8), planarconfig='contig',
                   photometric='minisblack')
  cases[p] = 'channels'
  whole = tmp_path / 'whole.tif'
  tifffile.imwrite(whole, img, tile=(32, 32))
  p = tmp_path / 'cut.tif'
  p.write_bytes(whole.read_bytes()[:-200])
  cases[p] = 'truncated|not a readable TIFF'
  p = tmp_path / 'eps.ps'
  p.write_bytes(b'%!PS-Adobe-3.0 EPSF-3.0\n')
  cases[p] = 'not a PNG / JPEG'
  for path, match in cases.items():
    with pytest.raises(ValueError, match=match):
      large_images.open_rgb_source(path)
  # A damaged tile: found when its band is read, one line naming the file.
  p = tmp_path / 'damaged.tif'
  tifffile.imwrite(p, img, tile=(32, 32), compression='zlib')
  data = bytearray(p.read_bytes())
  with tifffile.TiffFile(p) as tf:
    off, n = tf.pages[0].dataoffsets[0], tf.pages[0].databytecounts[0]
  data[off:off + n] = b'\x00' * n
  p.write_bytes(bytes(data))
  with pytest.raises(ValueError, match='cannot decode the rows'):
    large_images.open_rgb_source(p).read_rows(0, 64)


def test_command_outpaint_and_tiff_init(models, demo_pipeline, tmp_path):  # noqa: F811
  """--init_offset places a 64 px image on a 128 px canvas: its pixels are kept (much
  closer to it than the same run without it), the canvas around is generated; a tiled
  TIFF init image is read by bands; bad offsets and files: one error line, nothing
  written."""
  import tifffile  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from test_pipeline import config   # pylint: disable=g-import-not-at-top
  from tiled_ldm_jax import generate  # pylint: disable=g-import-not-at-top
  slide = demo_pipeline(labels=np.ones((1, 128, 128), np.int32), seed=5,
                        sampling_steps=10).images[0]          # an image the demo VAE knows
  img = np.ascontiguousarray(slide[32:96, 32:96])
  path = tmp_path / 'small.png'
  Image.fromarray(img).save(path)
  run = dict(image_size=128, sampling_steps=4)
  demo = dict(run, unet_ckpt=None, vae_ckpt=None, mask_unet_ckpt=None)   # the demo models
  (rec,) = generate.generate(config(models, tmp_path / 'o', init_image=str(path),
                                    init_offset='32,32', **demo))
  generate.generate(config(models, tmp_path / 'p', **demo))    # the same run, no init
  assert rec['config']['init_offset'] == '32,32'
  read = lambda d: np.asarray(Image.open(tmp_path / d / 'sample0000.png').convert('RGB'),
                              float)
  out, plain = read('o'), read('p')
  inner = lambda a: a[36:92, 36:92]
  kept = _structure(inner(out), img[4:-4, 4:-4], slice(None))
  assert kept > 0.8 and kept > _structure(inner(plain), img[4:-4, 4:-4], slice(None)) + 0.3
  assert np.abs(out[:, :24] - out[:, :24].mean()).mean() > 1   # generated around it
  tiff = tmp_path / 'init.tif'
  full = (_image(128, 128) * 255).astype(np.uint8)
  tifffile.imwrite(tiff, full, tile=(32, 32))
  (rec,) = generate.generate(config(models, tmp_path / 't', init_image=str(tiff),
                                    strength=0.5, **run))
  assert rec['image_stage']['patch_iterations'] > 0
  cut = tmp_path / 'cut.tif'
  cut.write_bytes(tiff.read_bytes()[:-300])
  never = tmp_path / 'never'
  keep = np.zeros((128, 128), np.uint8)
  keep[:, :16] = 1                                       # outside the placed image
  keep_path = tmp_path / 'keep.png'
  Image.fromarray(keep).save(keep_path)
  for kw, match in (
      (dict(init_image=str(path), init_offset='3,8'), 'multiples of the VAE factor'),
      (dict(init_image=str(path), init_offset='96,0'), 'does not fit'),
      (dict(init_image=str(path), init_offset='8'), '"y,x"'),
      (dict(init_image=str(path), init_offset='0,0', strength=0.5), '--strength 1'),
      (dict(init_image=str(path), init_offset='0,0', image_size=None), 'needs --image_size'),
      (dict(init_offset='0,0'), 'needs --init_image'),
      (dict(init_image=str(path), init_offset='32,32', keep_mask=str(keep_path)),
       'outside the init image'),
      (dict(init_image=str(path)), 'place it with --init_offset'),
      (dict(init_image=str(cut), strength=0.5), 'truncated')):
    with pytest.raises(ValueError, match=match):
      generate.prepare(config(models, never, **{**run, **kw}))
  assert not never.exists()


def test_memory_counts_the_init_image():
  """The init latent and band on the host, a whole PNG's pixels, and with a keep mask the
  init latents and mask on the device, per image of the batch."""
  from tiled_ldm_jax import memory  # pylint: disable=g-import-not-at-top
  kw = dict(image_hw=(4096, 2048), n_batch=2, latent_channels=4, factor=8, whole_images=0,
            tile_px=512)
  base = memory.request_bytes(**kw)
  latent = 512 * 256
  banded = memory.request_bytes(**kw, init='strength')
  assert banded['host'] - base['host'] == 16 * latent + 4 * 3 * 2048 * 512
  assert banded['device'] == base['device']
  whole = memory.request_bytes(**kw, init='strength', init_whole=True)
  assert whole['host'] - base['host'] == 16 * latent + 3 * 4096 * 2048
  keep = memory.request_bytes(**kw, init='keep')
  assert keep['device'] - base['device'] == 2 * latent * 17
