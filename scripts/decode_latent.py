"""Decodes a latent with the seamless tiled decode and writes PNG / JPEG / pyramidal TIFF.

  python scripts/decode_latent.py --vae_ckpt=/tmp/vae_ref --random_latent=2048x2048 \
      --output=/tmp/out.tif --patch_size=64 --tile_batch=8

`--latent` is a .npy NHWC [1, h, w, C] or [h, w, C] latent in the sampler's scale
(the decoder sees latent * latent_scale). .tif/.tiff, .zarr and .npy stream band by band (bounded memory);
.png/.jpg decode in memory.
"""

import json
import time

from absl import flags
import numpy as np

from tiled_ldm_jax.files import atomic
from tiled_ldm_jax.models import checkpoint
from tiled_ldm_jax import decode
from tiled_ldm_jax import flag_util
from tiled_ldm_jax import geometry
from tiled_ldm_jax.files import latent_files
from tiled_ldm_jax.output import ome_zarr
from tiled_ldm_jax.output import writers
from tiled_ldm_jax.models import vae

_VAE = flags.DEFINE_string('vae_ckpt', None, 'Converted VAE folder (scripts/convert_torch.py).')
_LATENT = flags.DEFINE_string('latent', None, '.npy latent, NHWC.')
_RANDOM = flags.DEFINE_string('random_latent', None, 'HxW: decode a random normal latent.')
_RANDOM_STD = flags.DEFINE_float('random_std', None,
                                 'Std of --random_latent (default 1 / latent scale: decoder '
                                 'input ~N(0,1)).')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of --random_latent.')
_OUTPUT = flags.DEFINE_string('output', None, '.png, .jpg, .tif, .tiff, .zarr (OME-Zarr) or .npy (raw uint8)')
_COMPRESSION = flags.DEFINE_enum('tiff_compression', 'jpeg', ['jpeg', 'zlib', 'none'],
                                 'TIFF tile compression.')
_PATCH = flags.DEFINE_integer('patch_size', 512, 'Pixel tile side p (multiple of 16).')
_TILE_BATCH = flags.DEFINE_integer('tile_batch', 8, 'Tiles per decoder call.')
_SCALE = flags.DEFINE_float('latent_scale', None, 'Decoder input = latent * latent_scale '
                            '(default: the scale stored with the VAE).')
flags.mark_flags_as_required(['vae_ckpt', 'output'])
_CACHE = flag_util.define_compilation_cache_flag()
_OUTPUT_SUFFIXES = ('.png', '.jpg', '.jpeg') + writers.TIFF_SUFFIXES + ('.zarr', '.npy')


def main(argv):
  del argv
  flag_util.use_compilation_cache(_CACHE.value)
  if (_LATENT.value is None) == (_RANDOM.value is None):
    flag_util.fail('give exactly one of --latent, --random_latent')
  if not _OUTPUT.value.lower().rstrip('/').endswith(_OUTPUT_SUFFIXES):
    flag_util.fail(f'--output must end in {", ".join(_OUTPUT_SUFFIXES)}, got {_OUTPUT.value}')
  kind, config = checkpoint.read_model_json(_VAE.value)   # the config first: cheap checks
  if kind != 'vae':
    flag_util.fail(f'--vae_ckpt {_VAE.value} holds a {kind} model, expected vae')
  geom = geometry.LatentGeometry.of_vae(config)
  scale = _SCALE.value or geom.scale
  if _LATENT.value:   # validated (header, dtype, channels, finite) before the VAE loads
    z = latent_files.read_latent(_LATENT.value, config.latent_channels)
  else:
    h, w = (int(v) for v in _RANDOM.value.lower().split('x'))
    z = (np.random.default_rng(_SEED.value).standard_normal((h, w, config.latent_channels),
                                                            np.float32) * (_RANDOM_STD.value or 1 / scale))
  _, config, params = checkpoint.load_model(_VAE.value, expect='vae')
  start = time.perf_counter()
  settings = decode.TiledDecodeSettings(patch_size=_PATCH.value, tile_batch=_TILE_BATCH.value,
                                        latent_scale=scale, factor=geom.factor)
  fn, shape = vae.decode_fn(config), decode.output_shape(np.shape(z), settings)
  bands = decode.iter_decode_bands(fn, params, z, settings, uint8=True)
  if _OUTPUT.value.lower().endswith(writers.TIFF_SUFFIXES):
    writers.write_tiff(_OUTPUT.value, bands, shape, compression=_COMPRESSION.value)
  elif _OUTPUT.value.lower().rstrip('/').endswith('.zarr'):
    ome_zarr.write_ome_zarr(_OUTPUT.value, bands, shape)
  elif _OUTPUT.value.lower().endswith('.npy'):   # raw uint8 [H, W, 3], e.g. writer benchmarks
    with atomic.atomic_path(_OUTPUT.value) as tmp:
      out = np.lib.format.open_memmap(tmp, mode='w+', dtype=np.uint8, shape=tuple(shape))
      for r0, rows in bands:
        out[r0:r0 + len(rows)] = rows
      out.flush()
      del out
  else:
    writers.write_image(_OUTPUT.value, decode.decode_image(fn, params, z, settings, uint8=True))
  print(json.dumps({'written': _OUTPUT.value, 'latent_shape': list(np.shape(z)),
                    'image_shape': list(decode.output_shape(np.shape(z), settings)),
                    'seconds': round(time.perf_counter() - start, 2)}))


if __name__ == '__main__':
  flag_util.run(main, {
      'vae_ckpt': 'model', 'latent': 'file', 'random_latent': 'hxw', 'random_std': 'float>0',
      'output': 'out', 'patch_size': 'int>0', 'tile_batch': 'int>0',
      'latent_scale': 'float>0'})
