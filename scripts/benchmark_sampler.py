"""Benchmarks the random-patch sampler on a converted image model; prints one JSON line.

  python scripts/benchmark_sampler.py --unet_ckpt=/tmp/image_unet --image_size=256 \
      --patch_size=128 --steps=20 --cond_scale=3 --patches_per_step=1
"""

import json
import os
import sys

from absl import flags

from tiled_ldm_jax.evaluation import benchmark
from tiled_ldm_jax import checkpoint
from tiled_ldm_jax import flag_util

_CKPT = flags.DEFINE_string('unet_ckpt', None, 'Converted image model folder.')
_SIZE = flags.DEFINE_integer('image_size', 256, 'Image side in pixels.')
_PATCH = flags.DEFINE_integer('patch_size', 128, 'Patch side in pixels.')
_STEPS = flags.DEFINE_integer('steps', 20, 'DDIM sampling steps.')
_W = flags.DEFINE_float('cond_scale', 3.0, 'Guidance weight w: null + (1+w)(cond-null).')
_K = flags.DEFINE_integer('patches_per_step', 1, 'Non-overlapping patches per iteration.')
_BATCH = flags.DEFINE_integer('batch_size', 1, 'Images sampled together.')
_SEED = flags.DEFINE_integer('seed', 0, 'Root PRNG seed.')
_SCHEDULE = flags.DEFINE_enum('schedule', 'random', ['random', 'grid'], 'Patch placement.')
_MARGIN = flags.DEFINE_integer('grid_margin', 0, 'Grid: latent pixels of context per side.')
_CACHE = flag_util.define_compilation_cache_flag()
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed runs after the compile run.')
_DEVICES = flags.DEFINE_integer('devices', 1, 'If > 1: seconds per image on 1 device vs this '
                                'many (the batch split over them) and the scaling efficiency.')
_ORIG_REPO = flags.DEFINE_string('original_repo', None, 'Also time the original PyTorch '
                                 'sampler from this DiffInfinite checkout (never shipped).')
_ORIG_CKPT = flags.DEFINE_string('original_checkpoint', None,
                                 'The model-N.pt the converted --unet_ckpt came from.')
_ORIG_CONFIG = flags.DEFINE_string('original_config', None, 'Its config.json.')
_ORIG_THREADS = flags.DEFINE_integer('original_threads', 2, 'torch threads for the original.')
flags.mark_flag_as_required('unet_ckpt')


def main(argv):
  del argv
  _, config, params = checkpoint.load_model(_CKPT.value, expect='image_unet')
  kwargs = dict(image_size=_SIZE.value, patch_size=_PATCH.value, steps=_STEPS.value,
                cond_scale=_W.value, patches_per_step=_K.value, seed=_SEED.value,
                repeats=_REPEATS.value)
  flag_util.use_compilation_cache(_CACHE.value)
  if _DEVICES.value > 1:
    result = benchmark.run_scaling_benchmark(
        config, params, devices=_DEVICES.value,
        batch_size=_BATCH.value if _BATCH.value > 1 else None, **kwargs)
  else:
    result = benchmark.run_sampler_benchmark(config, params, batch_size=_BATCH.value,
                                             schedule=_SCHEDULE.value,
                                             grid_margin=_MARGIN.value, **kwargs)
    if _ORIG_REPO.value:   # side by side, in the same process and conditions
      sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
      import original_sampler  # pylint: disable=g-import-not-at-top
      labels = benchmark.benchmark_label_map(_SIZE.value, _SIZE.value, config.num_classes)
      orig = original_sampler.time_original(
          _ORIG_REPO.value, _ORIG_CKPT.value, _ORIG_CONFIG.value, labels, _PATCH.value,
          _STEPS.value, _W.value, _SEED.value, repeats=1, num_threads=_ORIG_THREADS.value)
      result.update({k: v for k, v in orig.items() if k.startswith('original_') or
                     k == 'torch_version'})
      result['speedup_vs_original'] = orig['original_seconds'] / result['seconds']
  print(json.dumps(result))


if __name__ == '__main__':
  flag_util.run(main, {
      'unet_ckpt': 'model', 'image_size': 'int>0', 'patch_size': 'int>0', 'steps': 'int>0',
      'cond_scale': 'finite', 'patches_per_step': 'int>0', 'batch_size': 'int>0',
      'grid_margin': 'int>=0', 'repeats': 'int>0', 'devices': 'int>0',
      'original_repo': 'dir', 'original_checkpoint': 'file', 'original_config': 'file',
      'original_threads': 'int>0'})
