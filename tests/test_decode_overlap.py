"""The overlapping-tile decode (`blend_mode='overlap'`): its formula, any size, bands,
passes per pixel, and seams/PSNR on the demo VAE."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tiled_ldm_jax import decode
from tiled_ldm_jax import decode_base
from tiled_ldm_jax import decode_overlap
from tiled_ldm_jax.evaluation import seams

import test_decode

_M = np.random.default_rng(1).normal(size=(4, 3)).astype(np.float32)


def _blurred(params, z):
  """Not pixel-local: nearest x8, a per-pixel map, then a zero-padded 9x9 box blur, so
  every tile's border depends on the tiling."""
  del params
  x = jnp.tanh(jnp.repeat(jnp.repeat(z, 8, axis=1), 8, axis=2) @ _M) * 0.5 + 0.5
  k = jnp.ones((9, 9, 1, 3), x.dtype) / 81
  return jax.lax.conv_general_dilated(x, k, (1, 1), 'SAME', feature_group_count=3,
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _pixel_local(params, z):
  del params
  return jnp.tanh(jnp.repeat(jnp.repeat(z, 8, axis=1), 8, axis=2) @ _M) * 0.5 + 0.5


def _formula(dec, z, p, o):
  """The module docstring written out with loops: every tile decoded, clipped, weighted
  by its separable cross-fade (1 on the grid's outer borders) and summed."""
  P = p // 8
  S, L = P - o, 8 * o
  h, w, _ = z.shape
  n_r, n_c = max(1, -(-(h - o) // S)), max(1, -(-(w - o) // S))
  zp = decode_base.pad_latent(z, (n_r - 1) * S + P, (n_c - 1) * S + P, 'reflect')
  w_in = np.sin(np.pi * (np.arange(L) + 0.5) / (2 * L)) ** 2

  def ramp(i, n):
    r = np.ones(p)
    if i > 0:
      r[:L] = w_in
    if i < n - 1:
      r[-L:] = 1 - w_in
    return r

  out = np.zeros((8 * zp.shape[0], 8 * zp.shape[1], 3))
  for i in range(n_r):
    for j in range(n_c):
      t = np.clip(np.asarray(dec(None, zp[None, i * S:i * S + P, j * S:j * S + P]))[0], 0, 1)
      out[8 * i * S:8 * i * S + p, 8 * j * S:8 * j * S + p] += (
          t * ramp(i, n_r)[:, None, None] * ramp(j, n_c)[None, :, None])
  return out[:8 * h, :8 * w]


@pytest.mark.parametrize('shape,o,band_tiles', [((24, 24), 2, None), ((37, 21), 1, 1),
                                                ((9, 50), 4, 2), ((5, 3), 2, None),
                                                ((20, 9), 4, 2), ((14, 9), 2, 1)])
def test_matches_its_formula_any_size(shape, o, band_tiles):
  z = np.random.default_rng(sum(shape)).normal(size=shape + (4,)).astype(np.float32)
  got = decode.decode_image(_blurred, None, z, patch_size=64, tile_batch=3,
                            band_tiles=band_tiles, latent_scale=1.0, blend_mode='overlap',
                            overlap=o)
  assert got.shape == (8 * shape[0], 8 * shape[1], 3)
  np.testing.assert_allclose(got, _formula(_blurred, z, 64, o), atol=2e-6, rtol=0)


def test_weights_sum_to_one_so_a_local_decoder_is_exact():
  """Cross-fades sum to 1 on every pixel: a pixel-local decoder comes out as its
  whole-image decode, borders, corners and crop included."""
  z = np.random.default_rng(3).normal(size=(29, 43, 4)).astype(np.float32)
  got = decode.decode_image(_pixel_local, None, z, patch_size=64, latent_scale=1.0,
                            blend_mode='overlap', overlap=3)
  np.testing.assert_allclose(got, np.asarray(_pixel_local(None, z[None]))[0], atol=1e-6)


@pytest.mark.parametrize('band_tiles,split', [(1, (2, 3)), (2, (1,))])
def test_band_ranges_give_the_whole_decodes_pixels(band_tiles, split):
  z = np.random.default_rng(7).normal(size=(40, 24, 4)).astype(np.float32)
  kw = dict(patch_size=64, tile_batch=4, band_tiles=band_tiles, latent_scale=1.0,
            blend_mode='overlap')
  whole = list(decode.iter_decode_bands(_blurred, None, z, **kw))
  rows, n = decode.band_layout(z.shape, **kw)
  assert n == len(whole) and rows == 8 * 7 * band_tiles          # S = 8 - 1
  assert n == -(-40 // (7 * band_tiles))
  test_decode.assert_band_ranges_equal(_blurred, z, kw, split, whole)


def test_passes_per_pixel_and_errors():
  s = decode.TiledDecodeSettings(patch_size=512, blend_mode='overlap')
  assert decode_overlap.overlap_of(s) == 8
  assert decode_overlap.passes_per_pixel(s, 2048, 2048) == pytest.approx((64 / 56) ** 2,  # 16k px
                                                                         rel=0.03)
  assert decode_overlap.passes_per_pixel(s, 256, 256) == 25 / 16    # 2048 px: 5 x 5 tiles
  small = decode.TiledDecodeSettings(patch_size=128, blend_mode='overlap')
  assert decode_overlap.passes_per_pixel(small, 256, 256) == 19 ** 2 * 16 ** 2 / 256 ** 2
  with pytest.raises(ValueError, match='overlap must be'):
    decode.TiledDecodeSettings(patch_size=128, blend_mode='overlap', overlap=9)
  with pytest.raises(ValueError, match='overlap must be'):
    decode.TiledDecodeSettings(patch_size=128, blend_mode='overlap', overlap=0)


def test_demo_vae_seams_no_worse_than_four_shift_and_close_to_whole_decode():
  """The synthetic-data demo VAE (`flow_vae`: strong tile-border effects) on the latent of a synthetic 512 px image:
  the overlap decode's seam ratio at its own tile borders is no worse than the original
  blend's at its borders, and it is about as close (PSNR) to the whole-image decode."""
  from tiled_ldm_jax import demo
  from tiled_ldm_jax.models import checkpoint
  from tiled_ldm_jax.models import vae as vae_lib
  from tiled_ldm_jax.training import data
  _, cfg, params = checkpoint.load_model(demo.model_path('flow_vae'), expect='vae')  # synthetic-data VAE
  ex = data.synth_example(0, 512, data.SynthSpec(num_classes=5, region_size_max=384.0))
  z = np.asarray(jax.jit(vae_lib.encode_fn(cfg))(params, jnp.asarray(ex.image)[None])[0])[0]
  f = vae_lib.decode_fn(cfg)
  whole = np.clip(np.asarray(jax.jit(f)(params, jnp.asarray(z)[None] * 1.0))[0], 0, 1)
  psnr = lambda a: 10 * np.log10(1 / np.mean((a - whole) ** 2))
  four = decode.decode_image(f, params, z / 50, patch_size=128, tile_batch=4)
  over = decode.decode_image(f, params, z / 50, patch_size=128, tile_batch=4,
                             blend_mode='overlap')
  stride = 128 - 16
  # Seams of the overlap decode sit anywhere in its L-pixel cross-fades; measure at both
  # ends and the middle of each.
  over_seam = max(seams.seam_ratio(over, stride, offset=off) for off in (0, 8, 16))
  four_seam = seams.seam_ratio(four, 128)
  plain = decode.decode_image(f, params, z / 50, patch_size=128, tile_batch=4, blend=False)
  assert over_seam <= four_seam, (over_seam, four_seam)
  # Four decodes averaged sit closer to the whole decode than one cross-faded one
  # (measured 23.6 vs 22.8 dB); both far above the unblended tiles.
  assert psnr(four) - 1.5 <= psnr(over), (psnr(over), psnr(four))
  assert psnr(over) > psnr(plain) + 1, (psnr(over), psnr(plain))
