"""Converts a PyTorch checkpoint (DiffInfinite model-N.pt, diffusers VAE folder) to Flax.

  python scripts/convert_torch.py --kind=image_unet \
      --torch_checkpoint=../shared/reference/image_unet/model-1.pt --output_dir=/tmp/image_unet

torch is not needed: `.pt`/`.bin` files are read by `tiled_ldm_jax.convert.torch_zip`, which
refuses any pickle that names something other than tensors and plain containers.
A refused or unreadable input prints `error: ...` and exits 1, writing nothing.
"""

import math

from absl import flags
from absl import logging

from tiled_ldm_jax import flag_util
from tiled_ldm_jax import convert
from tiled_ldm_jax import geometry

_KIND = flags.DEFINE_enum('kind', None, ['image_unet', 'mask_unet', 'vae'], 'Which model.')
_CKPT = flags.DEFINE_string('torch_checkpoint', None,
                            'DiffInfinite model-N.pt, or a diffusers AutoencoderKL folder.')
_OUT = flags.DEFINE_string('output_dir', None, 'Folder to write (must not exist or be empty).')
_CONFIG = flags.DEFINE_string('config_json', None,
                              'U-Net constructor arguments; default config.json beside the '
                              'checkpoint.')
_SCALE = flags.DEFINE_float('latent_scale', geometry.DIFFINFINITE_LATENT_SCALE,
                            '--kind=vae only: stored in the VAE config; VAE latent = diffusion '
                            'latent * latent_scale (DiffInfinite: 50).')
flags.mark_flags_as_required(['kind', 'torch_checkpoint', 'output_dir'])


def _latent_scale():
  """The scale to store (VAE only), checked before any work."""
  scale = _SCALE.value
  if not math.isfinite(scale) or scale <= 0:
    raise ValueError(f'--latent_scale must be a positive finite number, got {scale}')
  if _KIND.value != 'vae':
    if flags.FLAGS['latent_scale'].present:
      raise ValueError('--latent_scale is stored with the VAE; it is not for --kind='
                       f'{_KIND.value}')
    return None
  return scale


def main(argv):
  del argv
  try:
    config, _ = convert.convert_checkpoint(_KIND.value, _CKPT.value, _OUT.value, _CONFIG.value,
                                           latent_scale=_latent_scale(), return_params=False)
  except (ValueError, OSError) as e:   # refused or unreadable input: one line, no traceback
    flag_util.fail(e)
  logging.info('wrote %s to %s', _KIND.value, _OUT.value)
  print(config)


if __name__ == '__main__':
  flag_util.run(main, {'torch_checkpoint': 'path', 'config_json': 'file'})
