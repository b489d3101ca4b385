"""Tiled Hann-blended decoding: parity with the original, any size, bands, seam measure."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tiled_ldm_jax import convert
from tiled_ldm_jax import decode
from tiled_ldm_jax.evaluation import seams
from tiled_ldm_jax.models import vae

TOL = 1e-4


@pytest.fixture(scope='module')
def ref(reference_dir):
  """Reference VAE (decode fn, params) and blend_cases as NHWC; decoded once per module."""
  cfg_dict, state_dict = convert.read_diffusers_folder(str(reference_dir / 'vae'))
  config, params = convert.convert_vae(cfg_dict, state_dict)
  d = dict(np.load(reference_dir / 'vae' / 'blend_cases.npz'))
  f = vae.decode_fn(config)
  z = np.moveaxis(d['z'], 1, -1)                                 # [1, 24, 24, 4]
  p = int(d['patch_size'])
  out = {
      'blended': decode.decode_image(f, params, z, patch_size=p, tile_batch=8),
      'tiled_no_blend': decode.decode_image(f, params, z, patch_size=p, tile_batch=8,
                                            blend=False),
  }
  return dict(f=f, params=params, d=d, z=z, p=p, out=out)


def _nhwc(a):
  return np.moveaxis(a, 1, -1)


# ----------------------------------------------------------------------------- parity


def test_windows_parity(ref):
  win = decode.hann_windows(ref['p'])
  names = [k[len('window_'):] for k in ref['d'] if k.startswith('window_')]
  assert sorted(names) == sorted(decode.WINDOW_NAMES) and len(names) == 15
  for name in names:
    err = np.abs(np.asarray(win[name]) - ref['d']['window_' + name]).max()
    assert err <= 1e-6, (name, err)


@pytest.mark.parametrize('key', ['blended', 'tiled_no_blend'])
def test_decode_parity_jit(ref, key):
  out = ref['out'][key]
  assert out.shape == (1, 192, 192, 3) and out.dtype == np.float32
  err = np.abs(out - _nhwc(ref['d'][key])).max()
  assert err <= TOL, err
  assert out.min() >= 0 and out.max() <= 1


def test_decode_parity_no_jit(ref):
  """Everything eager (lax.map runs as a Python loop): one band, one batch of tiles."""
  with jax.disable_jit():
    out = decode.decode_image(ref['f'], ref['params'], ref['z'], patch_size=ref['p'],
                              tile_batch=32, band_tiles=3)
  err = np.abs(out - _nhwc(ref['d']['blended'])).max()
  assert err <= TOL, err


def test_band_and_batch_layout_do_not_matter(ref):
  """Bands of 1 and 3 tile rows (carry vs none) agree; batch position changes only ulps."""
  out = decode.decode_image(ref['f'], ref['params'], ref['z'], patch_size=ref['p'],
                            tile_batch=8, band_tiles=3)
  np.testing.assert_allclose(out, ref['out']['blended'], atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- any size

_M = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
_B = np.float32([0.1, -0.2, 0.05])


def _pixel_local(params, z):
  """[B, h, w, 4] -> [B, 8h, 8w, 3]: nearest x8, per-pixel linear map, tanh."""
  del params
  x = jnp.repeat(jnp.repeat(z, 8, axis=1), 8, axis=2)
  return jnp.tanh(x @ _M + _B)


def _blurred(params, z):
  """A decoder that is NOT pixel-local: nearest x8 then a zero-padded 9x9 box blur, so a
  tile's border pixels depend on the tiling (and every shifted decode differs)."""
  del params
  x = jnp.tanh(jnp.repeat(jnp.repeat(z, 8, axis=1), 8, axis=2) @ _M + _B)
  k = jnp.ones((9, 9, 1, 3), x.dtype) / 81
  return jax.lax.conv_general_dilated(x, k, (1, 1), 'SAME', feature_group_count=3,
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _tiled(dec, zz, p):
  """Tile z [h, w, C] into P = p/8 tiles, decode each, clip to [0, 1], untile."""
  P = p // 8
  h, w, _ = zz.shape
  out = np.zeros((8 * h, 8 * w, 3), np.float32)
  for i in range(0, h, P):
    for j in range(0, w, P):
      out[8 * i:8 * i + p, 8 * j:8 * j + p] = np.clip(
          np.asarray(dec(None, zz[None, i:i + P, j:j + P]))[0], 0, 1)
  return out


def _original_blend(dec, z, p):
  """SPEC 4 written out directly (NumPy, in place): z [h, w, C] with sides multiples of P."""
  q = p // 16
  tiled = lambda zz: _tiled(dec, zz, p)
  win = {k: np.asarray(v)[..., None] for k, v in decode.hann_windows(p).items()}
  img, img_v = tiled(z), tiled(z[:, q:-q])
  img_h, img_c = tiled(z[q:-q]), tiled(z[q:-q, q:-q])
  H, W, _ = img.shape
  rv = np.tile(win['vertical'], (H // p, W // p - 1, 1))
  rh = np.tile(win['horizontal'], (H // p - 1, W // p, 1))
  rc = np.tile(win['center'], (H // p - 1, W // p - 1, 1))
  s = slice(p // 2, -(p // 2))
  img[:, s] = img[:, s] * (1 - rv) + img_v * rv
  img[s, :] = img[s, :] * (1 - rh) + img_h * rh
  img[s, s] = img[s, s] * (1 - rc) + img_c * rc
  return img


@pytest.mark.parametrize('band_tiles', [1, 2, 4])
def test_matches_original_algorithm_on_larger_grids(band_tiles):
  """5 x 3 tiles, a decoder with tile-border effects: every band split gives the original."""
  z = np.random.default_rng(1).normal(size=(40, 24, 4)).astype(np.float32)
  want = _original_blend(_blurred, z, 64)
  got = decode.decode_image(_blurred, None, z, patch_size=64, tile_batch=4,
                            band_tiles=band_tiles, latent_scale=1.0)
  assert got.shape == want.shape == (320, 192, 3)
  np.testing.assert_allclose(got, want, atol=2e-6, rtol=0)
  # The blend really mixes different decodes here: not the unshifted tiling.
  plain = decode.decode_image(_blurred, None, z, patch_size=64, latent_scale=1.0, blend=False)
  assert np.abs(plain - want).max() > 0.01


def _partition_blend(dec, z, p):
  """blend_mode='partition' written out directly: A(1-v)(1-h) + Vv(1-h) + H(1-v)h + Cvh."""
  q = p // 16
  tiled = lambda zz: _tiled(dec, zz, p)
  win = {k: np.asarray(v)[..., None] for k, v in decode.hann_windows(p).items()}
  a = tiled(z)
  H, W, _ = a.shape
  s = slice(p // 2, -(p // 2))
  v, h, c = (np.zeros_like(a) for _ in range(3))
  wv, wh = np.zeros((H, W, 1), np.float32), np.zeros((H, W, 1), np.float32)
  v[:, s], h[s, :], c[s, s] = tiled(z[:, q:-q]), tiled(z[q:-q]), tiled(z[q:-q, q:-q])
  wv[:, s] = np.tile(win['vertical'], (H // p, W // p - 1, 1))
  wh[s, :] = np.tile(win['horizontal'], (H // p - 1, W // p, 1))
  return (a * (1 - wv) + v * wv) * (1 - wh) + (h * (1 - wv) + c * wv) * wh


@pytest.mark.parametrize('band_tiles', [1, 3])
def test_partition_blend_matches_its_formula(band_tiles):
  z = np.random.default_rng(4).normal(size=(40, 24, 4)).astype(np.float32)
  want = _partition_blend(_blurred, z, 64)
  got = decode.decode_image(_blurred, None, z, patch_size=64, tile_batch=4,
                            band_tiles=band_tiles, latent_scale=1.0, blend_mode='partition')
  np.testing.assert_allclose(got, want, atol=2e-6, rtol=0)
  assert np.abs(got - _original_blend(_blurred, z, 64)).max() > 1e-3   # a different blend
  with pytest.raises(ValueError, match='blend_mode'):
    decode.TiledDecodeSettings(blend_mode='average')


@pytest.mark.parametrize('mode', decode.BLEND_MODES)
@pytest.mark.parametrize('shape', [(21, 13), (8, 30), (3, 5), (1, 1), (17, 16)])
def test_any_size_pixel_local_decoder_exact_everywhere(shape, mode):
  """A pixel-local decoder's blended decode is the decoder on the whole latent, borders
  included; per-channel latent mean/std and the output affine are applied once."""
  h, w = shape
  z = np.random.default_rng(h * 100 + w).normal(size=(h, w, 4)).astype(np.float32)
  mean, std = (0.1, -0.2, 0.3, 0.0), (1.0, 2.0, 0.5, 1.5)
  got = decode.decode_image(_pixel_local, None, z, patch_size=64, tile_batch=4,
                            latent_scale=0.5, latent_mean=mean, latent_std=std,
                            out_scale=0.5, out_offset=0.5, blend_mode=mode)
  zin = z * 0.5 * np.float32(std) + np.float32(mean)
  want = np.clip(0.5 * np.asarray(_pixel_local(None, zin[None]))[0] + 0.5, 0, 1)
  assert got.shape == (8 * h, 8 * w, 3)
  np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


def test_any_size_is_padded_original_cropped():
  """Documented border rule: sides not multiples of P decode as the original on the
  reflect-padded latent, cropped (a decoder with tile-border effects, non-square)."""
  z = np.random.default_rng(2).normal(size=(19, 29, 4)).astype(np.float32)
  zp = np.pad(z, ((0, 5), (0, 3), (0, 0)), mode='reflect')       # to 24 x 32 = 3 x 4 tiles
  want = _original_blend(_blurred, zp, 64)[:152, :232]
  got = decode.decode_image(_blurred, None, z, patch_size=64, tile_batch=8, latent_scale=1.0)
  assert got.shape == (152, 232, 3)
  np.testing.assert_allclose(got, want, atol=2e-6, rtol=0)


def test_batch_uint8_and_errors():
  z = np.random.default_rng(3).normal(size=(2, 9, 11, 4)).astype(np.float32)
  out = decode.decode_image(_pixel_local, None, z, patch_size=32, latent_scale=1.0)
  assert out.shape == (2, 72, 88, 3)
  u8 = decode.decode_image(_pixel_local, None, z[:1], patch_size=32, latent_scale=1.0,
                           uint8=True)
  np.testing.assert_array_equal(u8, decode.to_uint8(out[:1]))
  bands = list(decode.iter_decode_bands(_pixel_local, None, z[1], patch_size=32,
                                        latent_scale=1.0, band_tiles=1))
  assert [r for r, _ in bands] == [0, 32, 64] and bands[-1][1].shape == (8, 88, 3)
  np.testing.assert_array_equal(np.concatenate([b for _, b in bands]), out[1])
  with pytest.raises(ValueError, match='multiple of 2 \\* factor'):
    decode.TiledDecodeSettings(patch_size=24)
  with pytest.raises(ValueError, match='one latent at a time'):
    next(decode.iter_decode_bands(_pixel_local, None, z, patch_size=32))
  with pytest.raises(ValueError, match='latent_std has 2 entries'):
    decode.decode_image(_pixel_local, None, z[0], patch_size=32, latent_std=(1.0, 1.0))


# ----------------------------------------------------------------------------- seams


def test_seam_ratio_definition():
  x = np.tile(np.arange(128, dtype=np.float64), (128, 1))         # constant gradient 1
  assert seams.seam_ratio(x, 32) == pytest.approx(1.0)
  assert seams.seam_ratio(x, 32, neighbours=None) == pytest.approx(1.0)
  step = x + 2.0 * (np.arange(128) // 32)                         # +2 at every x = 32k
  # Boundary lines: 3 vertical (gradient 3), 3 horizontal (0): mean 1.5. Reference lines
  # (+-4 of each): 24 vertical (1), 24 horizontal (0): mean 0.5. Ratio 3.
  assert seams.seam_ratio(step, 32, neighbours=4) == pytest.approx(3.0)
  # Global reference: 124 vertical lines (1) + 124 horizontal (0): also 0.5.
  assert seams.seam_ratio(step, 32, neighbours=None) == pytest.approx(3.0)
  assert seams.seam_ratio(step, 32, offset=16) == pytest.approx(
      seams.seam_ratio(x, 32, offset=16))
  assert np.isnan(seams.seam_ratio(x[:16, :16], 32))


def test_seams_blended_vs_unblended(ref):
  """Reference VAE on the reference z (3 x 3 tiles of 64 px). Measured: blended 1.057,
  unblended 1.638 (random 64x64 latents of the same std: 1.03-1.05 vs 1.72-1.75). The
  blend leaves some structure at boundaries by design (the original's H blend carries
  img_h's vertical seams with weight w(1-w) <= 1/4), hence < 1.15, not == 1."""
  blended = seams.seam_ratio(ref['out']['blended'], ref['p'])
  plain = seams.seam_ratio(ref['out']['tiled_no_blend'], ref['p'])
  assert blended < 1.15, blended
  assert plain > 1.4, plain
  assert plain - 1 > 5 * (blended - 1), (plain, blended)
  # The reference's own arrays score the same.
  assert seams.seam_ratio(_nhwc(ref['d']['blended']), ref['p']) == pytest.approx(
      blended, abs=1e-3)


def test_partition_blend_removes_the_residual_seam_on_the_demo_vae():
  """The synthetic-data demo VAE (`flow_vae`; tiny, trained on 64 px crops: strong tile-border effects) on the
  latent of a synthetic 512 px image. Measured: unblended 3.66, the original's blend
  1.24 (its residual vertical seams), partition 1.02; the image itself scores 1.08
  (seeds 1, 2: 3.96 / 1.31 / 1.04 and 3.41 / 1.23 / 1.07)."""
  from tiled_ldm_jax.models import checkpoint
  from tiled_ldm_jax.training import data
  from tiled_ldm_jax import demo
  from tiled_ldm_jax.models import vae as vae_lib
  _, cfg, params = checkpoint.load_model(demo.model_path('flow_vae'), expect='vae')  # synthetic-data VAE
  ex = data.synth_example(0, 512, data.SynthSpec(num_classes=5, region_size_max=384.0))
  z = np.asarray(jax.jit(vae_lib.encode_fn(cfg))(params, jnp.asarray(ex.image)[None])[0])[0]
  f = vae_lib.decode_fn(cfg)
  ratio = {}
  for name, kw in (('plain', dict(blend=False)), ('original', {}),
                   ('partition', dict(blend_mode='partition'))):
    img = decode.decode_image(f, params, z / 50, patch_size=128, tile_batch=4, **kw)
    ratio[name] = seams.seam_ratio(img, 128)
  assert ratio['plain'] > 2.5 and ratio['original'] < 1.5, ratio
  assert ratio['partition'] < 1.12, ratio
  assert ratio['partition'] - 1 < 0.5 * (ratio['original'] - 1), ratio


@pytest.mark.parametrize('band_tiles,split', [(1, (2, 3)), (2, (1,)), (1, (1, 2, 3, 4))])
def test_band_ranges_give_the_whole_decodes_pixels(band_tiles, split):
  """Hosts decoding their own bands (`bands=`) assemble exactly the whole decode: the
  carry into a range's first band is rebuilt from the band before it."""
  z = np.random.default_rng(7).normal(size=(40, 24, 4)).astype(np.float32)  # 5 tile rows
  kw = dict(patch_size=64, tile_batch=4, band_tiles=band_tiles, latent_scale=1.0)
  whole = list(decode.iter_decode_bands(_blurred, None, z, **kw))
  rows, n = decode.band_layout(z.shape, **kw)
  assert n == len(whole) and rows == 64 * band_tiles
  assert_band_ranges_equal(_blurred, z, kw, split, whole)
  with pytest.raises(ValueError, match='outside the'):
    list(decode.iter_decode_bands(_blurred, None, z, bands=(0, n + 1), **kw))
  assert not list(decode.iter_decode_bands(_blurred, None, z, bands=(2, 2), **kw))


def assert_band_ranges_equal(fn, z, kw, split, whole):
  """Decoding (with `fn`) the band ranges cut at `split` gives the whole decode's bands,
  bit for bit."""
  edges = (0,) + tuple(split) + (len(whole),)
  parts = [band for a, b in zip(edges[:-1], edges[1:])
           for band in decode.iter_decode_bands(fn, None, z, bands=(a, b), **kw)]
  assert [r for r, _ in parts] == [r for r, _ in whole]
  for (_, got), (_, want) in zip(parts, whole):
    np.testing.assert_array_equal(got, want)
