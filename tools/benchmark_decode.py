"""Throughput of the tiled, Hann-blended decode: one JSON line per tile batch.

  python tools/benchmark_decode.py --vae_ckpt=/tmp/vae_ref --size=2048 --patch_size=64 \
      --tile_batch=1,8

`compile_seconds` is a warm-up decode of one band of the same width (compiles the band
program, plus one band of work); `seconds` is the full decode after it, in memory
(`decode.decode_image`, float32 pixels on the host). Megapixels are output pixels; each is
decoded four times (the four shifted tilings).
"""

import json
import time

from absl import flags
import jax
import numpy as np

from tiled_ldm_jax.models import checkpoint
from tiled_ldm_jax import decode
from tiled_ldm_jax import flag_util
from tiled_ldm_jax import geometry
from tiled_ldm_jax.models import vae

_VAE = flags.DEFINE_string('vae_ckpt', None, 'Converted VAE folder.')
_SIZE = flags.DEFINE_string('size', '2048', 'Output image side in pixels, or HxW.')
_PATCH = flags.DEFINE_integer('patch_size', 512, 'Pixel tile side p.')
_TILE_BATCH = flags.DEFINE_list('tile_batch', ['1', '8'], 'Tile batches to time.')
_SCALE = flags.DEFINE_float('latent_scale', None, 'Decoder input = latent * latent_scale '
                            '(default: the scale stored with the VAE).')
_STD = flags.DEFINE_float('random_std', None, 'Std of the random latent (default 1 / scale).')
_BLEND = flags.DEFINE_bool('blend', True, 'False: time the unblended tiled decode.')
flags.mark_flag_as_required('vae_ckpt')
_CACHE = flag_util.define_compilation_cache_flag()


def main(argv):
  del argv
  flag_util.use_compilation_cache(_CACHE.value)
  _, config, params = checkpoint.load_model(_VAE.value, expect='vae')
  params = jax.device_put(params)
  geom = geometry.LatentGeometry.of_vae(config)
  f, scale = geom.factor, _SCALE.value or geom.scale
  hw = [int(v) for v in _SIZE.value.lower().split('x')]
  h, w = (hw * 2)[:2]
  if h % f or w % f:
    flag_util.fail(f'--size must be a multiple of {f}, got {_SIZE.value}')
  z = (np.random.default_rng(0).standard_normal((h // f, w // f, config.latent_channels),
                                                 np.float32) * (_STD.value or 1 / scale))
  fn = vae.decode_fn(config)
  for tb in (int(v) for v in _TILE_BATCH.value):
    s = decode.TiledDecodeSettings(patch_size=_PATCH.value, factor=f, tile_batch=tb,
                                   latent_scale=scale, blend=_BLEND.value)
    start = time.perf_counter()
    decode.decode_image(fn, params, z[:s.latent_patch], s)
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    out = decode.decode_image(fn, params, z, s)
    seconds = time.perf_counter() - start
    print(json.dumps({
        'megapixels_per_second': round(h * w / 1e6 / seconds, 4), 'tile_batch': tb,
        'seconds': round(seconds, 2), 'compile_seconds': round(compile_s, 2),
        'image': [h, w], 'patch_size': _PATCH.value, 'blend': _BLEND.value,
        'mean_pixel': round(float(out.mean()), 4), 'device': str(jax.devices()[0]),
        'platform': jax.devices()[0].platform}), flush=True)


if __name__ == '__main__':
  flag_util.run(main, {
      'vae_ckpt': 'model', 'size': 'hxw', 'patch_size': 'int>0', 'tile_batch': 'ints>0',
      'latent_scale': 'float>0', 'random_std': 'float>0'})
