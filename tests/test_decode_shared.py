"""The shared-statistics decode (`blend_mode='shared'`): GroupNorm statistics of the whole
image in every tile, the image border without a frame, bands, cost, and its fidelity
and seams on the demo VAE."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tiled_ldm_jax import decode
from tiled_ldm_jax import decode_norm
from tiled_ldm_jax import decode_overlap
from tiled_ldm_jax.evaluation import seams

import test_decode
from test_decode_overlap import _blurred, _pixel_local


class _NormDecoder(nn.Module):
  """Pixel-local but for one GroupNorm (over the whole input, as a VAE's): 1x1 conv,
  GroupNorm, tanh, nearest x8."""

  @nn.compact
  def __call__(self, z):
    x = nn.Conv(8, (1, 1))(z)
    x = nn.GroupNorm(num_groups=2, use_fast_variance=False)(x)
    x = nn.Conv(3, (1, 1))(jnp.tanh(x))
    return jnp.repeat(jnp.repeat(jax.nn.sigmoid(x), 8, axis=1), 8, axis=2)


_NORM_MODEL = _NormDecoder()
_NORM_PARAMS = _NORM_MODEL.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 4)))


def _norm_decode(params, z):
  return _NORM_MODEL.apply(params, z)


def _latent(shape, seed=0):
  # A tone that drifts across the image: per-tile statistics differ from the whole's.
  rng = np.random.default_rng(seed)
  ramp = np.linspace(-2, 2, shape[1], dtype=np.float32)[None, :, None]
  return (rng.normal(size=shape + (4,)) + ramp).astype(np.float32)


def test_statistics_pass_through_the_decoder_unchanged():
  """`fixed` with the statistics `measure` took on the same input is the decoder itself;
  with another image's statistics it is not."""
  z = jnp.asarray(_latent((12, 12)))[None]
  stats = decode_norm.measure(_norm_decode, _NORM_PARAMS, z)
  assert len(stats) == 1 and stats[0][0].shape == (2,)
  plain = _norm_decode(_NORM_PARAMS, z)
  np.testing.assert_allclose(decode_norm.fixed(_norm_decode)((_NORM_PARAMS, stats), z),
                             plain, atol=1e-6)
  other = decode_norm.measure(_norm_decode, _NORM_PARAMS, z * 2 + 1)
  assert np.abs(decode_norm.fixed(_norm_decode)((_NORM_PARAMS, other), z) - plain).max() > 0.05
  # Pooled over a batch: the statistics of the images side by side.
  pair = decode_norm.measure(_norm_decode, _NORM_PARAMS, jnp.concatenate([z, z * 2 + 1]))
  side = decode_norm.measure(_norm_decode, _NORM_PARAMS,
                             jnp.concatenate([z, z * 2 + 1], axis=2))
  np.testing.assert_allclose(pair[0][0], side[0][0], atol=1e-5)
  np.testing.assert_allclose(pair[0][1], side[0][1], atol=1e-5)
  # A decoder with no GroupNorm: no statistics, the decoder as it is.
  assert decode_norm.measure(_blurred, None, z) == ()


def test_tiles_normalise_with_the_whole_images_statistics():
  """A decoder that is pixel-local but for its GroupNorm: with 'shared' the tiled decode
  is the whole-image decode (the statistics pass sees the whole latent: 4 tiles, one
  call, no pooling); 'overlap', each tile with its own statistics, is not."""
  z = _latent((32, 32))
  whole = np.asarray(_norm_decode(_NORM_PARAMS, jnp.asarray(z)[None]))[0]
  kw = dict(patch_size=128, tile_batch=4, latent_scale=1.0, min_tile=0)
  shared = decode.decode_image(_norm_decode, _NORM_PARAMS, z, blend_mode='shared', **kw)
  overlap = decode.decode_image(_norm_decode, _NORM_PARAMS, z, blend_mode='overlap', **kw)
  np.testing.assert_allclose(shared, whole, atol=2e-5)
  assert np.abs(overlap - whole).max() > 0.02


def _blur3(params, z):
  """Nearest x8, a per-pixel map, then a zero-padded 3x3 box blur: a decoder whose zero
  padding darkens the outer pixel line of whatever it decodes."""
  x = _pixel_local(params, z)
  k = jnp.ones((3, 3, 1, 3), x.dtype) / 9
  return jax.lax.conv_general_dilated(x, k, (1, 1), 'SAME', feature_group_count=3,
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def test_no_frame_at_the_image_border():
  """A constant latent through a zero-padded blur: the whole-image decode darkens a
  frame at the image border; 'shared' reflects a margin of latent around the image, so
  its border is as flat as its interior (where tile borders, cross-faded, leave at
  most the fade's first weight, 0.0096, times the blur's 1/3, twice where two cross:
  0.0064; the frame is 1/3 of the value, > 0.1)."""
  z = np.full((20, 28, 4), 0.3, np.float32)
  kw = dict(patch_size=64, tile_batch=4, latent_scale=1.0, min_tile=0)
  value = np.asarray(_pixel_local(None, jnp.asarray(z[:1, :1])[None]))[0, 0, 0]   # [3]
  shared = decode.decode_image(_blur3, None, z, blend_mode='shared', **kw)
  assert np.abs(shared - value).max() < 0.0065
  framed = decode.decode_image(_blur3, None, z, blend_mode='shared', edge_margin=0, **kw)
  assert np.abs(framed[0] - value).max() > 0.05                  # the frame it removes
  whole = np.asarray(_blur3(None, jnp.asarray(z)[None]))[0]
  assert np.abs(whole[:, 0] - value).max() > 0.05


@pytest.mark.parametrize('shape,band_tiles', [((40, 24), 1), ((37, 21), 2), ((5, 3), None),
                                              ((9, 50), 1)])
def test_bands_any_size_and_band_ranges(shape, band_tiles):
  """Any size; image band b starts at b * rows (the bands of the reflected latent start
  a margin higher); band ranges give the whole decode's pixels; weights sum to 1."""
  z = _latent(shape, seed=sum(shape))
  kw = dict(patch_size=64, tile_batch=4, band_tiles=band_tiles, latent_scale=1.0,
            blend_mode='shared', min_tile=0)
  whole = list(decode.iter_decode_bands(_blurred, None, z, **kw))
  rows, n = decode.band_layout(z.shape, **kw)
  assert [r for r, _ in whole] == [i * rows for i in range(n)]
  assert np.concatenate([b for _, b in whole]).shape == (8 * shape[0], 8 * shape[1], 3)
  test_decode.assert_band_ranges_equal(_blurred, z, kw, (1,) if n > 1 else (), whole)
  local = decode.decode_image(_pixel_local, None, z, **kw)
  np.testing.assert_allclose(local, np.asarray(_pixel_local(None, z[None]))[0], atol=1e-6)


def test_passes_per_pixel_and_errors():
  s = decode.TiledDecodeSettings(patch_size=512, blend_mode='shared')
  # Large images: the cross-fade's (64/56)^2 = 1.31, the margin's and statistics' share
  # vanishing: 1.315 at 100,000 px (12,500 latent px a side), 1.338 at 32,768 px; on
  # smaller ones the edge tiles and the statistics' 4 tiles show (8192 px: 1.426).
  assert decode.passes_per_pixel((12500, 12500, 4), s) == pytest.approx(1.315, abs=1e-3)
  assert decode.passes_per_pixel((4096, 4096, 4), s) <= 1.35
  assert decode.passes_per_pixel((1024, 1024, 4), s) == pytest.approx(1.426, abs=1e-3)
  # Tiles of at least 512 px (min_tile): 128 px patches decode as 512 px tiles.
  assert decode.tile_px(patch_size=128, blend_mode='shared') == 512
  assert decode.tile_px(patch_size=128, blend_mode='shared', min_tile=0) == 128
  assert decode.tile_px(patch_size=128, blend_mode='original') == 128
  over = decode.TiledDecodeSettings(patch_size=512, blend_mode='overlap')
  # The statistics pass: ~norm_tiles tiles (whole tile batches) of the subsampled latent.
  calls, batch = decode_overlap._norm_calls(s, 1024, 1024)  # pylint: disable=protected-access
  assert calls * batch >= s.norm_tiles and batch <= s.tile_batch
  assert decode_overlap.norm_stride(s, 1024, 1024) == 8        # 1024^2 / (4 x 64^2)
  assert decode_overlap.norm_stride(s, 128, 128) == 1
  assert decode.passes_per_pixel((1020, 1020, 4), s) > decode.passes_per_pixel(
      (1020, 1020, 4), over)
  with pytest.raises(ValueError, match='norm_tiles'):
    decode.TiledDecodeSettings(norm_tiles=0)
  with pytest.raises(ValueError, match='edge_margin'):
    decode.TiledDecodeSettings(patch_size=128, edge_margin=9)


def test_blend_modes_are_strategies():
  """Every name has its strategy object; the unblended decode is the four-shift one."""
  assert set(decode.BLENDS) == set(decode.BLEND_MODES)
  s = decode.TiledDecodeSettings(blend_mode='shared')
  assert decode.blend_of(s) is decode.BLENDS['shared']
  import dataclasses
  assert decode.blend_of(dataclasses.replace(s, blend=False)) is decode.BLENDS['original']


def test_demo_vae_closer_to_whole_decode_than_the_original_and_seam_free():
  """The synthetic-data demo VAE (`flow_vae`) on the latent of a synthetic 512 px image, 64 px patches (the original:
  64 px tiles; 'shared': 512 px, 2 x 2): 'shared' is closer (PSNR) to the one-call
  whole-image decode than the original's four-shift blend, its seams at its own tile
  borders fainter, and its outer pixel lines less steep (no frame)."""
  from tiled_ldm_jax import demo
  from tiled_ldm_jax.models import checkpoint
  from tiled_ldm_jax.models import vae as vae_lib
  from tiled_ldm_jax.training import data
  _, cfg, params = checkpoint.load_model(demo.model_path('flow_vae'), expect='vae')  # synthetic-data VAE
  ex = data.synth_example(0, 512, data.SynthSpec(num_classes=5, region_size_max=384.0))
  z = np.asarray(jax.jit(vae_lib.encode_fn(cfg))(params, jnp.asarray(ex.image)[None])[0])[0]
  f = vae_lib.decode_fn(cfg)
  whole = np.clip(np.asarray(jax.jit(f)(params, jnp.asarray(z)[None]))[0], 0, 1)
  psnr = lambda a: 10 * np.log10(1 / np.mean((a - whole) ** 2))
  kw = dict(patch_size=64, tile_batch=4)
  four = decode.decode_image(f, params, z / 50, **kw)
  s = decode.TiledDecodeSettings(blend_mode='shared', **kw)    # 512 px tiles: 2 x 2
  shared = decode.decode_image(f, params, z / 50, s)
  shared_seam = max(seams.seam_ratio(shared, period, offset=off)
                    for period, off in decode.blend_of(s).seam_lines(s))
  # The synthetic-data demo VAE (bundled for the flow example; the tissue VAE was not
  # trained on such images). Measured: PSNR 37.3 dB against 19.9 dB (original); seams
  # 1.11 (its one tile border each way) against 1.23; outer lines 0.95 against 1.16.
  def outer(img):   # mean gradient across the two outer lines / the median line's
    d0, d1 = np.abs(np.diff(img, axis=0)).mean((1, 2)), np.abs(np.diff(img, axis=1)).mean((0, 2))
    edge = np.mean([d0[:2], d0[-2:], d1[:2], d1[-2:]])
    return edge / np.median(np.concatenate([d0, d1]))
  assert psnr(shared) > psnr(four) + 4, (psnr(shared), psnr(four))
  assert shared_seam < min(1.2, seams.seam_ratio(four, 64)), shared_seam

  assert outer(shared) < outer(four) - 0.1, (outer(shared), outer(four))


def test_memory_estimate_counts_the_decode_bands(demo_pipeline):
  """The host estimate holds two decoded bands of the mode's own height ('shared': up to
  4 tile rows of S f pixels, not one tile row), and the decoder's activations are those
  of the tile it decodes (512 px for 'shared')."""
  from tiled_ldm_jax import memory
  o_shared = demo_pipeline.resolve()
  o_orig = demo_pipeline.resolve(blend_mode='original')
  assert o_shared.blend_mode == 'shared'                    # the default
  hw, c = (4096, 4096), demo_pipeline.vae.config.latent_channels
  rows = {o.blend_mode: decode.band_layout((512, 512, c), demo_pipeline.request(
              4096, 1, o).image.decode)[0] for o in (o_shared, o_orig)}
  assert rows['original'] == o_orig.patch_size and rows['shared'] != rows['original']
  need = {o.blend_mode: demo_pipeline.request(hw, 1, o).memory for o in (o_shared, o_orig)}
  decoder_512 = memory.activations(
      unet_batch=1, latent_patch=1, unet_dim=1, tile_batch=o_orig.tile_batch, tile_px=512,
      vae_width=demo_pipeline.vae.config.block_out_channels[0])
  # The larger of the U-Net's and the decoder's activations: here the 512 px tiles'.
  assert need['shared']['device'] > need['original']['device']
  assert need['shared']['device'] >= decoder_512
  assert need['shared']['host'] - need['original']['host'] == 2 * 15 * 4096 * (
      rows['shared'] - rows['original'])
