"""Samples a U-Net you trained (any objective: eps | v | flow) at any size with the public
sampler `tiled_ldm_jax.sampling.sample`, decodes it through a VAE and writes a PNG/JPEG.

  python scripts/sample_own_model.py --image_size=2048 --output=/tmp/own_2048.png

Defaults: the bundled flow-matching demo U-Net (configs/demo_train_flow.py) and demo VAE,
and the benchmark label map (left half 1, right half 2, a centre square 3, top strip 0).
The code it runs is `own_model.sample_trained_unet` (the README example). Prints JSON.
"""

import json
import time

from absl import flags

from tiled_ldm_jax import demo
from tiled_ldm_jax import flag_util
from tiled_ldm_jax import sampling
from tiled_ldm_jax.examples import own_model
from tiled_ldm_jax.output import writers
from tiled_ldm_jax.evaluation import benchmark
from tiled_ldm_jax.files import label_maps

_UNET = flags.DEFINE_string('unet_ckpt', demo.model_path('flow_unet'),
                            'Trained image U-Net folder (scripts/train.py export).')
_VAE = flags.DEFINE_string('vae_ckpt', demo.model_path('flow_vae'),
                           'VAE folder whose latents the U-Net was trained on (default: '
                           'the bundled flow U-Net\'s; the demo image U-Net\'s is '
                           'tiled_ldm_jax/demo/vae).')
_LABELS = flags.DEFINE_string('labels', None, 'Label-id PNG [H, W] (default: the benchmark '
                              'map at --image_size).')
_SIZE = flags.DEFINE_integer('image_size', 2048, 'Image side in pixels (without --labels).')
_STEPS = flags.DEFINE_integer('sampling_steps', 20, 'Sampling steps.')
_SEED = flags.DEFINE_integer('seed', 0, 'Root seed.')
_SCALE = flags.DEFINE_float('cond_scale', 3.0, 'Guidance w: null + (1 + w)(cond - null).')
_PATCH = flags.DEFINE_integer('patch_size', demo.PATCH_SIZE, 'Window side in pixels (the '
                              'training crop size).')
_SCHEDULE = flags.DEFINE_enum('schedule', 'random', ['random', 'grid'], 'Window placement.')
_OUTPUT = flags.DEFINE_string('output', None, 'Output .png / .jpg.')
flags.mark_flag_as_required('output')


def main(argv):
  del argv
  if not _OUTPUT.value.lower().endswith(('.png', '.jpg', '.jpeg')):
    raise ValueError(f'--output must end in .png or .jpg, got {_OUTPUT.value}')
  labels = (label_maps.read_label_png(_LABELS.value) if _LABELS.value else
            benchmark.benchmark_label_map(_SIZE.value, _SIZE.value, 4))
  own_model.check_request(_UNET.value, _VAE.value, labels, _PATCH.value)   # before JAX starts
  start = time.perf_counter()
  image = own_model.sample_trained_unet(
      _UNET.value, _VAE.value, labels, sampling_steps=_STEPS.value, seed=_SEED.value,
      cond_scale=_SCALE.value, patch_size=_PATCH.value,
      windows=sampling.Grid() if _SCHEDULE.value == 'grid' else sampling.Random())
  seconds = time.perf_counter() - start
  writers.write_image(_OUTPUT.value, image)
  print(json.dumps({'output': _OUTPUT.value, 'shape': list(image.shape),
                    'sampling_steps': _STEPS.value, 'seconds': round(seconds, 2)}))


if __name__ == '__main__':
  flag_util.run(main, {'unet_ckpt': 'model', 'vae_ckpt': 'model', 'labels': 'file',
                       'image_size': 'int>0', 'sampling_steps': 'int>0', 'patch_size': 'int>0',
                       'cond_scale': 'finite', 'output': 'out'})
