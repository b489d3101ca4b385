"""Throughput and quality of the tiled decode: one JSON line per (blend mode, tile batch).

  python tools/benchmark_decode.py --vae_ckpt=/tmp/vae_ref --size=2048 --patch_size=64 \
      --tile_batch=1,8 --blend_mode=original,overlap --latent=image

`compile_seconds` is a warm-up decode of one band of the same width (compiles the band
program, plus one band of work); `seconds` is the full decode after it, in memory
(`decode.decode_image`, float32 pixels on the host). Megapixels are output pixels;
`passes_per_pixel` counts decoder evaluations per pixel (`decode.passes_per_pixel`: ~4
for the four-shift blends, ~1.3 for 'overlap'). With `--latent=image` the latent is the
VAE's encoding of a synthetic tissue-like image (`training.data.synth_example`) and each
line adds `seam_ratio` (at the mode's own tile borders: the four-shift grid; for
'overlap'/'shared' the worst of the cross-fades' start, middle and end) and, with
`--compare_whole`, `psnr_vs_whole` against one whole-image decode (where it fits).

  # no checkpoint: random weights in the SD2 VAE's shapes (configs/sd2_vae.py)
  python tools/benchmark_decode.py --full_size --size=1024 --patch_size=128 --tile_batch=8 \
      --blend_mode=original,overlap,shared --latent=image --compare_whole
  # images whose one-call encode does not fit (the mid block's attention is N^2)
  python tools/benchmark_decode.py --vae_ckpt=V --size=4096 --latent=image --tiled_encode
"""

import json
import os
import time

from absl import flags
import jax
import numpy as np

from tiled_ldm_jax.models import checkpoint
from tiled_ldm_jax.models import config_files
from tiled_ldm_jax import decode
from tiled_ldm_jax import encode
from tiled_ldm_jax import flag_util
from tiled_ldm_jax import geometry
from tiled_ldm_jax.evaluation import seams
from tiled_ldm_jax.models import vae
from tiled_ldm_jax.training import data

_VAE = flags.DEFINE_string('vae_ckpt', None, 'Converted VAE folder.')
_FULL = flags.DEFINE_bool('full_size', False, 'Instead of --vae_ckpt: random weights '
                          '(seed 0) in the full-size SD2 VAE\'s shapes (configs/sd2_vae.py; '
                          'its stored latent scale, which --latent=image and the default '
                          '--random_std cancel).')
_TILED_ENCODE = flags.DEFINE_bool('tiled_encode', False, "With --latent=image: encode the "
                                  'synthetic image tile by tile (encode.encode_image, 512 px '
                                  'tiles, 256 px halo) instead of in one call, for sizes '
                                  'whose one-call encode does not fit.')
_SIZE = flags.DEFINE_string('size', '2048', 'Output image side in pixels, or HxW.')
_PATCH = flags.DEFINE_integer('patch_size', 512, 'Pixel tile side p.')
_TILE_BATCH = flags.DEFINE_list('tile_batch', ['1', '8'], 'Tile batches to time.')
_SCALE = flags.DEFINE_float('latent_scale', None, 'Decoder input = latent * latent_scale '
                            '(default: the scale stored with the VAE).')
_STD = flags.DEFINE_float('random_std', None, 'Std of the random latent (default 1 / scale).')
_BLEND = flags.DEFINE_bool('blend', True, 'False: time the unblended tiled decode.')
_MODES = flags.DEFINE_list('blend_mode', ['original'],
                           f'Blend modes to time, of {", ".join(decode.BLEND_MODES)}.')
_LATENT = flags.DEFINE_enum('latent', 'random', ['random', 'image'],
                            "'random': Gaussian latent; 'image': a synthetic image encoded "
                            '(adds seam_ratio).')
_WHOLE = flags.DEFINE_bool('compare_whole', False, "With --latent=image: PSNR against a "
                           'whole-image decode (one decoder call on the whole latent).')
_CACHE = flag_util.define_compilation_cache_flag()


def main(argv):
  del argv
  bad = [m for m in _MODES.value if m not in decode.BLEND_MODES]
  if bad:
    flag_util.fail(f'--blend_mode: {bad} not of {decode.BLEND_MODES}')
  if _WHOLE.value and _LATENT.value != 'image':
    flag_util.fail('--compare_whole needs --latent=image')
  if _FULL.value == bool(_VAE.value):
    flag_util.fail('give exactly one of --vae_ckpt and --full_size')
  flag_util.use_compilation_cache(_CACHE.value)
  if _FULL.value:
    _, config = config_files.load_model_config(
        os.path.join(os.path.dirname(__file__), '..', 'configs', 'sd2_vae.py'))
    params = vae.init_params(config, jax.random.key(0))
  else:
    _, config, params = checkpoint.load_model(_VAE.value, expect='vae')
  params = jax.device_put(params)
  geom = geometry.LatentGeometry.of_vae(config)
  f, scale = geom.factor, _SCALE.value or geom.scale
  hw = [int(v) for v in _SIZE.value.lower().split('x')]
  h, w = (hw * 2)[:2]
  if h % f or w % f:
    flag_util.fail(f'--size must be a multiple of {f}, got {_SIZE.value}')
  fn = vae.decode_fn(config)
  if _LATENT.value == 'image':
    ex = data.synth_example(0, max(h, w), data.SynthSpec(num_classes=5,
                                                          region_size_max=384.0))
    if _TILED_ENCODE.value:
      z = encode.encode_image(vae.encode_fn(config), params, ex.image[:h, :w], factor=f,
                              scale=scale)
    else:
      z = np.asarray(jax.jit(vae.encode_fn(config))(
          params, jax.numpy.asarray(ex.image[:h, :w])[None])[0])[0] / scale
  else:
    z = (np.random.default_rng(0).standard_normal(
        (h // f, w // f, config.latent_channels), np.float32) * (_STD.value or 1 / scale))
  whole = None
  if _WHOLE.value:
    whole = np.asarray(jax.jit(fn)(params, jax.numpy.asarray(z * scale)[None]))[0]
    lo, hi = decode.TiledDecodeSettings().clip
    whole = np.clip(whole, lo, hi)
  for mode in _MODES.value:
    for tb in (int(v) for v in _TILE_BATCH.value):
      s = decode.TiledDecodeSettings(patch_size=_PATCH.value, factor=f, tile_batch=tb,
                                     latent_scale=scale, blend=_BLEND.value, blend_mode=mode)
      start = time.perf_counter()
      decode.decode_image(fn, params, z[:s.latent_patch], s)
      compile_s = time.perf_counter() - start
      start = time.perf_counter()
      out = decode.decode_image(fn, params, z, s)
      seconds = time.perf_counter() - start
      line = {
          'megapixels_per_second': round(h * w / 1e6 / seconds, 4), 'tile_batch': tb,
          'seconds': round(seconds, 2), 'compile_seconds': round(compile_s, 2),
          'image': [h, w], 'patch_size': _PATCH.value, 'tile_px': decode.tile_px(s),
          'blend': _BLEND.value,
          'blend_mode': mode, 'passes_per_pixel': round(decode.passes_per_pixel(z.shape, s), 3),
          'mean_pixel': round(float(out.mean()), 4), 'latent': _LATENT.value,
          'device': str(jax.devices()[0]), 'platform': jax.devices()[0].platform}
      if _LATENT.value == 'image':
        line['seam_ratio'] = round(_seam_ratio(out, s), 4)
      if whole is not None:
        mse = float(np.mean((out - whole) ** 2))
        line['psnr_vs_whole'] = round(10 * np.log10(1 / mse), 2) if mse else None
      print(json.dumps(line), flush=True)


def _seam_ratio(img, s: decode.TiledDecodeSettings) -> float:
  """At the mode's own tile borders (the worst of its seam lines)."""
  return max(seams.seam_ratio(img, period, offset=off)
             for period, off in decode.blend_of(s).seam_lines(s))


if __name__ == '__main__':
  flag_util.run(main, {
      'vae_ckpt': 'model', 'size': 'hxw', 'patch_size': 'int>0', 'tile_batch': 'ints>0',
      'latent_scale': 'float>0', 'random_std': 'float>0'})
