"""Converts a PyTorch checkpoint (DiffInfinite model-N.pt, diffusers VAE folder) to Flax.

  python scripts/convert_torch.py --kind=image_unet \
      --torch_checkpoint=../shared/reference/image_unet/model-1.pt --output_dir=/tmp/image_unet
"""

from absl import app
from absl import flags
from absl import logging

from tiled_ldm_jax import convert
from tiled_ldm_jax.models import unet

_KIND = flags.DEFINE_enum('kind', None, ['image_unet', 'mask_unet', 'vae'], 'Which model.')
_CKPT = flags.DEFINE_string('torch_checkpoint', None,
                            'DiffInfinite model-N.pt, or a diffusers AutoencoderKL folder.')
_OUT = flags.DEFINE_string('output_dir', None, 'Folder to write (must not exist or be empty).')
_CONFIG = flags.DEFINE_string('config_json', None,
                              'U-Net constructor arguments; default config.json beside the '
                              'checkpoint.')
flags.mark_flags_as_required(['kind', 'torch_checkpoint', 'output_dir'])


def main(argv):
  del argv
  config, params = convert.convert_checkpoint(_KIND.value, _CKPT.value, _OUT.value,
                                              _CONFIG.value)
  logging.info('wrote %s (%s params) to %s', _KIND.value, f'{unet.count_params(params):,}',
               _OUT.value)
  print(config)


if __name__ == '__main__':
  app.run(main)
